//! Conntrack entries: at drop time (skb->_nfct) and on removal (fentry nf_ct_delete).
pub mod netlink;

use std::{collections::HashMap, net::SocketAddr, path::Path};

use tracer_common::{ABSENT, CtEvent, CtInfo, CtLayout, CtTuple};

use super::LayoutError;
use crate::{
    decode::{self, CtSignal, CtSnapshot, FlowKey},
    kernel::btf::KernelBtf,
};

pub const PROGRAM: &str = "nf_ct_delete";
/// The same program as a kprobe, where the function lives in a module.
pub const KPROBE_PROGRAM: &str = "nf_ct_delete_kprobe";
/// Kernel function whose entry is traced.
pub const FUNCTION: &str = "nf_ct_delete";
/// The module conntrack is in where it is not built in (Debian, most distributions).
pub const MODULE: &str = "nf_conntrack";

/// How conntrack removals are traced on this kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// fentry: the function is in vmlinux's BTF (conntrack built in).
    FEntry,
    /// kprobe: conntrack is a loaded module. aya attaches fentry to vmlinux functions only
    /// (a module function needs its BTF object fd at load time), and 5.10 has no module BTF.
    KProbe,
}

impl Removal {
    pub fn program(self) -> &'static str {
        match self {
            Self::FEntry => PROGRAM,
            Self::KProbe => KPROBE_PROGRAM,
        }
    }

    pub fn describe(self) -> String {
        match self {
            Self::FEntry => format!("fentry {FUNCTION}"),
            Self::KProbe => format!("kprobe {FUNCTION} ({MODULE} is a module)"),
        }
    }
}

/// Whether the conntrack module is loaded (or conntrack is built in).
pub fn module_loaded() -> bool {
    Path::new("/sys/module").join(MODULE).is_dir()
}

/// Which hook can trace removals: fentry when vmlinux has the function, a kprobe when the
/// conntrack module is loaded (its BTF has the function, or on kernels without module BTF,
/// the module is there).
pub fn removal(
    vmlinux: &KernelBtf,
    module: Option<&KernelBtf>,
    module_loaded: bool,
) -> Result<Removal, String> {
    if vmlinux.has_func(FUNCTION) {
        Ok(Removal::FEntry)
    } else if module.is_some_and(|m| m.has_func(FUNCTION)) || module_loaded {
        Ok(Removal::KProbe)
    } else {
        Err(format!(
            "function {FUNCTION} is neither in vmlinux nor in a loaded {MODULE} module"
        ))
    }
}

/// Names for ctinfo values and status bits, from BTF enums of this kernel.
#[derive(Debug, Default, Clone)]
pub struct CtNames {
    ctinfo: HashMap<u8, String>,
    /// (bit, name)
    status_bits: Vec<(u32, String)>,
}

impl CtNames {
    pub fn from_btf(btf: &KernelBtf) -> Self {
        let ctinfo = btf
            .enum_values("ip_conntrack_info")
            .unwrap_or_default()
            .into_iter()
            // IP_CT_IS_REPLY aliases ESTABLISHED_REPLY; keep the more specific name.
            .filter(|(n, _)| n != "IP_CT_IS_REPLY" && n != "IP_CT_NUMBER")
            .map(|(n, v)| {
                let n = n.trim_start_matches("IP_CT_").trim_end_matches("_REPLY");
                (v as u8, n.to_string())
            })
            .collect();
        let mut status_bits: Vec<(u32, String)> = btf
            .enum_values("ip_conntrack_status")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(n, v)| {
                let name = n.strip_prefix("IPS_")?.strip_suffix("_BIT")?;
                let name = match name {
                    "DST_NAT" => "DNAT",
                    "SRC_NAT" => "SNAT",
                    other => other,
                };
                Some((v as u32, name.to_string()))
            })
            .collect();
        status_bits.sort();
        status_bits.dedup_by_key(|(b, _)| *b);
        Self {
            ctinfo,
            status_bits,
        }
    }

    /// Names given directly (tests, benches): ctinfo values and status bits.
    pub fn from_parts(ctinfo: &[(u8, &str)], status_bits: &[(u32, &str)]) -> Self {
        Self {
            ctinfo: ctinfo.iter().map(|(v, n)| (*v, n.to_string())).collect(),
            status_bits: status_bits
                .iter()
                .map(|(b, n)| (*b, n.to_string()))
                .collect(),
        }
    }

    pub(crate) fn status(&self, status: u64) -> Vec<String> {
        self.status_bits
            .iter()
            .filter(|(bit, _)| *bit < 64 && status & (1u64 << bit) != 0)
            .map(|(_, n)| n.clone())
            .collect()
    }

    pub(crate) fn bit(&self, name: &str) -> Option<u32> {
        self.status_bits
            .iter()
            .find(|(_, n)| n == name)
            .map(|(b, _)| *b)
    }
}

pub fn resolve_layout(btf: &KernelBtf, names: &CtNames) -> Result<CtLayout, LayoutError> {
    let m = |ty: &str, path: &str| btf.member_offset(ty, path);
    let seen_reply = names.bit("SEEN_REPLY").ok_or_else(|| {
        LayoutError::Missing("enum ip_conntrack_status IPS_SEEN_REPLY_BIT".into())
    })?;
    Ok(CtLayout {
        skb_nfct: m("sk_buff", "_nfct")?,
        ct_status: m("nf_conn", "status")?,
        ct_mark: m("nf_conn", "mark").unwrap_or(ABSENT),
        ct_zone_id: m("nf_conn", "zone.id").unwrap_or(ABSENT),
        ct_net: m("nf_conn", "ct_net.net")?,
        ct_tuplehash: m("nf_conn", "tuplehash")?,
        tuplehash_size: btf.struct_size("nf_conntrack_tuple_hash")?,
        hash_tuple: m("nf_conntrack_tuple_hash", "tuple")?,
        src_u3: m("nf_conntrack_tuple", "src.u3")?,
        src_port: m("nf_conntrack_tuple", "src.u.all")?,
        src_l3num: m("nf_conntrack_tuple", "src.l3num")?,
        dst_u3: m("nf_conntrack_tuple", "dst.u3")?,
        dst_port: m("nf_conntrack_tuple", "dst.u.all")?,
        dst_protonum: m("nf_conntrack_tuple", "dst.protonum")?,
        net_inum: m("net", "ns.inum")?,
        seen_reply_mask: 1 << seen_reply,
        valid: 1,
        _pad: 0,
    })
}

fn key(family: u8, t: &CtTuple) -> FlowKey {
    FlowKey {
        src: SocketAddr::new(decode::ip(family, &t.saddr), t.sport),
        dst: SocketAddr::new(decode::ip(family, &t.daddr), t.dport),
    }
}

/// The snapshot of a skb's entry; None when the skb had no conntrack entry.
pub fn snapshot(ct: &CtInfo, names: &CtNames) -> Option<CtSnapshot> {
    if ct.present == 0 {
        return None;
    }
    Some(CtSnapshot {
        state: names
            .ctinfo
            .get(&ct.ctinfo)
            .cloned()
            .unwrap_or_else(|| format!("CTINFO_{}", ct.ctinfo)),
        status: names.status(ct.status),
        original: key(ct.family, &ct.original),
        reply: key(ct.family, &ct.reply),
        mark: ct.mark,
        zone: ct.zone,
    })
}

pub fn decode(rec: &CtEvent, names: &CtNames) -> Option<CtSignal> {
    let mut ct = snapshot(&rec.ct, names)?;
    ct.state = "UNREPLIED".to_string();
    Some(CtSignal {
        ts_ns: rec.hdr.ts_ns,
        ct,
        netns: rec.netns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ctinfo values and status bits as every kernel since 2.6 defines them.
    pub(crate) fn names() -> CtNames {
        CtNames::from_parts(
            &[
                (0, "ESTABLISHED"),
                (1, "RELATED"),
                (2, "NEW"),
                (3, "ESTABLISHED"),
                (7, "UNTRACKED"),
            ],
            &[
                (0, "EXPECTED"),
                (1, "SEEN_REPLY"),
                (2, "ASSURED"),
                (3, "CONFIRMED"),
                (4, "SRC_NAT"),
                (5, "DNAT"),
            ],
        )
    }

    #[test]
    fn layout_and_names_of_a_recorded_kernel() {
        // Debian 6.12: nf_conntrack is a module, its types come from the module's BTF.
        let r = crate::collect::recorded::resolve(crate::collect::recorded::DEBIAN_6_12, true);
        let l = r.ct.unwrap();
        assert_eq!(l.valid, 1);
        assert_eq!(l.seen_reply_mask, 2);
        assert_eq!(l.src_u3, 0);
        let names = &r.symbols.ct;
        assert_eq!(names.ctinfo[&2], "NEW");
        assert_eq!(names.ctinfo[&3], "ESTABLISHED");
        assert_eq!(names.ctinfo[&7], "UNTRACKED");
        assert_eq!(names.status(0b10_0010), vec!["SEEN_REPLY", "DNAT"]);
    }

    #[test]
    fn dnat_is_read_off_the_reply_tuple() {
        let names = names();
        let mut info = CtInfo {
            present: 1,
            ctinfo: 2,
            family: tracer_common::AF_INET,
            protonum: 6,
            status: 1 << 5,
            ..CtInfo::default()
        };
        info.original.saddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        info.original.daddr[..4].copy_from_slice(&[10, 96, 0, 10]);
        info.original.sport = 40000;
        info.original.dport = 1521;
        info.reply.saddr[..4].copy_from_slice(&[10, 244, 1, 5]);
        info.reply.daddr[..4].copy_from_slice(&[10, 0, 0, 1]);
        info.reply.sport = 1521;
        info.reply.dport = 40000;
        let s = snapshot(&info, &names).unwrap();
        assert_eq!(s.state, "NEW");
        assert_eq!(s.nat(), "dnat");
        assert_eq!(s.status, vec!["DNAT"]);
        assert_eq!(s.original.dst.to_string(), "10.96.0.10:1521");
        assert_eq!(s.reply.src.to_string(), "10.244.1.5:1521");
    }
}
