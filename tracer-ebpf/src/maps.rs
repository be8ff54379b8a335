//! Maps and read-only globals shared by the programs. Userspace sizes the ring buffer and
//! fills the globals at load time.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use tracer_common::{FilterConfig, SkbLayout, counter};

/// Kernel layout, written by userspace with `EbpfLoader::override_global`.
#[unsafe(no_mangle)]
static SKB_LAYOUT: SkbLayout = SkbLayout::UNSET;

#[unsafe(no_mangle)]
static FILTER: FilterConfig = FilterConfig { all_tcp: 0 };

#[inline(always)]
pub fn skb_layout() -> SkbLayout {
    // Volatile: the value is patched into .rodata after compilation.
    unsafe { core::ptr::read_volatile(&SKB_LAYOUT) }
}

#[inline(always)]
pub fn filter() -> FilterConfig {
    unsafe { core::ptr::read_volatile(&FILTER) }
}

/// All events, every kind, in arrival order per CPU.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Watched TCP ports (value unused). Userspace fills the defaults or `--ports`.
#[map]
pub static WATCH_PORTS: HashMap<u16, u8> = HashMap::with_max_entries(1024, 0);

/// Per-CPU counters, indexed by `tracer_common::counter`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::MAX, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn port_watched(sport: u16, dport: u16) -> bool {
    if filter().all_tcp != 0 {
        return true;
    }
    unsafe { WATCH_PORTS.get(&dport).is_some() || WATCH_PORTS.get(&sport).is_some() }
}
