//! tcp:tcp_retransmit_skb: SYN retransmits of a stalled connect and data retransmits of an
//! established flow that stopped making progress.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tracer_common::{ABSENT, Flow, Owner, RetransmitEvent, counter, kind};

use crate::{
    kmem::{at, field, net_inum, read, tuple_of_family},
    maps::{self, TCP_LAYOUT as L, ro},
    tcp_state::header,
};

#[tracepoint]
pub(crate) fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    if try_tcp_retransmit_skb(&ctx).is_err() {
        maps::count(counter::TCP_UNREADABLE);
    }
    0
}

fn try_tcp_retransmit_skb(ctx: &TracePointContext) -> Result<(), i64> {
    if ro(&L.valid) == 0 {
        return Ok(());
    }
    let sk: u64 = field(ctx, ro(&L.rt_skaddr))?;
    // Before 5.13 the record has no `family`: the socket's own says which addresses to read.
    let family_off = ro(&L.rt.family);
    let family: u16 = if family_off == ABSENT {
        read(at(sk, ro(&L.sk_family)))?
    } else {
        field(ctx, family_off)?
    };
    let mut flow = Flow::default();
    tuple_of_family(ctx, &L.rt, family, &mut flow)?;
    if !maps::flow_watched(&flow) {
        return Ok(());
    }
    let state: i32 = field(ctx, ro(&L.rt_state))?;

    let Some(mut entry) = maps::EVENTS.reserve::<RetransmitEvent>(0) else {
        maps::count(counter::RINGBUF_FULL);
        return Ok(());
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` points at a reserved, writable record of the right size.
    unsafe {
        (*ev).hdr = header(kind::RETRANSMIT);
        (*ev).sk = sk;
        (*ev).flow = flow;
        (*ev).state = state as u32;
        (*ev).snd_una = read(at(sk, ro(&L.snd_una))).unwrap_or(0);
        let net: u64 = read(at(sk, ro(&L.sk_net))).unwrap_or(0);
        (*ev).netns = net_inum(net, ro(&L.net_inum));
        match maps::OWNERS.get(sk) {
            Some(owner) => {
                (*ev).owner = *owner;
                (*ev).has_owner = 1;
            }
            None => {
                (*ev).owner = Owner::default();
                (*ev).has_owner = 0;
            }
        }
    }
    entry.submit(maps::wakeup_flags());
    Ok(())
}
