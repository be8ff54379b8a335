//! skb:kfree_skb: packets freed with a drop reason.
use std::path::Path;

use tracer_common::{ABSENT, DropEvent, DropKey, SkbLayout, StormSample};

use super::{LayoutError, Symbols, conntrack};
use crate::{
    decode::{self, DropSignal, FlowKey, TcpFlags},
    kernel::{
        btf::KernelBtf,
        tracefs::{Format, TracefsError},
    },
};

pub const CATEGORY: &str = "skb";
pub const TRACEPOINT: &str = "kfree_skb";
pub const PROGRAM: &str = "kfree_skb";
/// The same handler as a BTF tracepoint (no trace record built per drop).
pub const BTF_PROGRAM: &str = "kfree_skb_btf";

/// Whether `kfree_skb_btf` fits this kernel: its BTF describes `trace_kfree_skb(skb,
/// location, reason, ...)` (5.17+), and skb->protocol resolved. Otherwise the classic
/// tracepoint is used (5.10's hook has no reason).
pub fn btf_hook_fits(btf: &KernelBtf, layout: &SkbLayout) -> bool {
    layout.skb_protocol != ABSENT && btf.tp_btf_args_are(TRACEPOINT, 2, "skb_drop_reason")
}

/// One key of the kernel's aggregation map, summed over CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggEntry {
    pub key: DropKey,
    /// Drops of this key that had no record of their own, since the key was created.
    pub repeats: u64,
    pub last_ns: u64,
    pub netns: u32,
    pub ifindex: u32,
    pub tcp_flags: u8,
    /// Kept only as a REDIRECTed client's SYN (see `DropSignal::redirected`).
    pub redirected: bool,
}

/// Resolves every offset the program reads, from the record format and BTF.
pub fn resolve_layout(format: &Format, btf: &KernelBtf) -> Result<SkbLayout, LayoutError> {
    let m = |ty: &str, path: &str| btf.member_offset(ty, path);
    let skb_protocol = m("sk_buff", "protocol").unwrap_or(ABSENT);
    let (skb_head, skb_network_header) = (m("sk_buff", "head")?, m("sk_buff", "network_header")?);
    Ok(SkbLayout {
        tp_skbaddr: format.offset("skbaddr")?,
        tp_location: format.offset("location")?,
        tp_protocol: format.offset("protocol")?,
        // Kernels before 5.17 have no reason field: every drop then reports UNAVAILABLE and
        // is classed by its location.
        tp_reason: format.offset("reason").unwrap_or(ABSENT),
        skb_protocol,
        skb_hdr_window: SkbLayout::hdr_window(skb_protocol, skb_network_header, skb_head),
        skb_head,
        skb_network_header,
        skb_len: m("sk_buff", "len")?,
        skb_dev: m("sk_buff", "dev")?,
        skb_sk: m("sk_buff", "sk")?,
        dev_ifindex: m("net_device", "ifindex")?,
        dev_nd_net: m("net_device", "nd_net.net")?,
        sk_net: m("sock", "__sk_common.skc_net.net")?,
        net_inum: m("net", "ns.inum")?,
        valid: 1,
    })
}

pub fn read_format(tracefs: &Path) -> Result<Format, TracefsError> {
    Format::read(tracefs, CATEGORY, TRACEPOINT)
}

pub fn decode(rec: &DropEvent, symbols: &Symbols) -> DropSignal {
    let r = symbols.reason(rec.reason, rec.location);
    DropSignal {
        ts_ns: rec.hdr.ts_ns,
        flow: decode::flow_key(&rec.flow),
        tcp_flags: TcpFlags(rec.tcp_flags),
        reason: r.name,
        reason_code: r.code,
        class: r.class,
        location: symbols.location(rec.location),
        netns: rec.netns,
        ifindex: rec.ifindex,
        count: u64::from(rec.count.max(1)),
        ct: conntrack::snapshot(&rec.ct, &symbols.ct),
        redirected: rec.redirected != 0,
    }
}

/// The aggregation key the kernel counted this record's repeats under.
pub fn agg_key(rec: &DropEvent) -> DropKey {
    DropKey {
        flow: rec.flow,
        reason: rec.reason,
        _pad: 0,
        location: rec.location,
    }
}

/// The folded aggregate and the real tuple of a sampled storm drop.
pub fn decode_sample(rec: &StormSample) -> (FlowKey, FlowKey) {
    (decode::flow_key(&rec.folded), decode::flow_key(&rec.flow))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tracer_common::{AF_INET, EventHeader, Flow, IPPROTO_TCP};

    use super::*;
    use crate::{clock::Clock, kernel::kallsyms::Kallsyms};

    #[test]
    fn encodes_a_netfilter_drop_as_the_documented_json() {
        let symbols = Symbols {
            kallsyms: Kallsyms::parse("ffffffff81f81c50 T nf_hook_slow\n"),
            drop_reasons: HashMap::from([(12, "NETFILTER_DROP".to_string())]),
            ..Symbols::default()
        };
        let mut fl = Flow {
            sport: 40000,
            dport: 1521,
            family: AF_INET,
            proto: IPPROTO_TCP,
            ..Flow::default()
        };
        fl.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        fl.daddr[..4].copy_from_slice(&[10, 0, 0, 2]);
        let rec = DropEvent {
            hdr: EventHeader {
                kind: 1,
                ts_ns: 5,
                ..Default::default()
            },
            location: 0xffffffff81f81c50 + 0x9c,
            flow: fl,
            reason: 12,
            len: 60,
            netns: 4026532801,
            ifindex: 2,
            tcp_flags: 0x02,
            count: 1,
            ..Default::default()
        };
        let e =
            crate::pipeline::report::drop_event(&decode(&rec, &symbols), &Clock::new(), "node-a");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["schema"], "droptrace.v1");
        assert_eq!(v["kind"], "drop");
        assert_eq!(v["node"], "node-a");
        assert_eq!(
            v["flow"],
            serde_json::json!({"proto":"tcp","family":"ipv4","src_ip":"10.0.0.1","src_port":40000,
                               "dst_ip":"10.0.0.2","dst_port":1521,
                               "community_id": crate::encode::community_id::tcp(
                                   "10.0.0.1".parse().unwrap(), 40000,
                                   "10.0.0.2".parse().unwrap(), 1521)})
        );
        assert_eq!(v["tcp"]["flags"], "SYN");
        assert_eq!(
            v["drop"],
            serde_json::json!({"reason":"NETFILTER_DROP","reason_code":12,"class":"network",
                               "location":"nf_hook_slow+0x9c"})
        );
        assert_eq!(v["netns"], 4026532801u32);
        assert_eq!(v["ifindex"], 2);
        assert_eq!(v["count"], 1);
        assert!(
            v.get("conntrack").is_none(),
            "no conntrack entry: no section"
        );
    }

    #[test]
    fn layout_of_a_recorded_older_kernel() {
        let btf = KernelBtf::from_bytes(include_bytes!(
            "../../../tests/fixtures/btf/older_layout.btf"
        ))
        .unwrap();
        let format = Format::parse(
            include_str!("../../../tests/fixtures/kfree_skb.format-5.19"),
            "5.19",
        );
        let l = resolve_layout(&format, &btf).unwrap();
        assert_eq!(
            (l.tp_skbaddr, l.tp_location, l.tp_protocol, l.tp_reason),
            (8, 16, 24, 28)
        );
        assert_eq!(
            (l.skb_head, l.skb_network_header, l.skb_len),
            (128, 106, 88)
        );
        assert_eq!((l.skb_dev, l.skb_sk), (16, 24));
        assert_eq!(
            (l.dev_ifindex, l.dev_nd_net, l.sk_net, l.net_inum),
            (184, 192, 16, 24)
        );
        let names = crate::collect::drop_reason_names(Some(&btf), &format.reason_symbols);
        assert_eq!(names[&7], "NETFILTER_DROP");
    }

    #[test]
    fn reason_names_fall_back_to_the_tracepoint_format_without_btf() {
        let format = Format::parse(
            include_str!("../../../tests/fixtures/kfree_skb.format-5.19"),
            "5.19",
        );
        let names = crate::collect::drop_reason_names(None, &format.reason_symbols);
        assert_eq!(names[&48], "TC_INGRESS");
    }

    #[test]
    fn layout_of_a_recorded_kernel_resolves_from_btf_and_its_format() {
        use crate::collect::recorded::{DEBIAN_6_12, btf, format};
        let b = btf(DEBIAN_6_12);
        let l = resolve_layout(&format(DEBIAN_6_12, "kfree_skb"), &b).unwrap();
        assert_eq!(l.valid, 1);
        assert!(l.skb_protocol < 256, "{l:?}");
        // Whether the BTF tracepoint fits is not asked here: its prototype
        // (btf_trace_kfree_skb) is cut from the fixture BTF (pointers become void * there). The
        // running kernel decides: the e2e suite here, the VM legs on 5.10 and 6.1.
        assert!(l.skb_head > 0 && l.skb_head < 256, "{l:?}");
        assert!(l.skb_network_header < 256);
        assert!(l.net_inum != ABSENT && l.dev_nd_net != ABSENT);
    }
}
