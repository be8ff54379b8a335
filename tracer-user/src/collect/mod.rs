//! One module per kernel signal. Each knows how to check the running kernel can support it,
//! what layout to hand its program, how to attach, and how to decode its records.
pub mod conntrack;
pub mod drops;
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
    kernel::{btf::KernelBtf, kallsyms::Kallsyms},
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
    pub tcp: Result<TcpLayout, String>,
    pub retransmit: Result<(), String>,
    pub ct: Result<CtLayout, String>,
    pub ct_delete: Result<(), String>,
    pub symbols: Symbols,
}

pub fn resolve(tracefs: &Path, btf: &KernelBtf) -> Result<Resolved, LayoutError> {
    // /proc/kallsyms takes ~150 ms to read: overlap it with the BTF lookups.
    let kallsyms = std::thread::spawn(Kallsyms::load);
    let drop_format = drops::read_format(tracefs)?;
    let skb = drops::resolve_layout(&drop_format, btf)?;
    let mut symbols = Symbols {
        kallsyms: Kallsyms::default(),
        drop_reasons: drop_reason_names(Some(btf), &drop_format.reason_symbols),
        ct: conntrack::CtNames::from_btf(btf),
        ..Symbols::default()
    };
    let (state_format, retransmit_format) = tcp::read_formats(tracefs);
    let tcp = state_format.and_then(|s| {
        let (layout, names) = tcp::resolve_layout(&s, retransmit_format.as_ref(), btf)?;
        symbols.tcp_states = names;
        Ok(layout)
    });
    let retransmit = match (&tcp, &retransmit_format) {
        (Ok(_), Some(_)) => Ok(()),
        (Err(e), _) => Err(format!("needs sock:inet_sock_set_state: {e}")),
        (_, None) => Err("tracepoint tcp:tcp_retransmit_skb does not exist on this kernel".into()),
    };
    let ct = conntrack::resolve_layout(btf, &symbols.ct).map_err(|e| e.to_string());
    let ct_delete = match &ct {
        Ok(_) if btf.has_func(conntrack::FUNCTION) => Ok(()),
        Ok(_) => Err(format!(
            "function {} not in this kernel's BTF (nf_conntrack not built in?)",
            conntrack::FUNCTION
        )),
        Err(e) => Err(e.clone()),
    };
    symbols.kallsyms = kallsyms.join().unwrap_or_default();
    Ok(Resolved {
        skb,
        tcp: tcp.map_err(|e| e.to_string()),
        retransmit,
        ct,
        ct_delete,
        symbols,
    })
}
