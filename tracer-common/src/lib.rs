//! Types shared by the kernel programs (`tracer-ebpf`) and the daemon (`tracer-user`).
//!
//! Every record that crosses the ring buffer starts with an [`EventHeader`] whose `kind`
//! says which `#[repr(C)]` struct follows. Field order keeps every struct free of implicit
//! padding so both sides agree byte for byte (checked by the size tests below).
#![no_std]

pub mod packet;

/// Ring buffer record kinds.
pub mod kind {
    pub const DROP: u8 = 1;
}

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Ring buffer reservations that failed: events the kernel could not deliver.
    pub const RINGBUF_FULL: u32 = 0;
    /// kfree_skb hits seen by the program (before filtering).
    pub const SKB_SEEN: u32 = 1;
    /// Packet headers that could not be read (bad offsets, truncated packets).
    pub const SKB_UNREADABLE: u32 = 2;
    pub const MAX: u32 = 8;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_TCP: u8 = 6;

/// Marks a tracepoint field or struct member the running kernel does not have.
pub const ABSENT: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u8,
    pub _pad: [u8; 3],
    pub cpu: u32,
    /// CLOCK_MONOTONIC nanoseconds (bpf_ktime_get_ns).
    pub ts_ns: u64,
}

/// A TCP/IP 5-tuple. Addresses are in network byte order; IPv4 uses the first 4 bytes.
/// Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flow {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

/// One skb freed with a drop reason (`skb:kfree_skb`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    pub hdr: EventHeader,
    /// Code address that freed the skb (tracepoint `location`).
    pub location: u64,
    pub flow: Flow,
    /// `enum skb_drop_reason` value of the running kernel.
    pub reason: u32,
    /// skb->len
    pub len: u32,
    /// Network namespace inode of the device (or of the socket when there is no device).
    pub netns: u32,
    pub ifindex: u32,
    /// TCP flags byte (CWR ECE URG ACK PSH RST SYN FIN).
    pub tcp_flags: u8,
    pub _pad: [u8; 3],
    /// Number of drops this record stands for.
    pub count: u32,
}

/// Where things are in the running kernel, resolved in userspace from tracefs and BTF at load
/// time and written into the program's read-only globals. Nothing here is a compile-time
/// constant: kernels move tracepoint fields and struct members between versions.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SkbLayout {
    /// skb:kfree_skb record: offsets of skbaddr, location, protocol, reason ([`ABSENT`] if none).
    pub tp_skbaddr: u32,
    pub tp_location: u32,
    pub tp_protocol: u32,
    pub tp_reason: u32,
    /// struct sk_buff members.
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_len: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    /// struct net_device: ifindex and nd_net.net
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    /// struct sock: __sk_common.skc_net.net
    pub sk_net: u32,
    /// struct net: ns.inum
    pub net_inum: u32,
    /// 1 when the layout was filled in by userspace; programs do nothing until then.
    pub valid: u32,
}

impl SkbLayout {
    pub const UNSET: Self = Self {
        tp_skbaddr: ABSENT,
        tp_location: ABSENT,
        tp_protocol: ABSENT,
        tp_reason: ABSENT,
        skb_head: ABSENT,
        skb_network_header: ABSENT,
        skb_len: ABSENT,
        skb_dev: ABSENT,
        skb_sk: ABSENT,
        dev_ifindex: ABSENT,
        dev_nd_net: ABSENT,
        sk_net: ABSENT,
        net_inum: ABSENT,
        valid: 0,
    };
}

/// Filter settings written as globals before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterConfig {
    /// 1: watch every TCP port, ignore the port map.
    pub all_tcp: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain-old-data, repr(C), no implicit padding (see size tests).
    unsafe impl aya::Pod for EventHeader {}
    unsafe impl aya::Pod for Flow {}
    unsafe impl aya::Pod for DropEvent {}
    unsafe impl aya::Pod for SkbLayout {}
    unsafe impl aya::Pod for FilterConfig {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EventHeader>(), 16);
        assert_eq!(size_of::<Flow>(), 40);
        assert_eq!(size_of::<DropEvent>(), 16 + 8 + 40 + 4 * 4 + 4 + 4);
        assert_eq!(size_of::<SkbLayout>(), 14 * 4);
    }
}
