//! Community ID v1 flow hash (corelight/community-id-spec): a direction-independent flow id
//! that Zeek, Suricata, Elastic and others compute the same way, so a SIEM can join our
//! events with theirs.
//!
//! `"1:" + base64(sha1(seed_be16 . ip_lo . ip_hi . proto . 0 . port_lo_be16 . port_hi_be16))`,
//! where the (ip, port) pair that sorts first is "lo". ICMP's type/code port mapping is not
//! implemented: droptrace only hashes TCP flows (and the port-based UDP/SCTP work the same).
use std::net::IpAddr;

use base64::Engine as _;
use sha1::{Digest, Sha1};

pub const TCP: u8 = 6;

/// The Community ID of a flow with ports (TCP, UDP, SCTP), or of a portless protocol when
/// `ports` is `None`. Returns `None` for mixed IPv4/IPv6 addresses, which is not a flow.
pub fn v1(
    seed: u16,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    ports: Option<(u16, u16)>,
) -> Option<String> {
    let (sp, dp) = ports.unwrap_or((0, 0));
    // Addresses as fixed arrays (IPv4 in the first 4 bytes): no allocation per event.
    let mut a = [0u8; 16];
    let mut b = [0u8; 16];
    let len = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            a[..4].copy_from_slice(&s.octets());
            b[..4].copy_from_slice(&d.octets());
            4
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            a = s.octets();
            b = d.octets();
            16
        }
        _ => return None,
    };
    let (a, b) = (&a[..len], &b[..len]);
    // Order by address, then port, as the spec's "is_ordered" does.
    let ((lo_ip, lo_port), (hi_ip, hi_port)) = if (a, sp) <= (b, dp) {
        ((a, sp), (b, dp))
    } else {
        ((b, dp), (a, sp))
    };
    let mut h = Sha1::new();
    h.update(seed.to_be_bytes());
    h.update(lo_ip);
    h.update(hi_ip);
    h.update([proto, 0]);
    if ports.is_some() {
        h.update(lo_port.to_be_bytes());
        h.update(hi_port.to_be_bytes());
    }
    let digest = h.finalize();
    // "1:" + 28 base64 characters, built in one allocation.
    let mut out = String::with_capacity(30);
    out.push_str("1:");
    base64::engine::general_purpose::STANDARD.encode_string(digest, &mut out);
    Some(out)
}

/// Community ID of a TCP flow with seed 0 (what every format carries).
pub fn tcp(src: IpAddr, sport: u16, dst: IpAddr, dport: u16) -> Option<String> {
    v1(0, TCP, src, dst, Some((sport, dport)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Port-based and portless vectors from the spec repository's baseline/baseline_deflt.json
    /// (seed 0, base64), both directions of each flow.
    #[test]
    fn spec_baseline_vectors() {
        type Case<'a> = (u8, &'a str, &'a str, Option<(u16, u16)>, &'a str);
        let cases: &[Case] = &[
            (
                6,
                "2001:470:e5bf:dead:4957:2174:e82c:4887",
                "2607:f8b0:400c:c03::1a",
                Some((63943, 25)),
                "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=",
            ),
            (
                6,
                "2607:f8b0:400c:c03::1a",
                "2001:470:e5bf:dead:4957:2174:e82c:4887",
                Some((25, 63943)),
                "1:/qFaeAR+gFe1KYjMzVDsMv+wgU4=",
            ),
            (
                6,
                "128.232.110.120",
                "66.35.250.204",
                Some((34855, 80)),
                "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
            ),
            (
                6,
                "66.35.250.204",
                "128.232.110.120",
                Some((80, 34855)),
                "1:LQU9qZlK+B5F3KDmev6m5PMibrg=",
            ),
            (
                17,
                "192.168.1.52",
                "8.8.8.8",
                Some((54585, 53)),
                "1:d/FP5EW3wiY1vCndhwleRRKHowQ=",
            ),
            (
                17,
                "8.8.8.8",
                "192.168.1.52",
                Some((53, 54585)),
                "1:d/FP5EW3wiY1vCndhwleRRKHowQ=",
            ),
            (
                132,
                "192.168.170.8",
                "192.168.170.56",
                Some((7, 7)),
                "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs=",
            ),
            (
                132,
                "192.168.170.56",
                "192.168.170.8",
                Some((7, 7)),
                "1:MP2EtRCAUIZvTw6MxJHLV7N7JDs=",
            ),
            (
                46,
                "10.1.12.1",
                "10.1.12.2",
                None,
                "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw=",
            ),
            (
                46,
                "10.1.12.2",
                "10.1.12.1",
                None,
                "1:KHlLkgoJW7ifUTyTSgyVfkFHzKw=",
            ),
        ];
        for (proto, s, d, ports, want) in cases {
            let got = v1(0, *proto, s.parse().unwrap(), d.parse().unwrap(), *ports);
            assert_eq!(got.as_deref(), Some(*want), "{proto} {s} {d} {ports:?}");
        }
        assert_eq!(
            tcp(
                "128.232.110.120".parse().unwrap(),
                34855,
                "66.35.250.204".parse().unwrap(),
                80
            )
            .as_deref(),
            Some("1:LQU9qZlK+B5F3KDmev6m5PMibrg=")
        );
    }

    #[test]
    fn mixed_families_have_no_id() {
        assert_eq!(
            tcp("10.0.0.1".parse().unwrap(), 1, "::1".parse().unwrap(), 2),
            None
        );
    }
}
