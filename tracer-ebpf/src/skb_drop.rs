//! skb:kfree_skb: every freed-with-a-reason skb. Keeps TCP packets on watched ports.
use aya_ebpf::{
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::tracepoint,
    programs::TracePointContext,
};
use aya_log_ebpf::warn;
use tracer_common::{ABSENT, DropEvent, EventHeader, SkbLayout, counter, kind};

use crate::{maps, packet};

#[tracepoint]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    match try_kfree_skb(&ctx) {
        Ok(()) => 0,
        Err(_) => {
            maps::count(counter::SKB_UNREADABLE);
            0
        }
    }
}

#[inline(always)]
unsafe fn kread<T>(addr: u64) -> Result<T, i64> {
    unsafe { bpf_probe_read_kernel(addr as *const T).map_err(|e| e as i64) }
}

/// Offsets are masked so the verifier can bound the pointer arithmetic.
#[inline(always)]
fn at(base: u64, off: u32) -> u64 {
    base + (off & 0xffff) as u64
}

fn try_kfree_skb(ctx: &TracePointContext) -> Result<(), i64> {
    let layout = maps::skb_layout();
    if layout.valid == 0 {
        warn!(ctx, "droptrace: kernel layout not set; nothing traced");
        return Ok(());
    }
    maps::count(counter::SKB_SEEN);

    let skb: u64 = unsafe { ctx.read_at(layout.tp_skbaddr as usize & 0xfff).map_err(|e| e as i64)? };
    let protocol: u16 = unsafe { ctx.read_at(layout.tp_protocol as usize & 0xfff).map_err(|e| e as i64)? };
    let head: u64 = unsafe { kread(at(skb, layout.skb_head))? };
    let nh: u16 = unsafe { kread(at(skb, layout.skb_network_header))? };
    if head == 0 || nh == u16::MAX {
        return Ok(());
    }
    let Some(pkt) = packet::parse_tcp(head + nh as u64, protocol)? else {

        return Ok(());
    };
    if !maps::port_watched(pkt.flow.sport, pkt.flow.dport) {
        return Ok(());
    }

    let location: u64 = unsafe { ctx.read_at(layout.tp_location as usize & 0xfff).map_err(|e| e as i64)? };
    let reason: u32 = if layout.tp_reason == ABSENT {
        0
    } else {
        unsafe { ctx.read_at(layout.tp_reason as usize & 0xfff).map_err(|e| e as i64)? }
    };
    let len: u32 = unsafe { kread(at(skb, layout.skb_len)).unwrap_or(0) };
    let (ifindex, netns) = device_and_netns(skb, &layout);

    let Some(mut entry) = maps::EVENTS.reserve::<DropEvent>(0) else {
        maps::count(counter::RINGBUF_FULL);
        return Ok(());
    };
    entry.write(DropEvent {
        hdr: EventHeader {
            kind: kind::DROP,
            _pad: [0; 3],
            cpu: unsafe { bpf_get_smp_processor_id() },
            ts_ns: unsafe { bpf_ktime_get_ns() },
        },
        location,
        flow: pkt.flow,
        reason,
        len,
        netns,
        ifindex,
        tcp_flags: pkt.flags,
        _pad: [0; 3],
        count: 1,
    });
    entry.submit(0);
    Ok(())
}

/// ifindex and netns inode of skb->dev; without a device (early local output) the netns of
/// skb->sk.
#[inline(always)]
fn device_and_netns(skb: u64, l: &SkbLayout) -> (u32, u32) {
    let dev: u64 = unsafe { kread(at(skb, l.skb_dev)).unwrap_or(0) };
    let (ifindex, net) = if dev != 0 {
        let ifindex: u32 = unsafe { kread(at(dev, l.dev_ifindex)).unwrap_or(0) };
        let net: u64 = unsafe { kread(at(dev, l.dev_nd_net)).unwrap_or(0) };
        (ifindex, net)
    } else {
        let sk: u64 = unsafe { kread(at(skb, l.skb_sk)).unwrap_or(0) };
        let net: u64 = if sk != 0 {
            unsafe { kread(at(sk, l.sk_net)).unwrap_or(0) }
        } else {
            0
        };
        (0, net)
    };
    let netns: u32 = if net != 0 {
        unsafe { kread(at(net, l.net_inum)).unwrap_or(0) }
    } else {
        0
    };
    (ifindex, netns)
}
