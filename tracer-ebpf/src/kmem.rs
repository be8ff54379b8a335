//! Kernel memory and tracepoint record reads at offsets resolved by userspace.
use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
use tracer_common::{ABSENT, AF_INET, AF_INET6, Flow, IPPROTO_TCP, TpTuple};

use crate::maps::ro;

#[inline(always)]
pub unsafe fn read<T>(addr: u64) -> Result<T, i64> {
    unsafe { bpf_probe_read_kernel(addr as *const T).map_err(|e| e as i64) }
}

/// `base + off`, with the offset masked so the verifier can bound it.
#[inline(always)]
pub fn at(base: u64, off: u32) -> u64 {
    base + (off & 0xffff) as u64
}

/// A field of the tracepoint record.
#[inline(always)]
pub fn field<T>(ctx: &TracePointContext, off: u32) -> Result<T, i64> {
    unsafe { ctx.read_at(off as usize & 0xfff).map_err(|e| e as i64) }
}

/// The 5-tuple of a TCP tracepoint record (sock:*, tcp:*): source = local end.
#[inline(always)]
pub fn tuple(ctx: &TracePointContext, t: &'static TpTuple, flow: &mut Flow) -> Result<(), i64> {
    let family: u16 = field(ctx, ro(&t.family))?;
    tuple_of_family(ctx, t, family, flow)
}

/// Like [`tuple`], with the address family from elsewhere (records without a `family` field).
#[inline(always)]
pub fn tuple_of_family(
    ctx: &TracePointContext,
    t: &'static TpTuple,
    family: u16,
    flow: &mut Flow,
) -> Result<(), i64> {
    flow.sport = field(ctx, ro(&t.sport))?;
    flow.dport = field(ctx, ro(&t.dport))?;
    flow.proto = IPPROTO_TCP;
    flow._pad = [0; 2];
    let v6 = ro(&t.saddr_v6);
    if family == AF_INET6 as u16 && v6 != ABSENT {
        flow.family = AF_INET6;
        flow.saddr = field(ctx, v6)?;
        flow.daddr = field(ctx, ro(&t.daddr_v6))?;
    } else {
        flow.family = AF_INET;
        flow.saddr = [0; 16];
        flow.daddr = [0; 16];
        let s: [u8; 4] = field(ctx, ro(&t.saddr))?;
        let d: [u8; 4] = field(ctx, ro(&t.daddr))?;
        flow.saddr[..4].copy_from_slice(&s);
        flow.daddr[..4].copy_from_slice(&d);
    }
    Ok(())
}

/// Network namespace inode of a `struct net *`.
#[inline(always)]
pub fn net_inum(net: u64, inum_off: u32) -> u32 {
    if net == 0 {
        return 0;
    }
    unsafe { read(at(net, inum_off)).unwrap_or(0) }
}
