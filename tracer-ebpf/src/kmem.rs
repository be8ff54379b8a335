//! Kernel memory and tracepoint record reads at offsets resolved by userspace.
use aya_ebpf::{helpers::bpf_probe_read_kernel, programs::TracePointContext};
use tracer_common::{ABSENT, AF_INET, AF_INET6, Flow, IPPROTO_TCP, TpTuple};

use crate::maps::ro;

/// Types for which every bit pattern is a value (integers and arrays of them): what a read of
/// kernel memory, or of a tracepoint record, may hand back whatever the bytes are.
///
/// # Safety
/// Implement only for types without invalid bit patterns and without padding.
pub(crate) unsafe trait Plain: Copy {}

macro_rules! plain {
    ($($t:ty),*) => {$(
        // SAFETY: an integer or an array of integers: every bit pattern is a value.
        unsafe impl Plain for $t {}
    )*};
}
plain!(u8, u16, u32, u64, i8, i16, i32, i64);
// SAFETY: arrays of plain values are plain (no padding between elements).
unsafe impl<T: Plain, const N: usize> Plain for [T; N] {}

/// A `T` read from kernel memory at `addr`. An address the kernel cannot read gives an error,
/// never a fault (bpf_probe_read_kernel checks it).
#[inline(always)]
pub(crate) fn read<T: Plain>(addr: u64) -> Result<T, i64> {
    // SAFETY: bpf_probe_read_kernel copies into a value of ours and tolerates any address;
    // `T: Plain` makes whatever bytes it copies a valid `T`.
    unsafe { bpf_probe_read_kernel(addr as *const T).map_err(|e| e as i64) }
}

/// `base + off`, with the offset masked so the verifier can bound it.
#[inline(always)]
pub(crate) fn at(base: u64, off: u32) -> u64 {
    base + (off & 0xffff) as u64
}

/// A field of the tracepoint record.
#[inline(always)]
pub(crate) fn field<T: Plain>(ctx: &TracePointContext, off: u32) -> Result<T, i64> {
    // SAFETY: read_at copies from the record with bpf_probe_read, bounded by the mask;
    // `T: Plain` makes any bytes a valid `T`.
    unsafe { ctx.read_at(off as usize & 0xfff).map_err(|e| e as i64) }
}

/// The 5-tuple of a TCP tracepoint record (sock:*, tcp:*): source = local end.
#[inline(always)]
pub(crate) fn tuple(
    ctx: &TracePointContext,
    t: &'static TpTuple,
    flow: &mut Flow,
) -> Result<(), i64> {
    let family: u16 = field(ctx, ro(&t.family))?;
    tuple_of_family(ctx, t, family, flow)
}

/// Like [`tuple`], with the address family from elsewhere (records without a `family` field).
#[inline(always)]
pub(crate) fn tuple_of_family(
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
pub(crate) fn net_inum(net: u64, inum_off: u32) -> u32 {
    if net == 0 {
        return 0;
    }
    read(at(net, inum_off)).unwrap_or(0)
}
