//! Drop classes: is a freed skb a packet the network lost (a policy, a firewall, a tc filter,
//! routing, no socket for an inbound SYN, a full queue), the host's own socket housekeeping
//! (a queue purged at close, an out-of-window segment, a receive buffer limit), or unknown?
//!
//! The kernel's drop reason decides where it has one; the code location decides where it
//! does not (`NOT_SPECIFIED`, and kernels before 5.17 that have no reason at all). Reasons this
//! table does not name fall back to their prefix (`TC_*`, `QDISC_*`, `NEIGH_*`, `IP_*`, ...),
//! so reasons added by newer kernels are classed too. docs/events.md lists the table; a unit
//! test keeps the two equal.
use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropClass {
    /// Discarded on its way: policy, firewall, tc, XDP, routing, neighbours, queues, devices,
    /// malformed packets, no socket for an inbound packet.
    Network,
    /// The host's own sockets and TCP processing: teardown and queue purges at close,
    /// receive-buffer and memory limits, old, duplicate or out-of-window segments.
    Local,
    /// Neither the reason nor the location says.
    Unknown,
}

impl DropClass {
    pub const ALL: [DropClass; 3] = [DropClass::Network, DropClass::Local, DropClass::Unknown];

    pub fn as_str(self) -> &'static str {
        match self {
            DropClass::Network => "network",
            DropClass::Local => "local",
            DropClass::Unknown => "unknown",
        }
    }
}

impl fmt::Display for DropClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The reason name droptrace reports on kernels whose tracepoint has no `reason` field.
pub const UNAVAILABLE: &str = "UNAVAILABLE";

use DropClass::{Local, Network};

/// Every reason of `enum skb_drop_reason` up to Linux 7.3, by name (without the
/// `SKB_DROP_REASON_` prefix). `NOT_SPECIFIED` is absent on purpose: the location decides.
pub const REASONS: &[(&str, DropClass)] = &[
    ("NO_SOCKET", Network),
    ("SOCKET_CLOSE", Local),
    ("SOCKET_FILTER", Network),
    ("SOCKET_RCVBUFF", Local),
    ("UNIX_DISCONNECT", Local),
    ("UNIX_SKIP_OOB", Local),
    ("PKT_TOO_SMALL", Network),
    ("TCP_CSUM", Network),
    ("UDP_CSUM", Network),
    ("NETFILTER_DROP", Network),
    ("OTHERHOST", Network),
    ("IP_CSUM", Network),
    ("IP_INHDR", Network),
    ("IP_RPFILTER", Network),
    ("UNICAST_IN_L2_MULTICAST", Network),
    ("XFRM_POLICY", Network),
    ("IP_NOPROTO", Network),
    ("PROTO_MEM", Local),
    ("TCP_AUTH_HDR", Network),
    ("TCP_MD5NOTFOUND", Network),
    ("TCP_MD5UNEXPECTED", Network),
    ("TCP_MD5FAILURE", Network),
    ("TCP_AONOTFOUND", Network),
    ("TCP_AOUNEXPECTED", Network),
    ("TCP_AOKEYNOTFOUND", Network),
    ("TCP_AOFAILURE", Network),
    ("SOCKET_BACKLOG", Local),
    ("TCP_FLAGS", Local),
    ("TCP_ABORT_ON_DATA", Local),
    ("TCP_ZEROWINDOW", Local),
    ("TCP_OLD_DATA", Local),
    ("TCP_OVERWINDOW", Local),
    ("TCP_OFOMERGE", Local),
    ("TCP_RFC7323_PAWS", Local),
    ("TCP_RFC7323_PAWS_ACK", Local),
    ("TCP_RFC7323_TW_PAWS", Local),
    ("TCP_RFC7323_TSECR", Local),
    ("TCP_LISTEN_OVERFLOW", Network),
    ("TCP_OLD_SEQUENCE", Local),
    ("TCP_INVALID_SEQUENCE", Local),
    ("TCP_INVALID_END_SEQUENCE", Local),
    ("TCP_INVALID_ACK_SEQUENCE", Local),
    ("TCP_RESET", Local),
    ("TCP_INVALID_SYN", Local),
    ("TCP_CLOSE", Local),
    ("TCP_FASTOPEN", Local),
    ("TCP_OLD_ACK", Local),
    ("TCP_TOO_OLD_ACK", Local),
    ("TCP_ACK_UNSENT_DATA", Local),
    ("TCP_OFO_QUEUE_PRUNE", Local),
    ("TCP_OFO_DROP", Local),
    ("IP_OUTNOROUTES", Network),
    ("BPF_CGROUP_EGRESS", Network),
    ("BPF_CGROUP_INGRESS", Network),
    ("IPV6DISABLED", Network),
    ("NEIGH_CREATEFAIL", Network),
    ("NEIGH_FAILED", Network),
    ("NEIGH_QUEUEFULL", Network),
    ("NEIGH_DEAD", Network),
    ("NEIGH_HH_FILLFAIL", Network),
    ("TC_EGRESS", Network),
    ("SECURITY_HOOK", Network),
    ("QDISC_DROP", Network),
    ("QDISC_OVERLIMIT", Network),
    ("QDISC_CONGESTED", Network),
    ("CAKE_FLOOD", Network),
    ("FQ_BAND_LIMIT", Network),
    ("FQ_HORIZON_LIMIT", Network),
    ("FQ_FLOW_LIMIT", Network),
    ("CPU_BACKLOG", Network),
    ("XDP", Network),
    ("TC_INGRESS", Network),
    ("UNHANDLED_PROTO", Network),
    ("SKB_CSUM", Network),
    ("SKB_GSO_SEG", Network),
    ("SKB_UCOPY_FAULT", Local),
    ("DEV_HDR", Network),
    ("DEV_READY", Network),
    ("FULL_RING", Network),
    ("NOMEM", Local),
    ("HDR_TRUNC", Network),
    ("TAP_FILTER", Network),
    ("TAP_TXFILTER", Network),
    ("ICMP_CSUM", Network),
    ("INVALID_PROTO", Network),
    ("IP_INADDRERRORS", Network),
    ("IP_INNOROUTES", Network),
    ("IP_LOCAL_SOURCE", Network),
    ("IP_INVALID_SOURCE", Network),
    ("IP_LOCALNET", Network),
    ("IP_INVALID_DEST", Network),
    ("PKT_TOO_BIG", Network),
    ("DUP_FRAG", Local),
    ("FRAG_REASM_TIMEOUT", Network),
    ("FRAG_TOO_FAR", Network),
    ("TCP_MINTTL", Network),
    ("IPV6_BAD_EXTHDR", Network),
    ("IPV6_NDISC_FRAG", Network),
    ("IPV6_NDISC_HOP_LIMIT", Network),
    ("IPV6_NDISC_BAD_CODE", Network),
    ("IPV6_NDISC_BAD_OPTIONS", Network),
    ("IPV6_NDISC_NS_OTHERHOST", Network),
    ("QUEUE_PURGE", Local),
    ("TC_COOKIE_ERROR", Network),
    ("PACKET_SOCK_ERROR", Local),
    ("TC_CHAIN_NOTFOUND", Network),
    ("TC_RECLASSIFY_LOOP", Network),
    ("VXLAN_INVALID_HDR", Network),
    ("VXLAN_VNI_NOT_FOUND", Network),
    ("MAC_INVALID_SOURCE", Network),
    ("VXLAN_ENTRY_EXISTS", Network),
    ("NO_TX_TARGET", Network),
    ("IP_TUNNEL_ECN", Network),
    ("TUNNEL_TXINFO", Network),
    ("LOCAL_MAC", Network),
    ("ARP_PVLAN_DISABLE", Network),
    ("MAC_IEEE_MAC_CONTROL", Network),
    ("BRIDGE_INGRESS_STP_STATE", Network),
    ("CAN_RX_INVALID_FRAME", Network),
    ("CANFD_RX_INVALID_FRAME", Network),
    ("CANXL_RX_INVALID_FRAME", Network),
    ("PFMEMALLOC", Local),
    ("DUALPI2_STEP_DROP", Network),
    ("PSP_INPUT", Network),
    ("PSP_OUTPUT", Network),
    ("RECURSION_LIMIT", Network),
];

/// Prefixes for reasons the table does not name (newer kernels, subsystem reasons).
const REASON_PREFIXES: &[(&str, DropClass)] = &[
    ("TCP_OFO", Local),
    ("TCP_OLD", Local),
    ("TCP_RFC7323", Local),
    ("SOCKET_", Local),
    ("UNIX_", Local),
    ("TC_", Network),
    ("QDISC_", Network),
    ("NEIGH_", Network),
    ("IP_", Network),
    ("IPV6_", Network),
    ("XDP", Network),
    ("NETFILTER", Network),
    ("VXLAN_", Network),
    ("FRAG_", Network),
    ("BRIDGE_", Network),
    ("MAC_", Network),
    ("ARP_", Network),
    ("FQ_", Network),
    ("DEV_", Network),
    ("OVS_", Network),
    ("IPSEC_", Network),
    ("XFRM_", Network),
    ("PSP_", Network),
];

/// Where the kernel freed it, for drops without a telling reason: the function of the
/// location (`nf_hook_slow+0x9c` -> `nf_hook_slow`), by exact name or by prefix (a trailing
/// `*`). Kernels before 5.17 report every drop this way.
pub const LOCATIONS: &[(&str, DropClass)] = &[
    // netfilter: iptables, nftables, ebtables, bridge netfilter
    ("nf_hook_slow", Network),
    ("nft_do_chain", Network),
    ("ipt_do_table", Network),
    ("ip6t_do_table", Network),
    ("ebt_do_table", Network),
    ("br_nf_*", Network),
    ("nf_*", Network),
    // tc, XDP, cgroup BPF
    ("tcf_classify", Network),
    ("tcx_run", Network),
    ("tc_run", Network),
    ("sch_handle_ingress", Network),
    ("sch_handle_egress", Network),
    ("__netif_receive_skb_core*", Network),
    ("do_xdp_generic", Network),
    ("bpf_prog_run_generic_xdp", Network),
    ("__cgroup_bpf_run_filter_skb", Network),
    // routing and forwarding
    ("ip_error", Network),
    ("ip_forward", Network),
    ("ip6_forward", Network),
    ("ip_rcv_finish_core*", Network),
    ("ip_rcv_core", Network),
    ("ip_route_input*", Network),
    ("ip6_pkt_drop", Network),
    ("ip_local_deliver_finish", Network),
    ("ip_protocol_deliver_rcu", Network),
    ("ip6_protocol_deliver_rcu", Network),
    ("ip_finish_output2", Network),
    ("ip6_finish_output2", Network),
    ("xfrm_*", Network),
    // neighbours, devices and queues
    ("neigh_*", Network),
    ("__neigh_event_send", Network),
    ("__dev_queue_xmit", Network),
    ("dev_queue_xmit*", Network),
    ("__dev_xmit_skb", Network),
    ("dev_hard_start_xmit", Network),
    ("qdisc_*", Network),
    ("__qdisc_*", Network),
    ("pfifo_*", Network),
    ("fq_*", Network),
    ("enqueue_to_backlog", Network),
    ("veth_xmit", Network),
    // TCP receive without a socket (no listener, checksum): before 5.17 one kfree_skb at
    // tcp_v4_rcv's discard label covers them.
    ("tcp_v4_rcv", Network),
    ("tcp_v6_rcv", Network),
    ("tcp_v4_send_reset", Network),
    // The host's own sockets: teardown, purges, protocol housekeeping.
    ("sk_stream_kill_queues", Local),
    ("skb_queue_purge*", Local),
    ("__skb_queue_purge*", Local),
    ("tcp_close", Local),
    ("__tcp_close", Local),
    ("tcp_done", Local),
    ("inet_csk_destroy_sock", Local),
    ("inet_csk_listen_stop", Local),
    ("__sk_destruct", Local),
    ("sk_common_release", Local),
    ("tcp_write_queue_purge", Local),
    ("tcp_rcv_state_process", Local),
    ("tcp_rcv_established", Local),
    ("tcp_validate_incoming", Local),
    ("tcp_data_queue*", Local),
    ("tcp_drop*", Local),
    ("tcp_v4_do_rcv", Local),
    ("tcp_v6_do_rcv", Local),
    ("tcp_add_backlog", Local),
    ("tcp_prune_*", Local),
    ("tcp_collapse*", Local),
    ("sock_rfree", Local),
    ("sk_filter_trim_cap", Local),
    ("unix_*", Local),
    ("udp_queue_rcv*", Local),
    ("__udp_queue_rcv_skb", Local),
    ("skb_release_*", Local),
];

/// The class of a drop: by reason where it names one, else by location (`function+0xoff`).
/// `reason` is None, `NOT_SPECIFIED` or [`UNAVAILABLE`] when the kernel gave no telling reason.
pub fn classify(reason: Option<&str>, location: &str) -> DropClass {
    match reason {
        Some(r) if r != "NOT_SPECIFIED" && r != UNAVAILABLE => by_reason(r),
        _ => by_location(location),
    }
}

fn by_reason(reason: &str) -> DropClass {
    if let Some((_, c)) = REASONS.iter().find(|(n, _)| *n == reason) {
        return *c;
    }
    REASON_PREFIXES
        .iter()
        .find(|(p, _)| reason.starts_with(p))
        .map_or(DropClass::Unknown, |(_, c)| *c)
}

/// The class of a location, `function+0xoff` or a bare function name.
pub fn by_location(location: &str) -> DropClass {
    let func = location.split('+').next().unwrap_or(location);
    // Compiler clones (`tcp_v4_rcv.cold`, `.isra.0`) keep the function's class.
    let func = func.split('.').next().unwrap_or(func);
    let exact = LOCATIONS.iter().find(|(n, _)| *n == func);
    let prefix = || {
        LOCATIONS
            .iter()
            .filter_map(|(n, c)| n.strip_suffix('*').map(|p| (p, c)))
            .filter(|(p, _)| func.starts_with(p))
            .max_by_key(|(p, _)| p.len())
            .map(|(_, c)| c)
    };
    exact
        .map(|(_, c)| c)
        .or_else(prefix)
        .copied()
        .unwrap_or(DropClass::Unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_firewall_drop_is_a_network_drop_and_a_purge_at_close_is_local() {
        assert_eq!(
            classify(Some("NETFILTER_DROP"), "nft_do_chain+0x46f"),
            Network
        );
        assert_eq!(
            classify(Some("QUEUE_PURGE"), "sk_stream_kill_queues+0x5d"),
            Local
        );
        assert_eq!(classify(Some("TC_INGRESS"), "tcf_classify+0x1"), Network);
        assert_eq!(classify(Some("NO_SOCKET"), "tcp_v4_rcv+0x12a"), Network);
    }

    #[test]
    fn without_a_reason_the_location_decides() {
        // Linux 5.10: no reason field.
        assert_eq!(classify(Some(UNAVAILABLE), "nf_hook_slow+0x9c"), Network);
        assert_eq!(classify(None, "tcp_v4_rcv+0x12a"), Network);
        assert_eq!(classify(None, "sk_stream_kill_queues+0x5d"), Local);
        assert_eq!(classify(None, "tcp_v4_rcv.cold+0x3"), Network);
        assert_eq!(classify(None, "neigh_resolve_output+0x1"), Network);
        assert_eq!(
            classify(Some("NOT_SPECIFIED"), "skb_release_data+0x10"),
            Local
        );
        assert_eq!(classify(None, "some_driver_rx+0x10"), DropClass::Unknown);
        assert_eq!(classify(None, "0xffffffffc0a01234"), DropClass::Unknown);
    }

    #[test]
    fn reasons_newer_than_the_table_are_classed_by_prefix() {
        assert_eq!(classify(Some("TC_SOMETHING_NEW"), "x+0x1"), Network);
        assert_eq!(classify(Some("TCP_OFO_SOMETHING"), "x+0x1"), Local);
        assert_eq!(classify(Some("OVS_DROP_LAST_ACTION"), "x+0x1"), Network);
        assert_eq!(classify(Some("ENTIRELY_NEW"), "x+0x1"), DropClass::Unknown);
    }

    /// Every reason of the kernels droptrace has fixtures of (6.18's tracepoint format here)
    /// has an explicit class: none falls through to `unknown` by accident.
    #[test]
    fn every_reason_of_a_recorded_kernel_has_a_class() {
        let format = crate::kernel::tracefs::Format::parse(
            include_str!("../../tests/fixtures/kfree_skb.format-6.18"),
            "6.18",
        );
        let names = crate::collect::drop_reason_names(None, &format.reason_symbols);
        assert!(names.len() > 100, "{} reasons", names.len());
        let unnamed: Vec<&String> = names
            .values()
            .filter(|n| {
                !matches!(n.as_str(), "NOT_SPECIFIED" | "MAX")
                    && !REASONS.iter().any(|(r, _)| r == n)
            })
            .collect();
        assert!(unnamed.is_empty(), "reasons without a class: {unnamed:?}");
    }

    /// docs/events.md shows this table; they must not drift apart.
    #[test]
    fn the_documented_table_is_this_table() {
        let doc = include_str!("../../../docs/events.md");
        for (reason, class) in REASONS {
            let row = format!("| `{reason}` | {class} |");
            assert!(doc.contains(&row), "docs/events.md lacks the row {row}");
        }
        for (loc, class) in LOCATIONS {
            let row = format!("| `{loc}` | {class} |");
            assert!(doc.contains(&row), "docs/events.md lacks the row {row}");
        }
    }
}
