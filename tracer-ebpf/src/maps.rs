//! Maps and read-only globals shared by the programs. Userspace sizes the ring buffer and
//! fills the globals at load time.
use aya_ebpf::{
    helpers::bpf_ktime_get_ns,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tracer_common::{
    CtLayout, DropAgg, DropKey, Flow, HostPort, Owner, REDIRECTED_CLIENT_NS, RateWindow,
    RedirectedClient, Settings, SkbLayout, TcpLayout, counter,
};

// Kernel layouts, written by userspace with `EbpfLoader::override_global`. Read each field
// with `ro`: whole-struct copies would eat the 512-byte BPF stack.
#[unsafe(no_mangle)]
pub(crate) static SKB_LAYOUT: SkbLayout = SkbLayout::UNSET;
#[unsafe(no_mangle)]
pub(crate) static TCP_LAYOUT: TcpLayout = TcpLayout::UNSET;
#[unsafe(no_mangle)]
pub(crate) static CT_LAYOUT: CtLayout = CtLayout::UNSET;
#[unsafe(no_mangle)]
pub(crate) static SETTINGS: Settings = Settings {
    all_tcp: 0,
    wakeup_bytes: 0,
    new_flows_per_sec: 0,
    _pad: 0,
};

/// New-flow drop records in the current one-second window, per CPU.
#[map]
pub(crate) static NEW_FLOWS: PerCpuArray<RateWindow> = PerCpuArray::with_max_entries(1, 0);

/// A field of a read-only global. Volatile: the value is patched into .rodata after
/// compilation, so the compiler must not fold the initializer in.
#[inline(always)]
pub(crate) fn ro<T: Copy>(field: &T) -> T {
    // SAFETY: a reference is valid, aligned and initialized for reads.
    unsafe { core::ptr::read_volatile(field) }
}

/// All events, every kind, in arrival order per CPU.
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per TCP port: bit `PORT_ALL` = watched on every address (the defaults or `--ports`), bit
/// `PORT_HOSTS` = watched on some learned addresses (look in WATCH_HOSTPORTS). An array, not a
/// hash: the cgroup_skb programs check every packet of every local socket, and an array
/// lookup is a bounds check and a load.
#[map]
pub(crate) static WATCH_PORTS: Array<u8> = Array::with_max_entries(65536, 0);

/// Watched (address, port) pairs learned at run time, with an expiry.
#[map]
pub(crate) static WATCH_HOSTPORTS: HashMap<HostPort, u64> = HashMap::with_max_entries(4096, 0);

/// Drop counts per (flow, reason, location): a storm costs one record per flow, not per packet.
/// Per-CPU values: each CPU counts in its own slot, exactly and without atomics; userspace
/// sums them. Not LRU: the kernel would evict silently and lose counts; userspace removes idle
/// entries after flushing them instead, and a full map sends drops as records of their own.
#[map]
pub(crate) static DROP_AGG: PerCpuHashMap<DropKey, DropAgg> =
    PerCpuHashMap::with_max_entries(16384, 0);

/// Flows (sender as src) whose next TNS DATA packet carries a REDIRECT address or a CONNECT
/// descriptor, and so is copied.
#[map]
pub(crate) static TNS_EXPECT_DATA: LruHashMap<Flow, u32> = LruHashMap::with_max_entries(4096, 0);

/// Clients a watched listener just sent a TNS REDIRECT to, with an expiry: their SYNs to
/// ports not watched yet are kept (the REDIRECT's target is learned in userspace, after the
/// client may already have dialled it).
#[map]
pub(crate) static REDIRECTED_CLIENTS: LruHashMap<RedirectedClient, u64> =
    LruHashMap::with_max_entries(1024, 0);

/// Socket -> the process that connected it.
#[map]
pub(crate) static OWNERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU counters, indexed by `tracer_common::counter`.
#[map]
pub(crate) static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counter::MAX, 0);

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU array, valid for this program run.
        unsafe { *slot += 1 };
    }
}

/// Submit flags: no wakeup until `wakeup_bytes` are waiting (userspace drains on a timer).
#[inline(always)]
pub(crate) fn wakeup_flags() -> u64 {
    const BPF_RB_AVAIL_DATA: u64 = 0;
    const BPF_RB_NO_WAKEUP: u64 = 1;
    const BPF_RB_FORCE_WAKEUP: u64 = 2;
    if EVENTS.query(BPF_RB_AVAIL_DATA) >= ro(&SETTINGS.wakeup_bytes) as u64 {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    }
}

use tracer_common::watch::{PORT_ALL, PORT_HOSTS};

#[inline(always)]
fn port_bits(port: u16) -> u8 {
    WATCH_PORTS.get(port as u32).copied().unwrap_or(0)
}

#[inline(always)]
pub(crate) fn port_watched(sport: u16, dport: u16) -> bool {
    if ro(&SETTINGS.all_tcp) != 0 {
        return true;
    }
    (port_bits(dport) | port_bits(sport)) & PORT_ALL != 0
}

/// Watched on every address (ignoring --all-tcp).
#[inline(always)]
pub(crate) fn port_watched_strict(port: u16) -> bool {
    port_bits(port) & PORT_ALL != 0
}

#[inline(always)]
pub(crate) fn host_port_watched(family: u8, addr: &[u8; 16], port: u16) -> bool {
    let key = HostPort {
        addr: *addr,
        port,
        family,
        _pad: [0; 5],
    };
    // SAFETY: the value is copied out at once; a concurrent update can only make it stale.
    match unsafe { WATCH_HOSTPORTS.get(key) } {
        // SAFETY: bpf_ktime_get_ns takes nothing and cannot fail.
        Some(&expires) => expires == 0 || unsafe { bpf_ktime_get_ns() } < expires,
        None => false,
    }
}

/// Takes one new-flow record from this CPU's budget; false once the second's budget is spent.
#[inline(always)]
pub(crate) fn new_flow_allowed(now: u64) -> bool {
    let budget = ro(&SETTINGS.new_flows_per_sec) as u64;
    if budget == 0 {
        return true;
    }
    let Some(w) = NEW_FLOWS.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's slot of a per-CPU array.
    unsafe {
        if now.wrapping_sub((*w).start_ns) >= 1_000_000_000 {
            (*w).start_ns = now;
            (*w).count = 0;
        }
        if (*w).count >= budget {
            return false;
        }
        (*w).count += 1;
    }
    true
}

/// A watched port at either end, or a learned (address, port) at either end.
#[inline(always)]
pub(crate) fn flow_watched(f: &Flow) -> bool {
    if ro(&SETTINGS.all_tcp) != 0 {
        return true;
    }
    ports_watched(f, port_bits(f.sport), port_bits(f.dport))
}

/// `flow_watched` with the port bits already looked up.
#[inline(always)]
pub(crate) fn ports_watched(f: &Flow, sbits: u8, dbits: u8) -> bool {
    (sbits | dbits) & PORT_ALL != 0
        || (dbits & PORT_HOSTS != 0 && host_port_watched(f.family, &f.daddr, f.dport))
        || (sbits & PORT_HOSTS != 0 && host_port_watched(f.family, &f.saddr, f.sport))
}

/// Whether a packet between these ports can be of interest at all (cheap pre-filter).
#[inline(always)]
pub(crate) fn any_port_of_interest(a: u16, b: u16) -> bool {
    ro(&SETTINGS.all_tcp) != 0 || (port_bits(a) | port_bits(b)) != 0
}

#[inline(always)]
fn redirected_key(family: u8, addr: &[u8; 16]) -> RedirectedClient {
    RedirectedClient {
        addr: *addr,
        family,
        _pad: [0; 7],
    }
}

/// A watched listener sent `addr` a REDIRECT: keep its SYNs for a while.
#[inline(always)]
pub(crate) fn mark_redirected(family: u8, addr: &[u8; 16]) {
    // SAFETY: bpf_ktime_get_ns takes nothing and cannot fail.
    let expires = unsafe { bpf_ktime_get_ns() } + REDIRECTED_CLIENT_NS;
    let _ = REDIRECTED_CLIENTS.insert(redirected_key(family, addr), expires, 0);
}

/// Whether `addr` was sent a REDIRECT within the last REDIRECTED_CLIENT_NS.
#[inline(always)]
pub(crate) fn redirected_client(family: u8, addr: &[u8; 16]) -> bool {
    // SAFETY: the value is copied out at once; a concurrent update can only make it stale.
    match unsafe { REDIRECTED_CLIENTS.get(redirected_key(family, addr)) } {
        // SAFETY: bpf_ktime_get_ns takes nothing and cannot fail.
        Some(&expires) => (unsafe { bpf_ktime_get_ns() }) < expires,
        None => false,
    }
}
