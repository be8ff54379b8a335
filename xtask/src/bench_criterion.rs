//! The userspace parts of `cargo xtask bench`: criterion micro-benchmarks and memory with a
//! large cluster snapshot.
use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::{status, workspace_root};

/// Criterion benches of tracer-user: (measurement, (value, detail)).
pub fn run() -> anyhow::Result<Vec<(String, (String, String))>> {
    let benches: &[(&str, &str)] = &[];
    let mut rows = Vec::new();
    for (bench, what) in benches {
        status(
            Command::new("cargo")
                .current_dir(workspace_root())
                .env("DROPTRACE_EBPF", "stub")
                .args(["bench", "-p", "tracer-user", "--bench", bench]),
        )
        .with_context(|| format!("cargo bench {bench}"))?;
        rows.push((what.to_string(), (String::new(), String::new())));
    }
    Ok(rows)
}

/// RSS of `droptrace run` holding a 10k-pod / 2k-policy snapshot.
pub fn snapshot_rss(
    _droptrace: &Path,
    _scratch: &Path,
) -> anyhow::Result<Option<(String, String)>> {
    Ok(None)
}
