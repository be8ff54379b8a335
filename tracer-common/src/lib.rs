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
    /// TCP state change of a socket on a watched port.
    pub const STATE: u8 = 2;
    /// TCP retransmission on a watched flow.
    pub const RETRANSMIT: u8 = 3;
    /// Conntrack entry of a watched flow removed without ever seeing a reply.
    pub const CT_UNREPLIED: u8 = 4;
    /// Bounded prefix of an Oracle Net (TNS) packet on a watched flow.
    pub const TNS: u8 = 5;
    /// The real source of one in every [`STORM_SAMPLE_EVERY`](super::STORM_SAMPLE_EVERY)
    /// drops the kernel folded into a per-destination aggregate.
    pub const STORM_SAMPLE: u8 = 6;
}

/// One folded drop in this many (per CPU) sends its real source as a [`StormSample`]: enough
/// to name the top sources of a flood at a few hundred records per second.
pub const STORM_SAMPLE_EVERY: u32 = 256;

/// Bits of the per-port WATCH_PORTS array.
pub mod watch {
    /// Watched on every address.
    pub const PORT_ALL: u8 = 1;
    /// Watched on learned addresses only (see WATCH_HOSTPORTS).
    pub const PORT_HOSTS: u8 = 2;
}

/// Bytes of a TNS packet copied to userspace: enough for a REDIRECT address, a REFUSE text or
/// a CONNECT descriptor, without copying whole payloads.
pub const TNS_CAPTURE: usize = 512;

/// TNS packet types the kernel copies (Oracle Net header byte 4).
pub mod tns {
    pub const CONNECT: u8 = 1;
    pub const ACCEPT: u8 = 2;
    pub const REFUSE: u8 = 4;
    pub const REDIRECT: u8 = 5;
    pub const DATA: u8 = 6;
    pub const RESEND: u8 = 11;
}

/// Indices into the per-CPU `COUNTERS` array.
pub mod counter {
    /// Ring buffer reservations that failed: events the kernel could not deliver.
    pub const RINGBUF_FULL: u32 = 0;
    /// kfree_skb hits seen by the program (before filtering).
    pub const SKB_SEEN: u32 = 1;
    /// Packet headers that could not be read (bad offsets, truncated packets).
    pub const SKB_UNREADABLE: u32 = 2;
    /// Tracepoint records or kernel structs of the TCP/conntrack hooks that could not be read.
    pub const TCP_UNREADABLE: u32 = 3;
    /// Drops delivered one record each because the aggregation map was full.
    pub const AGG_FULL: u32 = 4;
    /// Drops counted into an existing aggregation entry (no record of their own).
    pub const AGG_MERGED: u32 = 5;
    /// TNS packets of watched flows that could not be read.
    pub const TNS_UNREADABLE: u32 = 6;
    /// Drops folded into a per-destination aggregate because new flows exceeded the budget.
    pub const STORM_FOLDED: u32 = 7;
    pub const MAX: u32 = 8;

    /// Each counter's name in `lost.reason` and the metrics, by index.
    pub const NAMES: [&str; MAX as usize] = [
        "ringbuf_full",
        "skb_seen",
        "skb_unreadable",
        "tcp_unreadable",
        "agg_full",
        "agg_merged",
        "tns_unreadable",
        "storm_folded",
    ];

    /// Counters of events the kernel could not deliver: each increase is a `lost` record.
    /// The others count work done (kfree_skb hits, aggregation) and go to the metrics.
    pub const LOSSES: [u32; 4] = [RINGBUF_FULL, SKB_UNREADABLE, TCP_UNREADABLE, TNS_UNREADABLE];
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
    /// 1: kept only because it is a SYN from a client a watched listener had just
    /// REDIRECTed (see [`REDIRECTED_CLIENT_NS`]); its own ports were not watched yet.
    pub redirected: u8,
    pub _pad: [u8; 2],
    /// Number of drops this record stands for.
    pub count: u32,
    /// The skb's conntrack entry (present = 0 when it had none or conntrack is not readable).
    pub ct: CtInfo,
}

/// The real source of a drop the kernel folded into a per-destination aggregate.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StormSample {
    pub hdr: EventHeader,
    /// The aggregate it was folded into (one end unspecified).
    pub folded: Flow,
    /// The drop's own tuple.
    pub flow: Flow,
}

/// The process that opened a socket, recorded in process context at connect().
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub tgid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; 16],
}

/// `sock:inet_sock_set_state` on a watched port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateEvent {
    pub hdr: EventHeader,
    /// Socket address: the key that ties a socket's transitions and retransmits together.
    pub sk: u64,
    /// Local address/port as src, remote as dst.
    pub flow: Flow,
    pub oldstate: u32,
    pub newstate: u32,
    /// sk->sk_err at the transition (ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH, ...).
    pub sk_err: i32,
    pub netns: u32,
    /// 1 when `owner` is set (current task at connect, or remembered since).
    pub has_owner: u32,
    pub _pad: u32,
    pub owner: Owner,
}

/// `tcp:tcp_retransmit_skb` on a watched flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetransmitEvent {
    pub hdr: EventHeader,
    pub sk: u64,
    pub flow: Flow,
    /// TCP state of the socket (SYN_SENT: a SYN retransmit).
    pub state: u32,
    /// tp->snd_una: unchanged across retransmits means no ACK progress.
    pub snd_una: u32,
    pub netns: u32,
    pub has_owner: u32,
    pub owner: Owner,
}

/// One direction of a conntrack entry. Addresses network order, ports host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtTuple {
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub _pad: u32,
}

/// A conntrack entry as seen at drop time or at removal.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtInfo {
    /// 1 when the skb had a conntrack entry.
    pub present: u8,
    /// enum ip_conntrack_info of the skb (NEW, ESTABLISHED, ..., UNTRACKED).
    pub ctinfo: u8,
    /// AF_INET / AF_INET6
    pub family: u8,
    pub protonum: u8,
    pub mark: u32,
    /// ct->status bits (enum ip_conntrack_status).
    pub status: u64,
    pub zone: u16,
    pub _pad: [u8; 6],
    pub original: CtTuple,
    pub reply: CtTuple,
}

/// Conntrack removal (nf_ct_delete) of an entry that never saw a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEvent {
    pub hdr: EventHeader,
    pub ct: CtInfo,
    pub netns: u32,
    pub _pad: u32,
}

/// A TNS packet seen by the cgroup_skb programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TnsEvent {
    pub hdr: EventHeader,
    /// Sender as src.
    pub flow: Flow,
    /// TCP sequence number: the same packet seen leaving one local socket and arriving at
    /// another is deduplicated with it.
    pub seq: u32,
    /// TCP payload length of the packet.
    pub payload_len: u32,
    /// Bytes of `data` that are valid.
    pub captured: u32,
    /// 0: ingress (to a local socket), 1: egress (from one).
    pub direction: u32,
    pub data: [u8; TNS_CAPTURE],
}

/// A learned (address, port) to watch, e.g. the target of an Oracle listener REDIRECT.
/// Value in the map: expiry in CLOCK_MONOTONIC ns (0: never).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

/// A client a watched listener just sent a TNS REDIRECT to: its SYNs to ports not watched yet
/// are kept for [`REDIRECTED_CLIENT_NS`], so the first SYN toward the redirect target is
/// counted even when it leaves before userspace has read the REDIRECT and watched the target.
/// Kernel-side only (map key; value: expiry in CLOCK_MONOTONIC ns).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RedirectedClient {
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: [u8; 7],
}

/// How long a REDIRECTed client's SYNs to unwatched ports are kept: the client dials the
/// target at once; userspace watches the target within milliseconds (seconds under emulation).
pub const REDIRECTED_CLIENT_NS: u64 = 10_000_000_000;

/// Offsets of the 5-tuple fields in a TCP tracepoint record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpTuple {
    pub family: u32,
    pub sport: u32,
    pub dport: u32,
    pub saddr: u32,
    pub daddr: u32,
    pub saddr_v6: u32,
    pub daddr_v6: u32,
    pub _pad: u32,
}

impl TpTuple {
    pub const UNSET: Self = Self {
        family: ABSENT,
        sport: ABSENT,
        dport: ABSENT,
        saddr: ABSENT,
        daddr: ABSENT,
        saddr_v6: ABSENT,
        daddr_v6: ABSENT,
        _pad: 0,
    };
}

/// Layout for the TCP lifecycle and retransmit programs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpLayout {
    /// sock:inet_sock_set_state record.
    pub st_skaddr: u32,
    pub st_oldstate: u32,
    pub st_newstate: u32,
    pub st_protocol: u32,
    pub st: TpTuple,
    /// tcp:tcp_retransmit_skb record.
    pub rt_skaddr: u32,
    pub rt_state: u32,
    pub rt: TpTuple,
    /// TCP state numbers, from the tracepoint's `__print_symbolic` table.
    pub syn_sent: u32,
    pub close: u32,
    /// struct sock: sk_err, __sk_common.skc_net.net; struct tcp_sock: snd_una; struct net: ns.inum
    pub sk_err: u32,
    pub snd_una: u32,
    pub sk_net: u32,
    pub net_inum: u32,
    pub valid: u32,
    /// struct sock: __sk_common.skc_family, read where a record has no `family` field
    /// (tcp:tcp_retransmit_skb before 5.13).
    pub sk_family: u32,
}

impl TcpLayout {
    pub const UNSET: Self = Self {
        st_skaddr: ABSENT,
        st_oldstate: ABSENT,
        st_newstate: ABSENT,
        st_protocol: ABSENT,
        st: TpTuple::UNSET,
        rt_skaddr: ABSENT,
        rt_state: ABSENT,
        rt: TpTuple::UNSET,
        syn_sent: ABSENT,
        close: ABSENT,
        sk_err: ABSENT,
        snd_una: ABSENT,
        sk_net: ABSENT,
        net_inum: ABSENT,
        valid: 0,
        sk_family: ABSENT,
    };
}

/// Layout for reading conntrack entries (skb->_nfct, struct nf_conn).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtLayout {
    pub skb_nfct: u32,
    pub ct_status: u32,
    /// [`ABSENT`] without CONFIG_NF_CONNTRACK_MARK / _ZONES.
    pub ct_mark: u32,
    pub ct_zone_id: u32,
    pub ct_net: u32,
    pub ct_tuplehash: u32,
    /// sizeof(struct nf_conntrack_tuple_hash): tuplehash[1] is the reply direction.
    pub tuplehash_size: u32,
    /// nf_conntrack_tuple_hash.tuple
    pub hash_tuple: u32,
    /// struct nf_conntrack_tuple members.
    pub src_u3: u32,
    pub src_port: u32,
    pub src_l3num: u32,
    pub dst_u3: u32,
    pub dst_port: u32,
    pub dst_protonum: u32,
    /// struct net: ns.inum
    pub net_inum: u32,
    /// Mask of IPS_SEEN_REPLY in ct->status.
    pub seen_reply_mask: u32,
    pub valid: u32,
    pub _pad: u32,
}

impl CtLayout {
    pub const UNSET: Self = Self {
        skb_nfct: ABSENT,
        ct_status: ABSENT,
        ct_mark: ABSENT,
        ct_zone_id: ABSENT,
        ct_net: ABSENT,
        ct_tuplehash: ABSENT,
        tuplehash_size: ABSENT,
        hash_tuple: ABSENT,
        src_u3: ABSENT,
        src_port: ABSENT,
        src_l3num: ABSENT,
        dst_u3: ABSENT,
        dst_port: ABSENT,
        dst_protonum: ABSENT,
        net_inum: ABSENT,
        seen_reply_mask: 0,
        valid: 0,
        _pad: 0,
    };
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
    /// struct sk_buff members (`skb_protocol`: the BTF tracepoint reads it from the skb,
    /// [`ABSENT`] where it cannot be resolved and the classic tracepoint is used).
    pub skb_protocol: u32,
    /// Start of a [`SKB_HDR_WINDOW`]-byte span of sk_buff holding protocol, network_header
    /// and head, read at once by the BTF tracepoint; [`ABSENT`] when they are further apart.
    pub skb_hdr_window: u32,
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

/// Bytes of sk_buff the BTF tracepoint reads in one go (see `SkbLayout::skb_hdr_window`).
pub const SKB_HDR_WINDOW: u32 = 32;

impl SkbLayout {
    /// The window start covering protocol (2 bytes), network_header (2) and head (8), if
    /// they fit in [`SKB_HDR_WINDOW`] bytes.
    pub fn hdr_window(protocol: u32, network_header: u32, head: u32) -> u32 {
        if protocol == ABSENT || network_header == ABSENT || head == ABSENT {
            return ABSENT;
        }
        let lo = protocol.min(network_header).min(head);
        let hi = (protocol + 2).max(network_header + 2).max(head + 8);
        if hi - lo <= SKB_HDR_WINDOW {
            lo
        } else {
            ABSENT
        }
    }

    pub const UNSET: Self = Self {
        tp_skbaddr: ABSENT,
        tp_location: ABSENT,
        tp_protocol: ABSENT,
        tp_reason: ABSENT,
        skb_protocol: ABSENT,
        skb_hdr_window: ABSENT,
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

/// Run-time settings written as globals before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// 1: watch every TCP port, ignore the port map.
    pub all_tcp: u32,
    /// Wake the reader only once this many bytes wait in the ring buffer; below it records are
    /// submitted without a wakeup and userspace drains on its timer (wakeups dominate the cost
    /// of a record).
    pub wakeup_bytes: u32,
    /// New-flow drop records per second per CPU before a storm of distinct flows (e.g. a SYN
    /// flood rotating source ports) is folded into one aggregate per destination, with the
    /// ephemeral port written as 0. 0: no limit.
    pub new_flows_per_sec: u32,
    pub _pad: u32,
}

/// Per-CPU window counting new-flow drop records (see `Settings::new_flows_per_sec`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    pub start_ns: u64,
    pub count: u64,
}

/// Aggregation key of a drop: the same flow dropped for the same reason at the same place.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DropKey {
    pub flow: Flow,
    pub reason: u32,
    pub _pad: u32,
    pub location: u64,
}

/// Per-key drop counts kept in the kernel between flushes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropAgg {
    /// Drops of this key NOT delivered as their own ring buffer record. Only grows; userspace
    /// reports the increase since its last flush.
    pub repeats: u64,
    pub last_ns: u64,
    pub netns: u32,
    pub ifindex: u32,
    pub tcp_flags: u8,
    /// As [`DropEvent::redirected`], for the key's first drop.
    pub redirected: u8,
    pub _pad: [u8; 6],
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    /// aya::Pod: any bit pattern is a valid value and no byte is uninitialised. Every record
    /// type here is `#[repr(C)]`, made of integers and integer arrays only, with its padding
    /// spelled out as `_pad` fields (the size tests below pin each layout).
    macro_rules! pod {
        ($($t:ty),* $(,)?) => {$(
            // SAFETY: repr(C) integers and integer arrays, no implicit padding (see above).
            unsafe impl aya::Pod for $t {}
        )*};
    }
    pod!(
        EventHeader,
        Flow,
        DropEvent,
        SkbLayout,
        Owner,
        StateEvent,
        RetransmitEvent,
        CtTuple,
        CtInfo,
        CtEvent,
        TpTuple,
        HostPort,
        TcpLayout,
        CtLayout,
        Settings,
        DropKey,
        DropAgg,
        TnsEvent,
        RateWindow,
        StormSample,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EventHeader>(), 16);
        assert_eq!(size_of::<Flow>(), 40);
        assert_eq!(size_of::<CtTuple>(), 40);
        assert_eq!(size_of::<CtInfo>(), 24 + 80);
        assert_eq!(size_of::<DropEvent>(), 16 + 8 + 40 + 4 * 4 + 4 + 4 + 104);
        assert_eq!(size_of::<SkbLayout>(), 16 * 4);
        assert_eq!(size_of::<Owner>(), 32);
        assert_eq!(size_of::<StateEvent>(), 16 + 8 + 40 + 6 * 4 + 32);
        assert_eq!(size_of::<RetransmitEvent>(), 16 + 8 + 40 + 4 * 4 + 32);
        assert_eq!(size_of::<CtEvent>(), 16 + 104 + 8);
        assert_eq!(size_of::<TcpLayout>(), 4 * 4 + 32 + 2 * 4 + 32 + 8 * 4);
        assert_eq!(size_of::<CtLayout>(), 18 * 4);
        assert_eq!(size_of::<DropKey>(), 56);
        assert_eq!(size_of::<DropAgg>(), 32);
        assert_eq!(size_of::<StormSample>(), 16 + 2 * 40);
        assert_eq!(size_of::<RedirectedClient>(), 24);
    }

    #[test]
    fn skb_header_window_only_where_the_three_fields_fit() {
        // 6.x: protocol 180, network_header 182, head 192.
        assert_eq!(SkbLayout::hdr_window(180, 182, 192), 180);
        // head first, the others within 32 bytes of it.
        assert_eq!(SkbLayout::hdr_window(150, 130, 128), 128);
        // Too far apart, or a member not found: separate reads.
        assert_eq!(SkbLayout::hdr_window(100, 106, 128), ABSENT);
        assert_eq!(SkbLayout::hdr_window(ABSENT, 182, 192), ABSENT);
    }
}
