//! Bounded reads of IPv4/IPv6 + TCP headers out of an skb's linear data.
//!
//! Headers are read with bpf_probe_read_kernel from `skb->head + skb->network_header`, so the
//! same code works at every drop point (netfilter, tc, the TCP stack) without relying on
//! `transport_header`, which is unset early in the receive path.
use aya_ebpf::helpers::bpf_probe_read_kernel;
use tracer_common::{AF_INET, AF_INET6, Flow, IPPROTO_TCP};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

/// Parsed TCP/IP headers.
pub struct TcpPacket {
    pub flow: Flow,
    pub flags: u8,
}

#[inline(always)]
unsafe fn read<T>(addr: u64) -> Result<T, i64> {
    unsafe { bpf_probe_read_kernel(addr as *const T).map_err(|e| e as i64) }
}

/// `protocol` is skb->protocol as the tracepoint records it (ntohs: host byte order);
/// locally generated packets may carry 0, in which case the IP version nibble decides.
#[inline(always)]
pub fn parse_tcp(ip: u64, protocol: u16) -> Result<Option<TcpPacket>, i64> {
    let first: u8 = unsafe { read(ip)? };
    let version = first >> 4;
    match protocol {
        ETH_P_IP => parse_v4(ip),
        ETH_P_IPV6 => parse_v6(ip),
        0 if version == 4 => parse_v4(ip),
        0 if version == 6 => parse_v6(ip),
        _ => Ok(None),
    }
}

#[inline(always)]
fn parse_v4(ip: u64) -> Result<Option<TcpPacket>, i64> {
    let hdr: [u8; 20] = unsafe { read(ip)? };
    if hdr[0] >> 4 != 4 || hdr[9] != IPPROTO_TCP {
        return Ok(None);
    }
    let ihl = ((hdr[0] & 0x0f) as u64) * 4;
    // Only the first fragment carries the TCP header.
    let frag_off = u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff;
    if ihl < 20 || frag_off != 0 {
        return Ok(None);
    }
    let mut flow = Flow {
        family: AF_INET,
        proto: IPPROTO_TCP,
        ..Flow::default()
    };
    flow.saddr[..4].copy_from_slice(&hdr[12..16]);
    flow.daddr[..4].copy_from_slice(&hdr[16..20]);
    tcp(ip + (ihl & 0x3c), flow).map(Some)
}

const IPV6_MAX_EXT_HEADERS: usize = 4;

#[inline(always)]
fn parse_v6(ip: u64) -> Result<Option<TcpPacket>, i64> {
    let hdr: [u8; 40] = unsafe { read(ip)? };
    if hdr[0] >> 4 != 6 {
        return Ok(None);
    }
    let mut next = hdr[6];
    let mut off: u64 = 40;
    // Skip a bounded number of extension headers (hop-by-hop, routing, fragment, dest opts).
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            0 | 43 | 60 => {
                let ext: [u8; 2] = unsafe { read(ip + off)? };
                next = ext[0];
                off += (ext[1] as u64 + 1) * 8;
            }
            44 => {
                let ext: [u8; 4] = unsafe { read(ip + off)? };
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
    tcp(ip + (off & 0x7ff), flow).map(Some)
}

#[inline(always)]
fn tcp(th: u64, mut flow: Flow) -> Result<TcpPacket, i64> {
    // Ports, sequence, ack, data offset, flags: the first 14 bytes.
    let hdr: [u8; 14] = unsafe { read(th)? };
    flow.sport = u16::from_be_bytes([hdr[0], hdr[1]]);
    flow.dport = u16::from_be_bytes([hdr[2], hdr[3]]);
    Ok(TcpPacket {
        flow,
        flags: hdr[13],
    })
}
