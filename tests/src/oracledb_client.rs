//! Runs the real python-oracledb thin client (no Oracle client libraries needed) against a DSN
//! and reports how the connection attempt ended.
//!
//! The interpreter is `$DROPTRACE_PYTHON` if set, else `<workspace>/.venv/bin/python` (the
//! project's setup creates that venv with `oracledb` installed). A missing interpreter or
//! module is an error that says so: tests must fail on it, never skip.
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// Prints one JSON line: {"ok": bool, "error": str, "elapsed": seconds}.
const SCRIPT: &str = r#"
import json, sys, time
import oracledb
dsn, timeout, program, machine, osuser = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
t = time.monotonic()
out = {"ok": False, "error": ""}
try:
    oracledb.connect(user="u", password="p", dsn=dsn, tcp_connect_timeout=timeout,
                     program=program, machine=machine, osuser=osuser).close()
    out["ok"] = True
except Exception as e:
    out["error"] = str(e)
out["elapsed"] = time.monotonic() - t
print(json.dumps(out), flush=True)
"#;

/// The identity the client claims in the CONNECT's CID, so tests can assert on it.
pub const PROGRAM: &str = "sqlplus";
pub const MACHINE: &str = "app-7d9f8-x2x7q";
pub const OSUSER: &str = "oracle";

pub fn python() -> PathBuf {
    std::env::var_os("DROPTRACE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"))
}

/// Fails with instructions when the interpreter or python-oracledb is missing.
pub fn check() -> anyhow::Result<String> {
    let py = python();
    let out = Command::new(&py)
        .args(["-c", "import oracledb; print(oracledb.__version__)"])
        .output()
        .with_context(|| {
            format!(
                "cannot run {} (set DROPTRACE_PYTHON, or create the venv: python3 -m venv .venv && \
                 .venv/bin/pip install oracledb==26.1.0)",
                py.display()
            )
        })?;
    if !out.status.success() {
        bail!(
            "python-oracledb is not importable by {}: {} (install it: {} -m pip install oracledb==26.1.0)",
            py.display(),
            String::from_utf8_lossy(&out.stderr).trim(),
            py.display()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub ok: bool,
    /// The exception text, e.g. "DPY-6005: cannot connect to database ...\nDPY-6001: ...".
    pub error: String,
    /// Seconds the connect call took, as measured inside python.
    pub elapsed: f64,
}

/// The command that connects to `dsn` (e.g. `127.0.0.1:1521/ORCLPDB1`), for callers that wrap
/// it (say in `ip netns exec`) or run it in the background; parse its stdout with [`parse`].
pub fn command(dsn: &str, tcp_connect_timeout: Duration) -> Command {
    let mut c = Command::new(python());
    c.args(["-c", SCRIPT, dsn])
        .arg(tcp_connect_timeout.as_secs_f64().to_string())
        .args([PROGRAM, MACHINE, OSUSER])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

pub fn parse(stdout: &[u8]) -> anyhow::Result<Outcome> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON line in client output: {text:?}"))?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    Ok(Outcome {
        ok: v["ok"].as_bool().unwrap_or(false),
        error: v["error"].as_str().unwrap_or_default().to_string(),
        elapsed: v["elapsed"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Connects and waits for the outcome.
pub fn connect(dsn: &str, tcp_connect_timeout: Duration) -> anyhow::Result<Outcome> {
    check()?;
    let out = command(dsn, tcp_connect_timeout).output()?;
    parse(&out.stdout)
        .with_context(|| format!("client stderr: {}", String::from_utf8_lossy(&out.stderr)))
}
