//! What the running kernel can report, for the assertions that differ between kernels (the VM
//! legs run this suite on Debian's 5.10 to 7.3): drop reasons exist from 5.17 on; before that
//! droptrace reports every reason as `UNAVAILABLE` and classes drops by their code location.
use std::{path::PathBuf, process::Command, sync::OnceLock};

use serde_json::Value;

/// Where netfilter frees what a rule dropped.
pub const NETFILTER_FUNCTIONS: [&str; 3] = ["nf_hook_slow", "nft_do_chain", "ipt_do_table"];

fn tracefs() -> PathBuf {
    for p in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
        if PathBuf::from(p).join("events").is_dir() {
            return p.into();
        }
    }
    let st = Command::new("mount")
        .args(["-t", "tracefs", "nodev", "/sys/kernel/tracing"])
        .status()
        .expect("mount tracefs");
    assert!(st.success(), "cannot mount tracefs");
    "/sys/kernel/tracing".into()
}

/// Whether skb:kfree_skb carries a drop reason on this kernel (5.17+).
pub fn has_drop_reasons() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        let path = tracefs().join("events/skb/kfree_skb/format");
        let format =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        format
            .lines()
            .any(|l| l.contains("field:") && l.contains(" reason;"))
    })
}

/// The reason a drop the kernel calls `name` is reported with here.
pub fn reason(name: &'static str) -> &'static str {
    if has_drop_reasons() {
        name
    } else {
        "UNAVAILABLE"
    }
}

/// Whether `d` (a drop record's `drop` section, or an entry of a stall's `drops`) is a
/// netfilter drop as this kernel can tell it: by its reason, or before 5.17 by its location.
/// Either way its class is `network`.
pub fn is_netfilter_drop(d: &Value) -> bool {
    let location = d["location"].as_str().unwrap_or("");
    let at_netfilter = NETFILTER_FUNCTIONS
        .iter()
        .any(|f| location.starts_with(&format!("{f}+")));
    d["reason"] == reason("NETFILTER_DROP")
        && d["class"] == "network"
        && (has_drop_reasons() || at_netfilter)
}
