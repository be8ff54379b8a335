//! One module per kernel signal. Each knows how to check the running kernel can support it,
//! what layout to hand its program, how to attach, and how to decode its records.
pub mod conntrack;
pub mod skb_drop;
pub mod tcp_state;

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

use std::collections::HashMap;

use crate::kernel::{btf::KernelBtf, kallsyms::Kallsyms};

/// What decoding needs to turn kernel numbers into names.
pub struct Symbols {
    pub kallsyms: Kallsyms,
    /// Drop reason value -> name (without the SKB_DROP_REASON_ prefix).
    pub drop_reasons: HashMap<u32, String>,
}

impl Symbols {
    pub fn drop_reason(&self, code: u32) -> String {
        self.drop_reasons
            .get(&code)
            .cloned()
            .unwrap_or_else(|| format!("REASON_{code}"))
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
