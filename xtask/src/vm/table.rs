//! The README's kernel compatibility table: one column per matrix kernel, one row per hook and
//! per e2e test. Each column is that kernel's last leg that ran every test, kept under the VM
//! cache (`matrix/<kernel>.json`) with the date and the commit it ran, so a kernel re-run alone
//! refreshes its own column and the header says which tree each column proves.
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{KernelRun, MATRIX};
use crate::workspace_root;

pub(super) const BEGIN: &str =
    "<!-- kernel-matrix:begin (cargo xtask test-kernels writes this) -->";
pub(super) const END: &str = "<!-- kernel-matrix:end -->";

fn check<'a>(run: &'a KernelRun, name: &str) -> Option<&'a Value> {
    run.check["report"]["checks"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
}

fn attached(run: &KernelRun, program: &str) -> bool {
    run.hooks["programs"]
        .as_array()
        .is_some_and(|a| a.iter().any(|p| p == program))
}

/// "ok", "ok: note" or "no: why", from a program's attachment and a check's detail.
fn cell(ok: bool, note: Option<&str>) -> String {
    match (ok, note.filter(|n| !n.is_empty())) {
        (true, None) => "ok".into(),
        (true, Some(n)) => format!("ok: {n}"),
        (false, None) => "**no**".into(),
        (false, Some(n)) => format!("**no**: {n}"),
    }
}

fn detail<'a>(run: &'a KernelRun, name: &str) -> Option<&'a str> {
    check(run, name)?["detail"].as_str()
}

fn check_ok(run: &KernelRun, name: &str) -> bool {
    check(run, name).is_some_and(|c| c["ok"] == true)
}

/// (row name, cell) for each hook of one kernel.
pub(super) fn hook_cells(run: &KernelRun) -> Vec<(&'static str, String)> {
    let reasons = if check_ok(run, "drop reasons") {
        detail(run, "drop reasons").map(str::to_string)
    } else {
        detail(run, "drop reasons").map(|d| format!("no reason field ({d})"))
    };
    let removal = if attached(run, "nf_ct_delete") {
        cell(true, Some("fentry nf_ct_delete"))
    } else if attached(run, "nf_ct_delete_kprobe") {
        cell(true, Some("kprobe nf_ct_delete"))
    } else {
        cell(false, detail(run, "conntrack removals"))
    };
    vec![
        (
            "skb:kfree_skb (every drop)",
            cell(
                super::DROP_PROGRAMS.iter().any(|p| attached(run, p)),
                reasons.as_deref(),
            ),
        ),
        (
            "sock:inet_sock_set_state (connect attempts)",
            cell(
                attached(run, "inet_sock_set_state"),
                detail(run, "tracepoint sock:inet_sock_set_state")
                    .filter(|_| !check_ok(run, "tracepoint sock:inet_sock_set_state")),
            ),
        ),
        (
            "tcp:tcp_retransmit_skb (SYN retransmits)",
            cell(
                attached(run, "tcp_retransmit_skb"),
                detail(run, "tracepoint tcp:tcp_retransmit_skb"),
            ),
        ),
        (
            "conntrack entry of a drop (skb->_nfct)",
            cell(
                check_ok(run, "conntrack layout"),
                detail(run, "conntrack layout"),
            ),
        ),
        ("conntrack removals", removal),
        (
            "cgroup_skb Oracle TNS",
            cell(
                attached(run, "tns_ingress") && attached(run, "tns_egress"),
                None,
            ),
        ),
    ]
}

fn test_cell(t: Option<&Value>) -> String {
    match t {
        None => "not run".into(),
        Some(t) if t["status"] == "pass" => {
            format!("pass ({:.0} s)", t["secs"].as_f64().unwrap_or(0.0))
        }
        Some(t) => format!("**{}**", t["status"].as_str().unwrap_or("?")),
    }
}

fn escape(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// Where and when a column's leg ran.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub(super) struct Source {
    pub date: String,
    /// `git describe --always --dirty` of the tree the leg ran.
    pub commit: String,
}

impl Source {
    pub(super) fn of_this_tree() -> Self {
        let commit = std::process::Command::new("git")
            .args(["describe", "--always", "--dirty", "--abbrev=12"])
            .current_dir(workspace_root())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Self {
            date: crate::today(),
            commit,
        }
    }
}

/// One stored column: a kernel's last leg that ran every test.
#[derive(Serialize, Deserialize)]
pub(super) struct Column {
    pub source: Source,
    pub run: KernelRun,
}

fn column_path(cache: &Path, spec: &str) -> PathBuf {
    cache.join("matrix").join(format!("{spec}.json"))
}

pub(super) fn save_column(cache: &Path, run: &KernelRun, source: &Source) -> anyhow::Result<()> {
    let path = column_path(cache, &run.spec);
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    let col = Column {
        source: source.clone(),
        run: run.clone(),
    };
    std::fs::write(&path, serde_json::to_vec_pretty(&col)?)
        .with_context(|| format!("write {}", path.display()))
}

fn load_columns(cache: &Path) -> anyhow::Result<(Vec<Column>, Vec<String>)> {
    let mut cols = Vec::new();
    let mut missing = Vec::new();
    for spec in MATRIX {
        let path = column_path(cache, spec);
        match std::fs::read(&path) {
            Ok(b) => cols
                .push(serde_json::from_slice(&b).with_context(|| format!("{}", path.display()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => missing.push(spec.to_string()),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        }
    }
    Ok((cols, missing))
}

pub(super) fn render(cols: &[Column]) -> String {
    let runs: Vec<&KernelRun> = cols.iter().map(|c| &c.run).collect();
    let mut s = String::new();
    let _ = writeln!(
        s,
        "Generated by `cargo xtask test-kernels` from each kernel's last leg that ran every test \
         (Debian kernel packages, qemu TCG, no NIC; a leg's time includes the boot)."
    );
    let _ = writeln!(s);
    let _ = write!(s, "| | ");
    let heads: Vec<String> = runs
        .iter()
        .map(|r| format!("{} ({})", r.release, r.version))
        .collect();
    let _ = writeln!(s, "{} |", heads.join(" | "));
    let _ = writeln!(s, "|---|{}", "---|".repeat(runs.len()));
    let sources: Vec<String> = cols
        .iter()
        .map(|c| format!("{}, `{}`", c.source.date, c.source.commit))
        .collect();
    let _ = writeln!(s, "| run on | {} |", sources.join(" | "));
    let verdicts: Vec<String> = runs
        .iter()
        .map(|r| {
            if r.failures.is_empty() {
                format!("**pass** ({:.0} s)", r.secs)
            } else {
                format!("**FAIL** ({} failures)", r.failures.len())
            }
        })
        .collect();
    let _ = writeln!(s, "| leg | {} |", verdicts.join(" | "));
    let checks: Vec<String> = runs
        .iter()
        .map(|r| cell(r.check["report"]["ok"] == true, None))
        .collect();
    let _ = writeln!(s, "| `droptrace check` | {} |", checks.join(" | "));
    let cells: Vec<Vec<(&str, String)>> = runs.iter().map(|r| hook_cells(r)).collect();
    if let Some(first) = cells.first() {
        for (i, (row, _)) in first.iter().enumerate() {
            let row_cells: Vec<String> = cells.iter().map(|c| escape(&c[i].1)).collect();
            let _ = writeln!(s, "| hook: {row} | {} |", row_cells.join(" | "));
        }
    }
    let mut names: Vec<(String, String)> = Vec::new();
    for r in &runs {
        for t in &r.tests {
            let key = (
                t["target"].as_str().unwrap_or("").to_string(),
                t["name"].as_str().unwrap_or("").to_string(),
            );
            if !names.contains(&key) {
                names.push(key);
            }
        }
    }
    names.sort();
    for (target, name) in &names {
        let row: Vec<String> = runs
            .iter()
            .map(|r| {
                test_cell(
                    r.tests
                        .iter()
                        .find(|t| t["target"] == target.as_str() && t["name"] == name.as_str()),
                )
            })
            .collect();
        let _ = writeln!(s, "| test: `{target}::{name}` | {} |", row.join(" | "));
    }
    s
}

pub(super) enum Update {
    Rewritten,
    /// Matrix kernels without a stored full leg: the table is left as it was.
    Missing(Vec<String>),
}

/// Replaces the text between the README's markers with the table of the stored columns, once
/// every matrix kernel has one.
pub(super) fn update_readme(cache: &Path) -> anyhow::Result<Update> {
    let (cols, missing) = load_columns(cache)?;
    if !missing.is_empty() {
        return Ok(Update::Missing(missing));
    }
    let path = workspace_root().join("README.md");
    let text = std::fs::read_to_string(&path).context("read README.md")?;
    let (Some(b), Some(e)) = (text.find(BEGIN), text.find(END)) else {
        bail!("README.md has no kernel matrix markers ({BEGIN} ... {END})");
    };
    let body = render(&cols);
    let new = format!("{}{BEGIN}\n{body}{}", &text[..b], &text[e..]);
    std::fs::write(&path, new).context("write README.md")?;
    Ok(Update::Rewritten)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run(release: &str, programs: &[&str], reasons_ok: bool) -> KernelRun {
        KernelRun {
            spec: "x".into(),
            release: release.into(),
            version: "1".into(),
            attempts: 1,
            secs: 100.0,
            error: None,
            check: json!({"report": {"ok": true, "checks": [
                {"name": "drop reasons", "ok": reasons_ok, "detail": "d"},
                {"name": "conntrack layout", "ok": true, "detail": "nf_conn from BTF vmlinux"},
            ]}}),
            hooks: json!({"programs": programs}),
            tests: vec![json!({"target": "stalls", "name": "a", "status": "pass", "secs": 40.2})],
            failures: Vec::new(),
        }
    }

    #[test]
    fn one_column_per_kernel_one_row_per_hook_and_test() {
        let a = run(
            "5.10.0-46-amd64",
            &["kfree_skb", "nf_ct_delete_kprobe"],
            false,
        );
        let mut b = run("6.1.0-57-amd64", &["kfree_skb"], true);
        b.tests[0]["status"] = json!("fail");
        b.failures.push("stalls::a: fail".into());
        let src = |commit: &str| Source {
            date: "2026-12-02".into(),
            commit: commit.into(),
        };
        let t = render(&[
            Column {
                source: src("7100709"),
                run: a,
            },
            Column {
                source: src("abc1234-dirty"),
                run: b,
            },
        ]);
        assert!(
            t.contains("| run on | 2026-12-02, `7100709` | 2026-12-02, `abc1234-dirty` |"),
            "{t}"
        );
        assert!(
            t.contains("| | 5.10.0-46-amd64 (1) | 6.1.0-57-amd64 (1) |"),
            "{t}"
        );
        assert!(
            t.contains("| hook: skb:kfree_skb (every drop) | ok: no reason field (d) | ok: d |"),
            "{t}"
        );
        assert!(
            t.contains("| hook: conntrack removals | ok: kprobe nf_ct_delete | **no** |"),
            "{t}"
        );
        assert!(
            t.contains("| test: `stalls::a` | pass (40 s) | **fail** |"),
            "{t}"
        );
        assert!(
            t.contains("| leg | **pass** (100 s) | **FAIL** (1 failures) |"),
            "{t}"
        );
    }

    #[test]
    fn a_kernel_without_a_full_leg_keeps_the_table_as_it_was() {
        let cache = std::env::temp_dir().join(format!("xtask-matrix-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&cache);
        let source = Source {
            date: "2026-12-02".into(),
            commit: "7100709".into(),
        };
        for spec in ["5.10", "6.1", "6.12"] {
            let mut r = run(spec, &["kfree_skb"], true);
            r.spec = spec.into();
            save_column(&cache, &r, &source).unwrap();
        }
        let (cols, missing) = load_columns(&cache).unwrap();
        assert_eq!(missing, ["newest"]);
        assert_eq!(cols.len(), 3);
        assert_eq!(cols[2].source, source);
        assert!(matches!(
            update_readme(&cache).unwrap(),
            Update::Missing(m) if m == ["newest"]
        ));
        let _ = std::fs::remove_dir_all(&cache);
    }
}
