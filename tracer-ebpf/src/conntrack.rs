//! Conntrack: the entry attached to a dropped skb (NAT tuples, state), and removals of entries
//! that never saw a reply (fentry on nf_ct_delete, found through BTF), for flows whose SYN left this node and
//! vanished further along.
use aya_ebpf::{
    macros::{fentry, kprobe},
    programs::{FEntryContext, ProbeContext},
};
use tracer_common::{
    ABSENT, AF_INET, AF_INET6, CtEvent, CtInfo, CtTuple, IPPROTO_TCP, counter, kind,
};

use crate::{
    kmem::{at, net_inum, read},
    maps::{self, CT_LAYOUT as L, ro},
    tcp_state::header,
};

/// ctinfo value that marks an untracked skb (nfct holds no entry pointer).
const IP_CT_UNTRACKED: u8 = 7;

#[inline(always)]
fn tuple(base: u64, family: u8, t: &mut CtTuple) -> Result<(), i64> {
    t.sport = u16::from_be(read(at(base, ro(&L.src_port)))?);
    t.dport = u16::from_be(read(at(base, ro(&L.dst_port)))?);
    t._pad = 0;
    t.saddr = [0; 16];
    t.daddr = [0; 16];
    if family == AF_INET6 {
        t.saddr = read(at(base, ro(&L.src_u3)))?;
        t.daddr = read(at(base, ro(&L.dst_u3)))?;
    } else {
        let s: [u8; 4] = read(at(base, ro(&L.src_u3)))?;
        let d: [u8; 4] = read(at(base, ro(&L.dst_u3)))?;
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
    }
    Ok(())
}

/// Address of the original-direction tuple of `struct nf_conn *ct`.
#[inline(always)]
fn original_tuple(ct: u64) -> u64 {
    at(ct, ro(&L.ct_tuplehash)) + (ro(&L.hash_tuple) & 0xff) as u64
}

/// Fills `out` from `struct nf_conn *ct`. `ctinfo` is the skb's (0 for removals).
#[inline(always)]
fn read_ct(ct: u64, ctinfo: u8, out: &mut CtInfo) -> Result<(), i64> {
    let orig = original_tuple(ct);
    let reply = orig + (ro(&L.tuplehash_size) & 0xff) as u64;
    let l3num: u16 = read(at(orig, ro(&L.src_l3num)))?;
    let family = if l3num == AF_INET6 as u16 {
        AF_INET6
    } else {
        AF_INET
    };
    out.present = 1;
    out.ctinfo = ctinfo;
    out.family = family;
    out.protonum = read(at(orig, ro(&L.dst_protonum)))?;
    out.status = read(at(ct, ro(&L.ct_status)))?;
    let mark = ro(&L.ct_mark);
    out.mark = if mark == ABSENT {
        0
    } else {
        read(at(ct, mark)).unwrap_or(0)
    };
    let zone = ro(&L.ct_zone_id);
    out.zone = if zone == ABSENT {
        0
    } else {
        read(at(ct, zone)).unwrap_or(0)
    };
    out._pad = [0; 6];
    tuple(orig, family, &mut out.original)?;
    tuple(reply, family, &mut out.reply)
}

/// skb->_nfct split into the entry pointer and ctinfo.
#[inline(always)]
fn nfct(skb: u64) -> (u64, u8) {
    let nfct: u64 = read(at(skb, ro(&L.skb_nfct))).unwrap_or(0);
    (nfct & !7, (nfct & 7) as u8)
}

/// Fills `out` with the conntrack entry of a dropped skb (present = 0 when it has none).
#[inline(always)]
pub(crate) fn of_skb(skb: u64, out: &mut CtInfo) {
    *out = CtInfo::default();
    if ro(&L.valid) == 0 {
        return;
    }
    let (ct, ctinfo) = nfct(skb);
    out.ctinfo = ctinfo;
    if ctinfo == IP_CT_UNTRACKED || ct == 0 || read_ct(ct, ctinfo, out).is_err() {
        out.present = 0;
    }
}

/// Whether the skb's original-direction tuple (before DNAT) is on a watched port.
#[inline(always)]
pub(crate) fn original_port_watched(skb: u64) -> bool {
    if ro(&L.valid) == 0 {
        return false;
    }
    let (ct, ctinfo) = nfct(skb);
    if ct == 0 || ctinfo == IP_CT_UNTRACKED {
        return false;
    }
    let orig = original_tuple(ct);
    let sport: u16 = read(at(orig, ro(&L.src_port))).unwrap_or(0);
    let dport: u16 = read(at(orig, ro(&L.dst_port))).unwrap_or(0);
    maps::port_watched(u16::from_be(sport), u16::from_be(dport))
}

#[fentry(function = "nf_ct_delete")]
pub(crate) fn nf_ct_delete(ctx: FEntryContext) -> u32 {
    if try_nf_ct_delete(ctx.arg(0)).is_err() {
        maps::count(counter::TCP_UNREADABLE);
    }
    0
}

/// The same, where conntrack is a module (fentry there needs the module's BTF object).
#[kprobe]
pub(crate) fn nf_ct_delete_kprobe(ctx: ProbeContext) -> u32 {
    let Some(ct) = ctx.arg::<u64>(0) else {
        maps::count(counter::TCP_UNREADABLE);
        return 0;
    };
    if try_nf_ct_delete(ct).is_err() {
        maps::count(counter::TCP_UNREADABLE);
    }
    0
}

fn try_nf_ct_delete(ct: u64) -> Result<(), i64> {
    if ro(&L.valid) == 0 || ct == 0 {
        return Ok(());
    }
    let orig = original_tuple(ct);
    let protonum: u8 = read(at(orig, ro(&L.dst_protonum)))?;
    let status: u64 = read(at(ct, ro(&L.ct_status)))?;
    if protonum != IPPROTO_TCP || status & ro(&L.seen_reply_mask) as u64 != 0 {
        return Ok(());
    }
    let sport: u16 = u16::from_be(read(at(orig, ro(&L.src_port)))?);
    let dport: u16 = u16::from_be(read(at(orig, ro(&L.dst_port)))?);
    if !maps::port_watched(sport, dport) {
        return Ok(());
    }
    let Some(mut entry) = maps::EVENTS.reserve::<CtEvent>(0) else {
        maps::count(counter::RINGBUF_FULL);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable record of the right size.
    let ok = unsafe {
        (*ev).hdr = header(kind::CT_UNREPLIED);
        let net: u64 = read(at(ct, ro(&L.ct_net))).unwrap_or(0);
        (*ev).netns = net_inum(net, ro(&L.net_inum));
        (*ev)._pad = 0;
        read_ct(ct, 0, &mut (*ev).ct).is_ok()
    };
    if ok {
        entry.submit(maps::wakeup_flags());
    } else {
        entry.discard(0);
        maps::count(counter::TCP_UNREADABLE);
    }
    Ok(())
}
