//! Layouts resolved from kernels recorded inside the VM legs (`cargo xtask test-kernels
//! --save-fixtures`): each kernel's BTF, cut down to the types droptrace reads, the conntrack
//! module's split BTF where it has one, and its tracepoint formats. Host-only: no kernel of
//! these is running here, the same resolution code runs on their facts.
use std::path::PathBuf;

use tracer_common::ABSENT;

use super::{KernelFacts, Resolved, conntrack::Removal, resolve_facts, tcp::RetransmitFamily};
use crate::kernel::{btf::KernelBtf, tracefs::Format};

/// A recorded kernel of each generation the unit tests need (see tests/fixtures/kernels).
pub(crate) const DEBIAN_6_12: &str = "6.12.118+deb13-amd64";

fn dir(release: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kernels")
        .join(release)
}

pub(crate) fn format(release: &str, name: &str) -> Format {
    let path = dir(release).join(format!("{name}.format"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    Format::parse(&text, &path.display().to_string())
}

/// The recorded kernel's BTF (vmlinux, cut to the types droptrace reads).
pub(crate) fn btf(release: &str) -> KernelBtf {
    KernelBtf::from_file(dir(release).join("vmlinux.btf")).expect("fixture BTF")
}

/// Resolves every layout of `release` as `droptrace check` would on that kernel, with the
/// conntrack module loaded or not.
pub(crate) fn resolve(release: &str, conntrack_loaded: bool) -> Resolved {
    let btf = btf(release);
    let module = dir(release).join("nf_conntrack.btf");
    let conntrack_btf = (conntrack_loaded && module.is_file())
        .then(|| btf.split_file(&module).expect("fixture module BTF"));
    resolve_facts(KernelFacts {
        drop_format: format(release, "kfree_skb"),
        state_format: Ok(format(release, "inet_sock_set_state")),
        retransmit_format: Ok(format(release, "tcp_retransmit_skb")),
        btf: &btf,
        conntrack_btf,
        conntrack_loaded,
    })
    .unwrap_or_else(|e| panic!("{release}: {e}"))
}

fn reason_code(r: &Resolved, name: &str) -> Option<u32> {
    r.symbols
        .drop_reasons
        .iter()
        .find(|(_, n)| n.as_str() == name)
        .map(|(v, _)| *v)
}

/// What every recorded kernel has in common: the lifecycle hook, the conntrack layout of a
/// dropped skb, and the sk_buff reads.
fn assert_common(release: &str, r: &Resolved) {
    assert!(r.lifecycle.is_ok(), "{release}: {:?}", r.lifecycle);
    let tcp = r.tcp.as_ref().expect("socket layout");
    assert_eq!(tcp.valid, 1);
    assert!(
        tcp.st.family != ABSENT && tcp.rt_skaddr != ABSENT,
        "{tcp:?}"
    );
    let ct = r.ct.as_ref().unwrap_or_else(|e| panic!("{release}: {e}"));
    assert_eq!(ct.valid, 1);
    assert_eq!(ct.seen_reply_mask, 2, "IPS_SEEN_REPLY_BIT is 1");
    assert_eq!(r.symbols.ct.status(1 << 5), vec!["DNAT"]);
    assert_eq!(r.skb.tp_skbaddr, 8);
    assert_eq!(r.skb.tp_location, 16);
}

#[test]
fn debian_5_10_has_no_reason_field_and_no_retransmit_family() {
    let release = "5.10.0-46-amd64";
    let r = resolve(release, true);
    assert_common(release, &r);
    assert_eq!(r.skb.tp_protocol, 24);
    assert_eq!(r.skb.tp_reason, ABSENT, "no reason before 5.17");
    assert!(r.symbols.drop_reasons.is_empty(), "no enum skb_drop_reason");
    // The retransmit record has no family: it comes from sk->__sk_common.skc_family, and the
    // lifecycle hook is not taken down with it.
    assert_eq!(r.retransmit, Ok(RetransmitFamily::Socket));
    let tcp = r.tcp.as_ref().unwrap();
    assert_eq!(tcp.rt.family, ABSENT);
    assert_eq!(tcp.sk_family, 16);
    assert_eq!((tcp.rt_skaddr, tcp.rt_state, tcp.rt.sport), (16, 24, 28));
    // nf_conn is in vmlinux's BTF; nf_ct_delete (a module function) is in no BTF: 5.10 has
    // no module BTF. With the module loaded, the kprobe traces removals.
    assert_eq!(r.ct_btf, "vmlinux");
    assert_eq!(r.ct_delete, Ok(Removal::KProbe));
    let unloaded = resolve(release, false);
    assert!(unloaded.ct_delete.is_err(), "{:?}", unloaded.ct_delete);
}

#[test]
fn debian_6_1_names_reasons_from_btf() {
    let release = "6.1.0-57-amd64";
    let r = resolve(release, true);
    assert_common(release, &r);
    assert_eq!((r.skb.tp_protocol, r.skb.tp_reason), (24, 28));
    assert_eq!(reason_code(&r, "NETFILTER_DROP"), Some(7));
    assert_eq!(r.retransmit, Ok(RetransmitFamily::Record));
    // The module's split BTF has nf_ct_delete: a kprobe, since aya attaches fentry to vmlinux
    // functions only.
    assert_eq!(r.ct_delete, Ok(Removal::KProbe));
}

#[test]
fn debian_6_12_has_rx_sk_before_protocol() {
    let release = "6.12.118+deb13-amd64";
    let r = resolve(release, true);
    assert_common(release, &r);
    assert_eq!((r.skb.tp_protocol, r.skb.tp_reason), (32, 36));
    assert_eq!(reason_code(&r, "NETFILTER_DROP"), Some(11));
    assert_eq!(r.retransmit, Ok(RetransmitFamily::Record));
    assert_eq!(r.ct_delete, Ok(Removal::KProbe));
}

#[test]
fn debian_7_3_moves_reason_numbers_again() {
    let release = "7.3.4+deb13-amd64";
    let r = resolve(release, true);
    assert_common(release, &r);
    assert_eq!((r.skb.tp_protocol, r.skb.tp_reason), (32, 36));
    assert_eq!(reason_code(&r, "NETFILTER_DROP"), Some(12));
    assert_eq!(r.retransmit, Ok(RetransmitFamily::Record));
    assert_eq!(r.ct_delete, Ok(Removal::KProbe));
    // This module's BTF repeats struct nf_conn (pahole did not fold it into vmlinux's):
    // both give the same layout.
    let module = KernelBtf::from_file(dir(release).join("vmlinux.btf"))
        .and_then(|b| b.split_file(dir(release).join("nf_conntrack.btf")))
        .unwrap();
    let names = super::conntrack::CtNames::from_btf(&module);
    assert_eq!(
        super::conntrack::resolve_layout(&module, &names).unwrap(),
        *r.ct.as_ref().unwrap()
    );
    assert_eq!(r.ct_btf, "vmlinux");
}

#[test]
fn reason_names_agree_between_btf_and_the_format_on_every_recorded_kernel() {
    for release in [
        "6.1.0-57-amd64",
        "6.12.118+deb13-amd64",
        "7.3.4+deb13-amd64",
    ] {
        let r = resolve(release, true);
        let f = format(release, "kfree_skb");
        for (v, name) in &f.reason_symbols {
            assert_eq!(
                r.symbols.drop_reasons.get(&(*v as u32)),
                Some(name),
                "{release}: reason {v}"
            );
        }
        assert!(f.reason_symbols.len() > 50, "{release}");
    }
}
