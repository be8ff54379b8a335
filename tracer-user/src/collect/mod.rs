//! One module per kernel signal. Each knows how to check the running kernel can support it,
//! what layout to hand its program, how to attach, and how to decode its records.
pub mod batch;
pub mod collector;
pub mod conntrack;
pub mod drops;
pub mod loader;
#[cfg(test)]
pub(crate) mod recorded;
pub mod tcp;
pub mod tns;

use crate::kernel::{btf::BtfError, tracefs::TracefsError};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error(transparent)]
    Tracefs(#[from] TracefsError),
    #[error(transparent)]
    Btf(#[from] BtfError),
    #[error("{0} not found in this kernel's BTF")]
    Missing(String),
}

use std::{cell::RefCell, collections::HashMap, path::Path};

use tracer_common::{CtLayout, SkbLayout, TcpLayout};

use crate::{
    decode::drop_class::DropClass,
    kernel::{btf::KernelBtf, kallsyms::Kallsyms, tracefs},
};

/// What decoding needs to turn kernel numbers into names.
#[derive(Default)]
pub struct Symbols {
    pub kallsyms: Kallsyms,
    /// Drop reason value -> name (without the SKB_DROP_REASON_ prefix).
    pub drop_reasons: HashMap<u32, String>,
    pub tcp_states: tcp::StateNames,
    pub ct: conntrack::CtNames,
    /// `function+0xoffset` by address: drops come from a handful of places, and formatting
    /// each one anew was a measurable part of decoding.
    pub locations: RefCell<HashMap<u64, String>>,
    /// Class by (reason, location), memoised: a handful of pairs make up almost every drop.
    pub classes: RefCell<HashMap<(u32, u64), DropClass>>,
}

/// A kernel drop reason in words: name, this kernel's number, class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub name: String,
    pub code: Option<u32>,
    pub class: DropClass,
}

impl Symbols {
    pub fn location(&self, addr: u64) -> String {
        let mut cache = self.locations.borrow_mut();
        if let Some(s) = cache.get(&addr) {
            return s.clone();
        }
        let s = self.kallsyms.symbolize(addr);
        if cache.len() < 4096 {
            cache.insert(addr, s.clone());
        }
        s
    }

    pub fn drop_reason(&self, code: u32) -> String {
        if code == tracer_common::ABSENT {
            return crate::decode::drop_class::UNAVAILABLE.to_string();
        }
        self.drop_reasons
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("REASON_{code}"))
    }

    /// The reason `code` (`ABSENT` on kernels without reasons) of a drop at `location`.
    pub fn reason(&self, code: u32, location: u64) -> Reason {
        let name = self.drop_reason(code);
        let memo = self.classes.borrow().get(&(code, location)).copied();
        let class = memo.unwrap_or_else(|| {
            let c = crate::decode::drop_class::classify(Some(&name), &self.location(location));
            let mut m = self.classes.borrow_mut();
            if m.len() < 4096 {
                m.insert((code, location), c);
            }
            c
        });
        Reason {
            name,
            code: (code != tracer_common::ABSENT).then_some(code),
            class,
        }
    }
}

/// Drop reason names from BTF `enum skb_drop_reason`, or else from the tracepoint's
/// `__print_symbolic` table.
pub fn drop_reason_names(
    btf: Option<&KernelBtf>,
    from_format: &[(u64, String)],
) -> HashMap<u32, String> {
    if let Some(values) = btf.and_then(|b| b.enum_values("skb_drop_reason").ok()) {
        return values
            .into_iter()
            .map(|(name, v)| {
                let short = name
                    .strip_prefix("SKB_DROP_REASON_")
                    .unwrap_or(&name)
                    .to_string();
                (v as u32, short)
            })
            .collect();
    }
    from_format
        .iter()
        .map(|(v, name)| (*v as u32, name.clone()))
        .collect()
}

/// Every collector's layout for this kernel. The drop collector is required; the others are
/// optional and say why when they cannot run.
pub struct Resolved {
    pub skb: SkbLayout,
    /// skb:kfree_skb can be attached as a BTF tracepoint (see `drops::btf_hook_fits`).
    pub drop_btf: bool,
    /// Socket offsets shared by both TCP programs, with whichever record parts resolved.
    pub tcp: Result<TcpLayout, String>,
    /// sock:inet_sock_set_state.
    pub lifecycle: Result<(), String>,
    /// tcp:tcp_retransmit_skb, and where its address family comes from.
    pub retransmit: Result<tcp::RetransmitFamily, String>,
    pub ct: Result<CtLayout, String>,
    /// Where the conntrack types were found (vmlinux, or a module's split BTF).
    pub ct_btf: &'static str,
    /// How conntrack removals can be traced on this kernel.
    pub ct_delete: Result<conntrack::Removal, String>,
    /// The cgroup v2 root the Oracle Net programs attach to (None for recorded kernels).
    pub cgroup2_root: Option<std::path::PathBuf>,
    pub symbols: Symbols,
}

/// What layouts are resolved from: the running kernel's, or a recorded kernel's (fixtures).
pub struct KernelFacts<'a> {
    pub drop_format: tracefs::Format,
    pub state_format: Result<tracefs::Format, LayoutError>,
    pub retransmit_format: Result<tracefs::Format, LayoutError>,
    pub btf: &'a KernelBtf,
    /// The conntrack module's split BTF, where it is a loaded module on a kernel with
    /// module BTF (5.11+).
    pub conntrack_btf: Option<KernelBtf>,
    /// Whether the conntrack module is loaded (kernels without module BTF say so only here).
    pub conntrack_loaded: bool,
}

pub fn resolve(tracefs: &Path, btf: &KernelBtf) -> Result<Resolved, LayoutError> {
    // /proc/kallsyms takes ~150 ms to read: overlap it with the BTF lookups.
    let kallsyms = std::thread::spawn(Kallsyms::load);
    let (state_format, retransmit_format) = tcp::read_formats(tracefs);
    let mut r = resolve_facts(KernelFacts {
        drop_format: drops::read_format(tracefs)?,
        state_format,
        retransmit_format,
        btf,
        // Distribution kernels build nf_conntrack as a module: its functions, and any type
        // vmlinux itself does not use, are in the module's split BTF.
        conntrack_btf: btf.module(conntrack::MODULE).ok(),
        conntrack_loaded: conntrack::module_loaded(),
    })?;
    r.symbols.kallsyms = kallsyms.join().unwrap_or_default();
    r.cgroup2_root = tns::cgroup2_root();
    Ok(r)
}

pub fn resolve_facts(k: KernelFacts) -> Result<Resolved, LayoutError> {
    let btf = k.btf;
    let skb = drops::resolve_layout(&k.drop_format, btf)?;
    let drop_btf = drops::btf_hook_fits(btf, &skb);
    let mut symbols = Symbols {
        drop_reasons: drop_reason_names(Some(btf), &k.drop_format.reason_symbols),
        ..Symbols::default()
    };
    let (tcp, lifecycle, retransmit) =
        resolve_tcp(btf, k.state_format, k.retransmit_format, &mut symbols);
    let module_btf = k.conntrack_btf;
    // struct nf_conn from vmlinux where vmlinux itself uses it (5.10 and the Debian kernels
    // checked), else from the module's split BTF.
    let mut ct_btf = "vmlinux";
    symbols.ct = conntrack::CtNames::from_btf(btf);
    let mut ct = conntrack::resolve_layout(btf, &symbols.ct);
    if let (Err(_), Some(m)) = (&ct, &module_btf) {
        ct_btf = conntrack::MODULE;
        symbols.ct = conntrack::CtNames::from_btf(m);
        ct = conntrack::resolve_layout(m, &symbols.ct);
    }
    let ct = ct.map_err(|e| e.to_string());
    let ct_delete = match &ct {
        Ok(_) => conntrack::removal(btf, module_btf.as_ref(), k.conntrack_loaded),
        Err(e) => Err(e.clone()),
    };
    Ok(Resolved {
        skb,
        drop_btf,
        tcp,
        lifecycle,
        retransmit,
        ct,
        ct_btf,
        ct_delete,
        cgroup2_root: None,
        symbols,
    })
}

type TcpParts = (
    Result<TcpLayout, String>,
    Result<(), String>,
    Result<tcp::RetransmitFamily, String>,
);

/// The two TCP hooks, each failing on its own: a retransmit record without `family` (5.10)
/// must not take the lifecycle hook down with it, nor the other way round.
fn resolve_tcp(
    btf: &KernelBtf,
    state_format: Result<tracefs::Format, LayoutError>,
    retransmit_format: Result<tracefs::Format, LayoutError>,
    symbols: &mut Symbols,
) -> TcpParts {
    let mut layout = match tcp::resolve_socket(btf) {
        Ok(l) => l,
        Err(e) => {
            let e = format!("socket layout: {e}");
            return (Err(e.clone()), Err(e.clone()), Err(e));
        }
    };
    let lifecycle = state_format
        .and_then(|s| tcp::resolve_lifecycle(&mut layout, &s))
        .map(|names| symbols.tcp_states = names)
        .map_err(|e| e.to_string());
    let retransmit = retransmit_format
        .and_then(|r| {
            let family = tcp::resolve_retransmit(&mut layout, &r, btf)?;
            if symbols.tcp_states.is_empty() {
                symbols.tcp_states = tcp::state_names(&r, "state");
            }
            Ok(family)
        })
        .map_err(|e| e.to_string());
    let tcp = if lifecycle.is_err() && retransmit.is_err() {
        Err("neither TCP tracepoint resolved".to_string())
    } else {
        Ok(layout)
    };
    (tcp, lifecycle, retransmit)
}
