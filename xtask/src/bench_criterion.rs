//! The userspace parts of `cargo xtask bench`: criterion micro-benchmarks (read back from
//! criterion's own result files) and memory with a large cluster snapshot.
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::Context as _;

use crate::{status, step, workspace_root};

/// (bench target, what it measures) of tracer-user.
const BENCHES: &[(&str, &str)] = &[
    ("pipeline", "userspace pipeline"),
    ("policy", "NetworkPolicy evaluation (10k pods, 2k policies)"),
    ("tns", "Oracle TNS parser"),
];

/// Runs the criterion benches: (measurement, (value, detail)).
pub(crate) fn run() -> anyhow::Result<Vec<(String, (String, String))>> {
    let root = workspace_root();
    let results = root.join("target/criterion");
    let _ = std::fs::remove_dir_all(&results);
    for (bench, _) in BENCHES {
        step(&format!("cargo bench -p tracer-user --bench {bench}"));
        status(
            Command::new("cargo")
                .current_dir(&root)
                // The real object, as the release binary under test has: a stub here would
                // rebuild target/release/droptrace without its eBPF programs.
                .env("DROPTRACE_EBPF", "build")
                .args(["bench", "-p", "tracer-user", "--bench", bench])
                .stdout(Stdio::null()),
        )
        .with_context(|| format!("cargo bench {bench}"))?;
    }
    let mut rows = Vec::new();
    for entry in walk(&results) {
        if !entry.ends_with("new/benchmark.json") {
            continue;
        }
        let dir = Path::new(&entry).parent().context("dir")?;
        let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&entry)?)?;
        let est: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("estimates.json"))?)?;
        let ns = est["mean"]["point_estimate"].as_f64().unwrap_or(0.0);
        if ns <= 0.0 {
            continue;
        }
        let id = meta["full_id"].as_str().unwrap_or("?").to_string();
        let per_sec = 1e9 / ns;
        let (value, detail) = match &meta["throughput"] {
            t if t["Elements"].is_u64() => {
                let n = t["Elements"].as_u64().unwrap_or(1) as f64;
                (
                    format!("{:.0} /s", n * per_sec),
                    format!("{:.3} us each (mean of {n} per iteration)", ns / n / 1000.0),
                )
            }
            t if t["Bytes"].is_u64() => {
                let n = t["Bytes"].as_u64().unwrap_or(1) as f64;
                (
                    format!("{:.1} MiB/s", n * per_sec / 1_048_576.0),
                    format!("{:.2} us per {n} bytes", ns / 1000.0),
                )
            }
            _ => (
                format!("{:.2} us", ns / 1000.0),
                "per iteration".to_string(),
            ),
        };
        rows.push((format!("criterion: {id}"), (value, detail)));
    }
    rows.sort();
    Ok(rows)
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p.to_string_lossy().into_owned());
            }
        }
    }
    out
}

/// RSS of `droptrace run` holding the benches' 10k-pod / 2k-policy snapshot.
/// Writes the synthetic 10k-pod / 2k-policy snapshot (a cargo build: before the e2e lock).
pub(crate) fn synthetic_snapshot(scratch: &Path) -> anyhow::Result<std::path::PathBuf> {
    let root = workspace_root();
    let file = scratch.join("synthetic-10k-pods.json");
    step("writing the synthetic 10k-pod / 2k-policy snapshot");
    status(
        Command::new("cargo")
            .current_dir(&root)
            .env("DROPTRACE_EBPF", "build")
            .args([
                "run",
                "--quiet",
                "--release",
                "-p",
                "tracer-user",
                "--example",
                "synthetic_snapshot",
                "--",
            ])
            .arg(&file),
    )?;
    Ok(file)
}

pub(crate) fn snapshot_rss(
    droptrace: &Path,
    file: &Path,
) -> anyhow::Result<Option<(String, String)>> {
    step("memory: droptrace run --k8s-snapshot (10k pods, 2k policies)");
    let rss = |snapshot: Option<&Path>| -> anyhow::Result<u64> {
        let mut c = Command::new(droptrace);
        c.args(["run", "-o", "file:/dev/null"]);
        if let Some(s) = snapshot {
            c.arg("--k8s-snapshot").arg(s);
        }
        let mut child = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        // Attached and settled.
        thread::sleep(Duration::from_secs(5));
        if let Ok(Some(st)) = child.try_wait() {
            anyhow::bail!("droptrace exited during the memory measurement ({st})");
        }
        let kib = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let _ = Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status();
        let _ = child.wait();
        Ok(kib)
    };
    let with = rss(Some(file))?;
    let without = rss(None)?;
    Ok(Some((
        format!("{:.1} MiB", with as f64 / 1024.0),
        format!(
            "VmRSS after start-up (target <= 64 MiB); {:.1} MiB without a snapshot",
            without as f64 / 1024.0
        ),
    )))
}
