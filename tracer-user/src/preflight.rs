//! Can tracing work here? Shared by `droptrace check` and the start of `droptrace run`.
use std::path::PathBuf;

use serde::Serialize;

use crate::{
    collectors::skb_drop,
    kernel::{
        btf::{KernelBtf, VMLINUX},
        caps, tracefs,
    },
};

/// Capabilities `run` needs (CAP_SYS_ADMIN covers the first two).
pub const REQUIRED_CAPS: [u32; 3] = [caps::CAP_BPF, caps::CAP_PERFMON, caps::CAP_NET_ADMIN];

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// Required for tracing (false: a feature is degraded but tracing runs).
    pub required: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub ok: bool,
    pub checks: Vec<Check>,
    #[serde(skip)]
    pub tracefs: Option<PathBuf>,
}

impl Report {
    pub fn first_failure(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.required && !c.ok)
    }
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// One line naming what is missing, or None when every capability is there.
pub fn missing_privileges() -> Option<String> {
    let missing = caps::missing(caps::effective(), &REQUIRED_CAPS);
    if missing.is_empty() {
        return None;
    }
    let names: Vec<_> = missing.iter().map(|&c| caps::name(c)).collect();
    Some(format!(
        "missing capability {} (run as root, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN)",
        names.join(", ")
    ))
}

pub fn run() -> Report {
    let mut checks = Vec::new();
    let mut push = |name: &str, ok: bool, required: bool, detail: String| {
        checks.push(Check {
            name: name.to_string(),
            ok,
            required,
            detail,
        })
    };

    match missing_privileges() {
        None => push("privileges", true, true, "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN".into()),
        Some(why) => push("privileges", false, true, why),
    }

    let btf = KernelBtf::vmlinux();
    match &btf {
        Ok(_) => push("btf", true, true, VMLINUX.to_string()),
        Err(e) => push("btf", false, true, e.to_string()),
    }

    let tracefs = match tracefs::ensure_mounted() {
        Ok(p) => {
            push("tracefs", true, true, p.display().to_string());
            Some(p)
        }
        Err(e) => {
            push("tracefs", false, true, e.to_string());
            None
        }
    };

    if let Some(root) = &tracefs {
        match skb_drop::read_format(root) {
            Ok(format) => {
                push(
                    "tracepoint skb:kfree_skb",
                    true,
                    true,
                    "present".to_string(),
                );
                let has_reason = format.field("reason").is_ok();
                let names = btf
                    .as_ref()
                    .ok()
                    .and_then(|b| b.enum_values("skb_drop_reason").ok())
                    .map(|v| v.len());
                push(
                    "drop reasons",
                    has_reason,
                    false,
                    match (has_reason, names) {
                        (true, Some(n)) => format!("{n} names from BTF enum skb_drop_reason"),
                        (true, None) => "names from the tracepoint format".to_string(),
                        (false, _) => "kernel < 5.17: every drop reports NOT_SPECIFIED".to_string(),
                    },
                );
                if let Ok(b) = &btf {
                    match skb_drop::resolve_layout(&format, b) {
                        Ok(_) => push(
                            "sk_buff layout",
                            true,
                            true,
                            "offsets resolved from BTF".to_string(),
                        ),
                        Err(e) => push("sk_buff layout", false, true, e.to_string()),
                    }
                }
            }
            Err(e) => push("tracepoint skb:kfree_skb", false, true, e.to_string()),
        }
    }

    let ok = checks.iter().all(|c| c.ok || !c.required);
    Report {
        kernel: kernel_release(),
        ok,
        checks,
        tracefs,
    }
}
