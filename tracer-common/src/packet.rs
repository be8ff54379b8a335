//! IPv4/IPv6 + TCP header parsing with bounded reads, shared by the kernel programs (reading
//! skb memory with bpf_probe_read_kernel) and host unit tests (reading a byte slice): the code
//! tested is the code that runs in the kernel.
use crate::{AF_INET, AF_INET6, Flow, IPPROTO_TCP};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

/// Reads `N` bytes at an absolute address; errors are the helper's negative errno.
pub trait Reader {
    fn read<const N: usize>(&self, addr: u64) -> Result<[u8; N], i64>;
}

/// Parsed TCP/IP headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpPacket {
    pub flow: Flow,
    pub flags: u8,
    /// Address of the TCP header (payload starts `data_offset` bytes later).
    pub tcp_header: u64,
    pub data_offset: u8,
}

/// `protocol` is skb->protocol in host byte order (what skb:kfree_skb records); 0 (locally
/// generated packets early in output) lets the IP version nibble decide.
#[inline(always)]
pub fn parse_tcp<R: Reader>(r: &R, ip: u64, protocol: u16) -> Result<Option<TcpPacket>, i64> {
    match protocol {
        ETH_P_IP => parse_v4(r, ip),
        ETH_P_IPV6 => parse_v6(r, ip),
        0 => {
            // Only then is the version byte read: every read is a helper call in the kernel.
            let [first] = r.read::<1>(ip)?;
            match first >> 4 {
                4 => parse_v4(r, ip),
                6 => parse_v6(r, ip),
                _ => Ok(None),
            }
        }
        _ => Ok(None),
    }
}

#[inline(always)]
fn parse_v4<R: Reader>(r: &R, ip: u64) -> Result<Option<TcpPacket>, i64> {
    // The IP header without options and the TCP header's first 14 bytes in one read (every
    // read is a helper call in the kernel); a packet too short for that (not TCP, or
    // truncated) is read the long way, header by header.
    let Ok(both) = r.read::<34>(ip) else {
        return parse_v4_headers(r, ip, r.read::<20>(ip)?);
    };
    let mut hdr = [0u8; 20];
    hdr.copy_from_slice(&both[..20]);
    let Some((flow, ihl)) = v4_flow(&hdr) else {
        return Ok(None);
    };
    if ihl == 20 {
        let mut th = [0u8; 14];
        th.copy_from_slice(&both[20..34]);
        return Ok(Some(tcp_of(th, ip + 20, flow)));
    }
    tcp(r, ip + (ihl & 0x3c), flow).map(Some)
}

#[inline(always)]
fn parse_v4_headers<R: Reader>(r: &R, ip: u64, hdr: [u8; 20]) -> Result<Option<TcpPacket>, i64> {
    let Some((flow, ihl)) = v4_flow(&hdr) else {
        return Ok(None);
    };
    tcp(r, ip + (ihl & 0x3c), flow).map(Some)
}

/// The addresses of a TCP first fragment and its header length; None for anything else.
#[inline(always)]
fn v4_flow(hdr: &[u8; 20]) -> Option<(Flow, u64)> {
    if hdr[0] >> 4 != 4 || hdr[9] != IPPROTO_TCP {
        return None;
    }
    let ihl = ((hdr[0] & 0x0f) as u64) * 4;
    // Only the first fragment carries the TCP header.
    let frag_off = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    if ihl < 20 || frag_off != 0 {
        return None;
    }
    let mut flow = Flow {
        family: AF_INET,
        proto: IPPROTO_TCP,
        ..Flow::default()
    };
    flow.saddr[..4].copy_from_slice(&hdr[12..16]);
    flow.daddr[..4].copy_from_slice(&hdr[16..20]);
    Some((flow, ihl))
}

const IPV6_MAX_EXT_HEADERS: usize = 4;

#[inline(always)]
fn parse_v6<R: Reader>(r: &R, ip: u64) -> Result<Option<TcpPacket>, i64> {
    let hdr = r.read::<40>(ip)?;
    if hdr[0] >> 4 != 6 {
        return Ok(None);
    }
    let mut next = hdr[6];
    let mut off: u64 = 40;
    // A bounded number of extension headers: hop-by-hop, routing, fragment, dest options.
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            0 | 43 | 60 => {
                let ext = r.read::<2>(ip + off)?;
                next = ext[0];
                off += (ext[1] as u64 + 1) * 8;
            }
            44 => {
                let ext = r.read::<4>(ip + off)?;
                if u16::from_be_bytes([ext[2], ext[3]]) & 0xfff8 != 0 {
                    return Ok(None); // not the first fragment
                }
                next = ext[0];
                off += 8;
            }
            _ => break,
        }
    }
    if next != IPPROTO_TCP {
        return Ok(None);
    }
    let mut flow = Flow {
        family: AF_INET6,
        proto: IPPROTO_TCP,
        ..Flow::default()
    };
    flow.saddr.copy_from_slice(&hdr[8..24]);
    flow.daddr.copy_from_slice(&hdr[24..40]);
    tcp(r, ip + (off & 0x7ff), flow).map(Some)
}

#[inline(always)]
fn tcp<R: Reader>(r: &R, th: u64, flow: Flow) -> Result<TcpPacket, i64> {
    // Ports, sequence, ack, data offset, flags: the first 14 bytes.
    let hdr = r.read::<14>(th)?;
    Ok(tcp_of(hdr, th, flow))
}

#[inline(always)]
fn tcp_of(hdr: [u8; 14], th: u64, mut flow: Flow) -> TcpPacket {
    flow.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
    flow.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
    TcpPacket {
        flow,
        flags: hdr[13],
        tcp_header: th,
        data_offset: (hdr[12] >> 4) * 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packet bytes placed at address 0x1000.
    struct Bytes<'a>(&'a [u8]);
    const BASE: u64 = 0x1000;

    impl Reader for Bytes<'_> {
        fn read<const N: usize>(&self, addr: u64) -> Result<[u8; N], i64> {
            let start = addr.checked_sub(BASE).ok_or(-14)? as usize;
            let s = self.0.get(start..start + N).ok_or(-14)?;
            let mut out = [0u8; N];
            out.copy_from_slice(s);
            Ok(out)
        }
    }

    fn tcp_hdr(sport: u16, dport: u16, flags: u8) -> [u8; 20] {
        let mut t = [0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t
    }

    fn ipv4(proto: u8, frag: u16, options: usize) -> [u8; 64] {
        let mut p = [0u8; 64];
        p[0] = 0x40 | (5 + options as u8 / 4);
        p[6..8].copy_from_slice(&frag.to_be_bytes());
        p[9] = proto;
        p[12..16].copy_from_slice(&[198, 51, 100, 1]);
        p[16..20].copy_from_slice(&[198, 51, 100, 7]);
        let th = 20 + options;
        p[th..th + 20].copy_from_slice(&tcp_hdr(40123, 1521, 0x02));
        p
    }

    #[test]
    fn ipv4_syn_to_the_listener() {
        let p = ipv4(IPPROTO_TCP, 0x4000, 0); // DF set, first fragment
        let pkt = parse_tcp(&Bytes(&p), BASE, ETH_P_IP).unwrap().unwrap();
        assert_eq!(pkt.flow.family, AF_INET);
        assert_eq!(&pkt.flow.saddr[..4], &[198, 51, 100, 1]);
        assert_eq!(&pkt.flow.daddr[..4], &[198, 51, 100, 7]);
        assert_eq!((pkt.flow.sport, pkt.flow.dport), (40123, 1521));
        assert_eq!(pkt.flags, 0x02);
        assert_eq!(pkt.data_offset, 20);
    }

    #[test]
    fn ipv4_options_move_the_tcp_header() {
        let p = ipv4(IPPROTO_TCP, 0, 8);
        let pkt = parse_tcp(&Bytes(&p), BASE, 0).unwrap().unwrap();
        assert_eq!(pkt.tcp_header, BASE + 28);
        assert_eq!(pkt.flow.dport, 1521);
    }

    #[test]
    fn ipv4_non_tcp_and_later_fragments_are_skipped() {
        assert_eq!(parse_tcp(&Bytes(&ipv4(17, 0, 0)), BASE, ETH_P_IP), Ok(None));
        assert_eq!(
            parse_tcp(&Bytes(&ipv4(6, 0x0010, 0)), BASE, ETH_P_IP),
            Ok(None)
        );
        assert_eq!(parse_tcp(&Bytes(&ipv4(6, 0, 0)), BASE, 0x0806), Ok(None));
    }

    #[test]
    fn truncated_headers_are_read_errors_not_garbage() {
        let p = ipv4(IPPROTO_TCP, 0, 0);
        assert!(parse_tcp(&Bytes(&p[..30]), BASE, ETH_P_IP).is_err());
        assert!(parse_tcp(&Bytes(&p[..10]), BASE, ETH_P_IP).is_err());
        // Short of the one combined read: headers read one by one, same answers.
        assert_eq!(
            parse_tcp(&Bytes(&ipv4(17, 0, 0)[..28]), BASE, ETH_P_IP),
            Ok(None)
        );
        let p = ipv4(IPPROTO_TCP, 0, 0);
        assert!(parse_tcp(&Bytes(&p[..33]), BASE, ETH_P_IP).is_err());
    }

    fn ipv6(exts: &[(u8, &[u8])], last: u8) -> ([u8; 160], u64) {
        let mut p = [0u8; 160];
        p[0] = 0x60;
        p[6] = exts.first().map(|e| e.0).unwrap_or(last);
        p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        let mut off = 40;
        for (i, (_, body)) in exts.iter().enumerate() {
            let next = exts.get(i + 1).map(|e| e.0).unwrap_or(last);
            p[off] = next;
            p[off + 1..off + body.len()].copy_from_slice(&body[1..]);
            off += body.len();
        }
        p[off..off + 20].copy_from_slice(&tcp_hdr(50000, 2484, 0x12));
        (p, BASE + off as u64)
    }

    #[test]
    fn ipv6_plain_and_with_extension_headers() {
        let (p, th) = ipv6(&[], IPPROTO_TCP);
        let pkt = parse_tcp(&Bytes(&p), BASE, ETH_P_IPV6).unwrap().unwrap();
        assert_eq!(pkt.flow.family, AF_INET6);
        assert_eq!(pkt.flow.daddr[15], 2);
        assert_eq!(
            (pkt.flow.sport, pkt.flow.dport, pkt.flags),
            (50000, 2484, 0x12)
        );
        assert_eq!(pkt.tcp_header, th);

        // hop-by-hop (8 bytes, hdr ext len 0) then a first fragment.
        let hbh = [0u8, 0, 0, 0, 0, 0, 0, 0];
        let frag = [0u8, 0, 0, 0, 0, 0, 0, 1];
        let (p, th) = ipv6(&[(0, &hbh), (44, &frag)], IPPROTO_TCP);
        let pkt = parse_tcp(&Bytes(&p), BASE, ETH_P_IPV6).unwrap().unwrap();
        assert_eq!(pkt.tcp_header, th);
        assert_eq!(pkt.flow.dport, 2484);
    }

    #[test]
    fn ipv6_later_fragment_and_udp_are_skipped() {
        let frag = [0u8, 0, 0x01, 0x00, 0, 0, 0, 1]; // offset 32
        let (p, _) = ipv6(&[(44, &frag)], IPPROTO_TCP);
        assert_eq!(parse_tcp(&Bytes(&p), BASE, ETH_P_IPV6), Ok(None));
        let (p, _) = ipv6(&[], 17);
        assert_eq!(parse_tcp(&Bytes(&p), BASE, ETH_P_IPV6), Ok(None));
    }
}
