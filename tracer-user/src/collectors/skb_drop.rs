//! skb:kfree_skb: packets freed with a drop reason.
use std::path::Path;

use tracer_common::{ABSENT, AF_INET6, DropEvent, SkbLayout};

use super::Symbols;
use crate::{
    clock::Clock,
    event::{self, Event, Kind},
    kernel::{
        btf::{BtfError, KernelBtf},
        tracefs::{Format, TracefsError},
    },
};

pub const CATEGORY: &str = "skb";
pub const TRACEPOINT: &str = "kfree_skb";
pub const PROGRAM: &str = "kfree_skb";

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Btf(#[from] BtfError),
}

/// Resolves every offset the program reads, from the record format and BTF.
pub fn resolve_layout(format: &Format, btf: &KernelBtf) -> Result<SkbLayout, LayoutError> {
    let m = |ty: &str, path: &str| btf.member_offset(ty, path);
    Ok(SkbLayout {
        tp_skbaddr: format.offset("skbaddr")?,
        tp_location: format.offset("location")?,
        tp_protocol: format.offset("protocol")?,
        // Kernels before 5.17 have no reason field: every drop is then NOT_SPECIFIED.
        tp_reason: format.offset("reason").unwrap_or(ABSENT),
        skb_head: m("sk_buff", "head")?,
        skb_network_header: m("sk_buff", "network_header")?,
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

/// Decoded flow of a kernel record.
pub fn flow(f: &tracer_common::Flow) -> event::Flow {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let (family, src_ip, dst_ip) = if f.family == AF_INET6 {
        (
            event::Family::Ipv6,
            IpAddr::V6(Ipv6Addr::from(f.saddr)),
            IpAddr::V6(Ipv6Addr::from(f.daddr)),
        )
    } else {
        let v4 = |a: &[u8; 16]| IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]));
        (event::Family::Ipv4, v4(&f.saddr), v4(&f.daddr))
    };
    event::Flow {
        proto: "tcp".to_string(),
        family,
        src_ip,
        src_port: f.sport,
        dst_ip,
        dst_port: f.dport,
    }
}

pub fn decode(rec: &DropEvent, symbols: &Symbols, clock: &Clock, node: &str) -> Event {
    let mut e = Event::new(Kind::Drop, clock.rfc3339(rec.hdr.ts_ns), node);
    e.flow = Some(flow(&rec.flow));
    e.tcp = Some(event::Tcp {
        flags: event::tcp_flags(rec.tcp_flags),
    });
    e.drop = Some(event::Drop {
        reason: symbols.drop_reason(rec.reason),
        reason_code: rec.reason,
        location: symbols.kallsyms.symbolize(rec.location),
    });
    e.netns = Some(rec.netns);
    e.ifindex = Some(rec.ifindex);
    e.count = u64::from(rec.count.max(1));
    e
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tracer_common::{AF_INET, EventHeader, Flow, IPPROTO_TCP};

    use super::*;
    use crate::kernel::kallsyms::Kallsyms;

    #[test]
    fn encodes_a_netfilter_drop_as_the_documented_json() {
        let symbols = Symbols {
            kallsyms: Kallsyms::parse("ffffffff81f81c50 T nf_hook_slow\n"),
            drop_reasons: HashMap::from([(12, "NETFILTER_DROP".to_string())]),
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
        let e = decode(&rec, &symbols, &Clock::new(), "node-a");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["schema"], "droptrace.v1");
        assert_eq!(v["kind"], "drop");
        assert_eq!(v["node"], "node-a");
        assert_eq!(
            v["flow"],
            serde_json::json!({"proto":"tcp","family":"ipv4","src_ip":"10.0.0.1","src_port":40000,
                               "dst_ip":"10.0.0.2","dst_port":1521})
        );
        assert_eq!(v["tcp"]["flags"], "SYN");
        assert_eq!(
            v["drop"],
            serde_json::json!({"reason":"NETFILTER_DROP","reason_code":12,"location":"nf_hook_slow+0x9c"})
        );
        assert_eq!(v["netns"], 4026532801u32);
        assert_eq!(v["ifindex"], 2);
        assert_eq!(v["count"], 1);
    }

    #[test]
    fn layout_of_the_running_kernel_resolves_from_btf_and_tracefs() {
        let btf = KernelBtf::vmlinux().expect("this machine has BTF");
        let Some(root) = crate::kernel::tracefs::mounted() else {
            // tracefs is mounted by `droptrace check`/`run` (needs root); the recorded format
            // of this kernel generation stands in.
            let f = Format::parse(include_str!("../../tests/fixtures/kfree_skb.format-6.18"), "x");
            let l = resolve_layout(&f, &btf).unwrap();
            assert_eq!(l.valid, 1);
            return;
        };
        let l = resolve_layout(&read_format(&root).unwrap(), &btf).unwrap();
        assert_eq!(l.valid, 1);
        assert!(l.skb_head > 0 && l.skb_head < 256, "{l:?}");
        assert!(l.skb_network_header < 256);
        assert!(l.net_inum != ABSENT && l.dev_nd_net != ABSENT);
    }
}
