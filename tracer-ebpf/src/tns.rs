//! Oracle Net (TNS) packets on watched flows, from cgroup_skb programs attached to the cgroup
//! v2 root: one attach point sees every local socket in every network namespace (pods
//! included), without a tc program per interface. Only the handshake packets are copied,
//! bounded to TNS_CAPTURE bytes: CONNECT, ACCEPT, REFUSE, REDIRECT, RESEND, and the one DATA
//! packet that carries a REDIRECT address or a CONNECT descriptor too long for the CONNECT.
use aya_ebpf::{helpers::bpf_skb_load_bytes, macros::cgroup_skb, programs::SkBuffContext};
use tracer_common::{
    Flow, TNS_CAPTURE, TnsEvent, counter, kind,
    packet::{Reader, parse_tcp},
    tns,
};

use crate::{maps, tcp_state::header};

const INGRESS: u32 = 0;
const EGRESS: u32 = 1;
/// cgroup_skb verdict: let the packet through (we only look).
const PASS: i32 = 1;

#[cgroup_skb(ingress)]
pub(crate) fn tns_ingress(ctx: SkBuffContext) -> i32 {
    if ports_of_interest(&ctx) && try_tns(&ctx, INGRESS).is_err() {
        maps::count(counter::TNS_UNREADABLE);
    }
    PASS
}

#[cgroup_skb(egress)]
pub(crate) fn tns_egress(ctx: SkBuffContext) -> i32 {
    if ports_of_interest(&ctx) && try_tns(&ctx, EGRESS).is_err() {
        maps::count(counter::TNS_UNREADABLE);
    }
    PASS
}

/// Every packet of every local socket passes here: reject by the socket's ports, in the
/// program itself (no call), before reading any packet byte. local_port is host order;
/// remote_port holds the network-order port in its upper 16 bits on little-endian machines
/// (the kernel's context rewrite). Ports learned at run time (TNS redirects) are in the same
/// port array, so they pass too.
#[inline(always)]
fn ports_of_interest(ctx: &SkBuffContext) -> bool {
    // SAFETY: the context pointer of a cgroup_skb program.
    let (local, remote) = unsafe {
        let skb = ctx.skb.skb;
        (
            (*skb).local_port as u16,
            u16::from_be(((*skb).remote_port >> 16) as u16),
        )
    };
    maps::any_port_of_interest(local, remote)
}

/// Packet bytes by offset from the network header (where cgroup_skb data starts).
struct Packet<'a>(&'a SkBuffContext);

impl Reader for Packet<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, off: u64) -> Result<[u8; N], i64> {
        let mut buf = [0u8; N];
        // SAFETY: the helper writes at most N bytes into `buf`, which holds N, and checks the
        // packet bounds itself.
        let ret = unsafe {
            bpf_skb_load_bytes(
                self.0.skb.skb.cast(),
                off as u32,
                buf.as_mut_ptr().cast(),
                N as u32,
            )
        };
        if ret == 0 { Ok(buf) } else { Err(ret) }
    }
}

/// A packet of a socket with a port of interest: the TNS handshake packets of watched flows.
#[inline(never)]
fn try_tns(ctx: &SkBuffContext, direction: u32) -> Result<(), i64> {
    let p = Packet(ctx);
    let Some(pkt) = parse_tcp(&p, 0, 0)? else {
        return Ok(());
    };
    if !maps::flow_watched(&pkt.flow) {
        return Ok(());
    }
    let payload = pkt.tcp_header + pkt.data_offset as u64;
    let len = ctx.len() as u64;
    if payload + 8 > len {
        return Ok(()); // no TNS header here (handshake, bare ACK)
    }
    let tns_header = p.read::<8>(payload)?;
    let ty = tns_header[4];
    let wanted = match ty {
        tns::CONNECT => {
            // The descriptor follows in a DATA packet when it does not fit (> 230 bytes).
            let c = p.read::<28>(payload)?;
            let packet_len = u16::from_be_bytes([c[0], c[1]]) as u32;
            let data_len = u16::from_be_bytes([c[24], c[25]]) as u32;
            let data_off = u16::from_be_bytes([c[26], c[27]]) as u32;
            if data_len > 0 && data_off + data_len > packet_len {
                expect_data(&pkt.flow);
            }
            true
        }
        tns::REDIRECT => {
            // Real listeners send the address in the next DATA packet.
            expect_data(&pkt.flow);
            // The receiver dials the target as soon as it has read it, maybe before userspace
            // has: keep its SYNs until the target is watched (seen here at the listener's
            // egress and at the client's ingress; both name the client as destination).
            maps::mark_redirected(pkt.flow.family, &pkt.flow.daddr);
            true
        }
        tns::ACCEPT | tns::REFUSE | tns::RESEND => true,
        tns::DATA => take_expected_data(&pkt.flow),
        _ => false,
    };
    if !wanted {
        return Ok(());
    }
    let seq = p.read::<8>(pkt.tcp_header)?;
    let payload_len = (len - payload) as u32;
    if payload_len == 0 {
        return Ok(());
    }
    let captured = if payload_len as usize > TNS_CAPTURE {
        TNS_CAPTURE as u32
    } else {
        payload_len
    };

    let Some(mut entry) = maps::EVENTS.reserve::<TnsEvent>(0) else {
        maps::count(counter::RINGBUF_FULL);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable record of the right size; the copy length
    // is checked against the buffer size right here, where the verifier sees it.
    let copied = unsafe {
        (*ev).hdr = header(kind::TNS);
        (*ev).flow = pkt.flow;
        (*ev).seq = u32::from_be_bytes([seq[4], seq[5], seq[6], seq[7]]);
        (*ev).payload_len = payload_len;
        (*ev).direction = direction;
        // In [1, TNS_CAPTURE] by construction, which the verifier can follow.
        let n = (captured.wrapping_sub(1) & (TNS_CAPTURE as u32 - 1)) + 1;
        (*ev).captured = n;
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            payload as u32,
            (&raw mut (*ev).data).cast(),
            n,
        )
    };
    if copied == 0 {
        // Wake userspace now: a REDIRECT's target must be watched before the client's next
        // SYN leaves.
        const BPF_RB_FORCE_WAKEUP: u64 = 2;
        entry.submit(BPF_RB_FORCE_WAKEUP);
    } else {
        entry.discard(0);
        maps::count(counter::TNS_UNREADABLE);
    }
    Ok(())
}

#[inline(always)]
fn expect_data(flow: &Flow) {
    let _ = maps::TNS_EXPECT_DATA.insert(flow, 1u32, 0);
}

#[inline(always)]
fn take_expected_data(flow: &Flow) -> bool {
    if maps::TNS_EXPECT_DATA.get_ptr(flow).is_some() {
        let _ = maps::TNS_EXPECT_DATA.remove(flow);
        true
    } else {
        false
    }
}
