//! sock:inet_sock_set_state: connect attempts and their outcome. At SYN_SENT the current task
//! is the socket's owner (connect() runs in process context); later transitions run in softirq
//! or timer context, so the owner is remembered per socket in OWNERS.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_current_cgroup_id, bpf_get_smp_processor_id, bpf_ktime_get_ns},
    macros::tracepoint,
    programs::TracePointContext,
};
use tracer_common::{EventHeader, Flow, IPPROTO_TCP, Owner, StateEvent, counter, kind};

use crate::{
    kmem::{at, field, net_inum, read, tuple},
    maps::{self, TCP_LAYOUT as L, ro},
};

#[tracepoint]
pub(crate) fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    if try_inet_sock_set_state(&ctx).is_err() {
        maps::count(counter::TCP_UNREADABLE);
    }
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i64> {
    if ro(&L.valid) == 0 {
        return Ok(());
    }
    let protocol: u16 = field(ctx, ro(&L.st_protocol))?;
    if protocol != IPPROTO_TCP as u16 {
        return Ok(());
    }
    let mut flow = Flow::default();
    tuple(ctx, &L.st, &mut flow)?;
    let sk: u64 = field(ctx, ro(&L.st_skaddr))?;
    let oldstate: i32 = field(ctx, ro(&L.st_oldstate))?;
    let newstate: i32 = field(ctx, ro(&L.st_newstate))?;
    if !maps::flow_watched(&flow) {
        // Remember every connecting process anyway: the destination may become watched a
        // moment later (an Oracle REDIRECT target learned in userspace), and its retransmits
        // then still name the process.
        if newstate as u32 == ro(&L.syn_sent) {
            let owner = Owner {
                pid: ctx.pid(),
                tgid: ctx.tgid(),
                // SAFETY: takes nothing and cannot fail.
                cgroup_id: unsafe { bpf_get_current_cgroup_id() },
                comm: ctx.command().unwrap_or([0; 16]),
            };
            let _ = maps::OWNERS.insert(sk, owner, 0);
        } else if newstate as u32 == ro(&L.close) {
            let _ = maps::OWNERS.remove(sk);
        }
        return Ok(());
    }

    let Some(mut entry) = maps::EVENTS.reserve::<StateEvent>(0) else {
        maps::count(counter::RINGBUF_FULL);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable record of the right size.
    unsafe {
        (*ev).hdr = header(kind::STATE);
        (*ev).sk = sk;
        (*ev).flow = flow;
        (*ev).oldstate = oldstate as u32;
        (*ev).newstate = newstate as u32;
        (*ev).sk_err = read(at(sk, ro(&L.sk_err))).unwrap_or(0);
        let net: u64 = read(at(sk, ro(&L.sk_net))).unwrap_or(0);
        (*ev).netns = net_inum(net, ro(&L.net_inum));
        (*ev)._pad = 0;
        if newstate as u32 == ro(&L.syn_sent) {
            (*ev).owner = Owner {
                pid: ctx.pid(),
                tgid: ctx.tgid(),
                cgroup_id: bpf_get_current_cgroup_id(),
                comm: ctx.command().unwrap_or([0; 16]),
            };
            (*ev).has_owner = 1;
            let _ = maps::OWNERS.insert(sk, (*ev).owner, 0);
        } else if let Some(owner) = maps::OWNERS.get(sk) {
            (*ev).owner = *owner;
            (*ev).has_owner = 1;
        } else {
            (*ev).owner = Owner::default();
            (*ev).has_owner = 0;
        }
    }
    if newstate as u32 == ro(&L.close) {
        let _ = maps::OWNERS.remove(sk);
    }
    entry.submit(maps::wakeup_flags());
    Ok(())
}

#[inline(always)]
pub(crate) fn header(kind: u8) -> EventHeader {
    EventHeader {
        kind,
        _pad: [0; 3],
        // SAFETY: both helpers take nothing and cannot fail.
        cpu: unsafe { bpf_get_smp_processor_id() },
        // SAFETY: as above.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    }
}
