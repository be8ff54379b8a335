//! skb:kfree_skb: every freed-with-a-reason skb. Keeps TCP packets of watched flows, with the
//! conntrack entry they carried.
//!
//! Two entry points for the one handler: `kfree_skb_btf` (BTF tracepoint, where the kernel's
//! BTF describes the tracepoint's arguments with a reason: skb, location and reason are the
//! hook's own arguments, no trace record is built and no record field is copied) and
//! `kfree_skb` (the classic tracepoint, reading its record at offsets from tracefs: kernels
//! without a reason or without BTF for the hook). Userspace attaches one of them.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::{btf_tracepoint, tracepoint},
    programs::{BtfTracePointContext, TracePointContext},
};
use aya_log_ebpf::warn;
use tracer_common::{
    ABSENT, DropAgg, DropEvent, DropKey, Flow, SKB_HDR_WINDOW, STORM_SAMPLE_EVERY, StormSample,
    counter, kind,
};

use crate::{
    conntrack,
    kmem::{at, field, net_inum, read},
    maps::{self, SKB_LAYOUT as L, ro},
    packet,
    tcp_state::header,
};

#[tracepoint]
pub(crate) fn kfree_skb(ctx: TracePointContext) -> u32 {
    if try_kfree_skb(&ctx).is_err() {
        maps::count(counter::SKB_UNREADABLE);
    }
    0
}

fn try_kfree_skb(ctx: &TracePointContext) -> Result<(), i64> {
    if ro(&L.valid) == 0 {
        warn!(ctx, "droptrace: kernel layout not set; nothing traced");
        return Ok(());
    }
    let skb: u64 = field(ctx, ro(&L.tp_skbaddr))?;
    let protocol: u16 = field(ctx, ro(&L.tp_protocol))?;
    on_drop(skb, protocol, || {
        let location: u64 = field(ctx, ro(&L.tp_location))?;
        let reason_off = ro(&L.tp_reason);
        // Kernels before 5.17 have no reason: ABSENT tells userspace (it classes by location).
        let reason: u32 = if reason_off == ABSENT {
            ABSENT
        } else {
            field(ctx, reason_off)?
        };
        Ok((location, reason))
    })
}

/// `trace_kfree_skb(skb, location, reason, ...)` as a BTF tracepoint: attached only where
/// the kernel's BTF gives the hook those three arguments first.
#[btf_tracepoint(function = "kfree_skb")]
pub(crate) fn kfree_skb_btf(ctx: BtfTracePointContext) -> u32 {
    if try_kfree_skb_btf(&ctx).is_err() {
        maps::count(counter::SKB_UNREADABLE);
    }
    0
}

fn try_kfree_skb_btf(ctx: &BtfTracePointContext) -> Result<(), i64> {
    if ro(&L.valid) == 0 {
        return Ok(());
    }
    let skb: u64 = ctx.arg(0);
    maps::count(counter::SKB_SEEN);
    let (protocol, head, nh) = skb_headers(skb)?;
    on_packet(skb, protocol, head, nh, || {
        let location: u64 = ctx.arg(1);
        let reason: u32 = ctx.arg::<u64>(2) as u32;
        Ok((location, reason))
    })
}

/// One freed skb: `where_why` gives (location, reason), read only for packets of watched
/// flows.
#[inline(always)]
fn on_drop(
    skb: u64,
    protocol: u16,
    where_why: impl FnOnce() -> Result<(u64, u32), i64>,
) -> Result<(), i64> {
    maps::count(counter::SKB_SEEN);
    let head: u64 = read(at(skb, ro(&L.skb_head)))?;
    let nh: u16 = read(at(skb, ro(&L.skb_network_header)))?;
    on_packet(skb, protocol, head, nh, where_why)
}

/// skb->protocol (host order), skb->head and skb->network_header: one read of the window
/// that holds all three where the layout has one, else three.
#[inline(always)]
fn skb_headers(skb: u64) -> Result<(u16, u64, u16), i64> {
    let win = ro(&L.skb_hdr_window);
    if win == ABSENT {
        // skb->protocol is network order; the classic record holds it in host order.
        let protocol: u16 = u16::from_be(read(at(skb, ro(&L.skb_protocol)))?);
        let head: u64 = read(at(skb, ro(&L.skb_head)))?;
        let nh: u16 = read(at(skb, ro(&L.skb_network_header)))?;
        return Ok((protocol, head, nh));
    }
    let w: [u8; SKB_HDR_WINDOW as usize] = read(at(skb, win))?;
    // Offsets inside the window, bounded for the verifier (userspace checked they fit).
    let rel = |off: u32, size: usize| (off.wrapping_sub(win) as usize).min(w.len() - size);
    let p = rel(ro(&L.skb_protocol), 2);
    let n = rel(ro(&L.skb_network_header), 2);
    let h = rel(ro(&L.skb_head), 8);
    let protocol = u16::from_be_bytes([w[p], w[p + 1]]);
    let nh = u16::from_ne_bytes([w[n], w[n + 1]]);
    let head = u64::from_ne_bytes([
        w[h],
        w[h + 1],
        w[h + 2],
        w[h + 3],
        w[h + 4],
        w[h + 5],
        w[h + 6],
        w[h + 7],
    ]);
    Ok((protocol, head, nh))
}

/// A freed skb's headers: a TCP packet of a watched flow is counted or recorded.
#[inline(always)]
fn on_packet(
    skb: u64,
    protocol: u16,
    head: u64,
    nh: u16,
    where_why: impl FnOnce() -> Result<(u64, u32), i64>,
) -> Result<(), i64> {
    if head == 0 || nh == u16::MAX {
        return Ok(());
    }
    let Some(pkt) = packet::parse_tcp(head + nh as u64, protocol)? else {
        return Ok(());
    };
    // After DNAT the packet carries the pod address; the original tuple still names the
    // watched service port.
    let redirected = if maps::flow_watched(&pkt.flow) || conntrack::original_port_watched(skb) {
        0
    } else if redirected_syn(&pkt) {
        1
    } else {
        return Ok(());
    };

    let (location, reason) = where_why()?;
    // SAFETY: bpf_ktime_get_ns takes nothing and cannot fail.
    let now = unsafe { bpf_ktime_get_ns() };

    // Aggregate: only the first drop of a (flow, reason, location) gets a record; repeats are
    // counted in place and flushed by userspace.
    let mut key = DropKey {
        flow: pkt.flow,
        reason,
        _pad: 0,
        location,
    };
    if add_repeat(&key, now).is_some() {
        return Ok(());
    }
    if !maps::new_flow_allowed(now) {
        // A storm of distinct flows (rotating ports, random source addresses): fold it into
        // one aggregate per destination by zeroing the other end, address and port, so
        // records stay bounded whatever the sources and the counts stay exact.
        let flow = key.flow;
        fold_other_end(&mut key);
        maps::count(counter::STORM_FOLDED);
        if let Some(n) = add_repeat(&key, now) {
            if n % STORM_SAMPLE_EVERY as u64 == 0 {
                sample(&key, &flow, now);
            }
            return Ok(());
        }
    }
    let (ifindex, netns) = device_and_netns(skb);
    let fresh = DropAgg {
        repeats: 0,
        last_ns: now,
        netns,
        ifindex,
        tcp_flags: pkt.flags,
        redirected,
        _pad: [0; 6],
    };
    const BPF_NOEXIST: u64 = 1;
    if maps::DROP_AGG.insert(key, fresh, BPF_NOEXIST).is_err() {
        // Another CPU inserted it first: count there. Map full: a record of its own.
        if add_repeat(&key, now).is_some() {
            return Ok(());
        }
        maps::count(counter::AGG_FULL);
    }

    let Some(mut entry) = maps::EVENTS.reserve::<DropEvent>(0) else {
        // Not lost while the aggregation entry exists: the next flush reports it.
        if add_repeat(&key, now).is_none() {
            maps::count(counter::RINGBUF_FULL);
        }
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable record of the right size.
    unsafe {
        (*ev).hdr = header(kind::DROP);
        (*ev).hdr.ts_ns = now;
        (*ev).location = location;
        (*ev).flow = key.flow;
        (*ev).reason = reason;
        (*ev).len = read(at(skb, ro(&L.skb_len))).unwrap_or(0);
        (*ev).ifindex = ifindex;
        (*ev).netns = netns;
        (*ev).tcp_flags = pkt.flags;
        (*ev).redirected = redirected;
        (*ev)._pad = [0; 2];
        (*ev).count = 1;
        conntrack::of_skb(skb, &mut (*ev).ct);
    }
    entry.submit(maps::wakeup_flags());
    Ok(())
}

/// A connect's SYN (no ACK) from a client a watched listener has just REDIRECTed: the first
/// SYN toward the target, which userspace may not have learned yet. Userspace keeps those to
/// a learned target and ignores the rest.
#[inline(always)]
fn redirected_syn(pkt: &packet::TcpPacket) -> bool {
    const SYN: u8 = 0x02;
    const ACK: u8 = 0x10;
    pkt.flags & (SYN | ACK) == SYN && maps::redirected_client(pkt.flow.family, &pkt.flow.saddr)
}

/// Zeroes the end that is not the service's, address and port: the end whose port is not
/// watched, or the one with the higher port when that does not tell.
#[inline(always)]
fn fold_other_end(key: &mut DropKey) {
    let f = &mut key.flow;
    let s_watched = maps::port_watched_strict(f.sport);
    let d_watched = maps::port_watched_strict(f.dport);
    if d_watched && !s_watched || (d_watched == s_watched && f.sport >= f.dport) {
        f.sport = 0;
        f.saddr = [0; 16];
    } else {
        f.dport = 0;
        f.daddr = [0; 16];
    }
}

/// The real tuple of one folded drop, so userspace can name a flood's top sources. Best
/// effort: a full ring buffer only costs a sample.
#[inline(always)]
fn sample(key: &DropKey, flow: &Flow, now: u64) {
    if let Some(mut entry) = maps::EVENTS.reserve::<StormSample>(0) {
        let ev = entry.as_mut_ptr();
        // SAFETY: `ev` points at a reserved, writable record of the right size.
        unsafe {
            (*ev).hdr = header(kind::STORM_SAMPLE);
            (*ev).hdr.ts_ns = now;
            (*ev).folded = key.flow;
            (*ev).flow = *flow;
        }
        entry.submit(maps::wakeup_flags());
    }
}

/// Counts one more drop into an existing aggregation entry: this CPU's count of it so far,
/// or None when there is no entry.
#[inline(always)]
fn add_repeat(key: &DropKey, now: u64) -> Option<u64> {
    let agg = maps::DROP_AGG.get_ptr_mut(key)?;
    // SAFETY: this CPU's slot of a per-CPU map value, valid for this program run; no other
    // CPU writes it, so a plain add is exact.
    let n = unsafe {
        (*agg).repeats += 1;
        (*agg).last_ns = now;
        (*agg).repeats
    };
    maps::count(counter::AGG_MERGED);
    Some(n)
}

/// ifindex and netns inode of skb->dev; without a device (early local output) the netns of
/// skb->sk.
#[inline(always)]
fn device_and_netns(skb: u64) -> (u32, u32) {
    let dev: u64 = read(at(skb, ro(&L.skb_dev))).unwrap_or(0);
    if dev != 0 {
        let ifindex: u32 = read(at(dev, ro(&L.dev_ifindex))).unwrap_or(0);
        let net: u64 = read(at(dev, ro(&L.dev_nd_net))).unwrap_or(0);
        return (ifindex, net_inum(net, ro(&L.net_inum)));
    }
    let sk: u64 = read(at(skb, ro(&L.skb_sk))).unwrap_or(0);
    if sk == 0 {
        return (0, 0);
    }
    let net: u64 = read(at(sk, ro(&L.sk_net))).unwrap_or(0);
    (0, net_inum(net, ro(&L.net_inum)))
}
