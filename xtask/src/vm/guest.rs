//! `xtask vm-guest`: PID 1 of a VM leg, on the host's own root (read-only 9p under a tmpfs
//! overlay). Mounts what a node has, runs `droptrace check`, attaches every hook once with
//! `droptrace run`, runs the planned e2e tests one by one, writes one JSON line per step to
//! `results.jsonl` in the output share, and powers the VM off whatever happened.
use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};

use super::Plan;

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long `droptrace run` may take to attach under software emulation.
const ATTACH_TIMEOUT: Duration = Duration::from_secs(240);
/// How long `droptrace run` may take to stop after SIGINT under software emulation.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn main(out: &Path) -> ! {
    let results = out.join("results.jsonl");
    let mut log = Results::open(&results);
    if let Err(e) = run(out, &mut log) {
        log.line(json!({"step": "error", "error": format!("{e:#}")}));
        println!("droptrace-vm: {e:#}");
    }
    log.line(json!({"step": "done"}));
    let _ = Command::new("sync").status();
    power_off()
}

fn power_off() -> ! {
    println!("droptrace-vm: powering off");
    let _ = fs::write("/proc/sysrq-trigger", "o");
    loop {
        thread::sleep(Duration::from_secs(60));
    }
}

struct Results(Option<fs::File>);

impl Results {
    fn open(path: &Path) -> Self {
        Self(
            fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok(),
        )
    }

    fn line(&mut self, v: Value) {
        if let Some(f) = self.0.as_mut() {
            let _ = writeln!(f, "{v}");
            let _ = f.sync_all();
        }
    }
}

fn sh(args: &[&str]) -> anyhow::Result<()> {
    let st = Command::new(args[0])
        .args(&args[1..])
        .env("PATH", PATH)
        .status()
        .with_context(|| format!("cannot start {}", args[0]))?;
    if !st.success() {
        bail!("{} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// What a node has mounted before droptrace runs (the rest of /sys and /dev came along from
/// the initramfs).
fn mount_node() -> anyhow::Result<()> {
    for (fstype, target, opts) in [
        ("tmpfs", "/run", "mode=0755"),
        // No tmpfs on /tmp: the root is already writable (tmpfs overlay), and a checkout under
        // the host's /tmp (a clone in /tmp/x) must stay visible to the guest.
        ("devpts", "/dev/pts", "gid=5,mode=620"),
        ("tmpfs", "/dev/shm", "mode=1777"),
        ("tracefs", "/sys/kernel/tracing", ""),
        ("debugfs", "/sys/kernel/debug", ""),
        ("bpf", "/sys/fs/bpf", "mode=0700"),
        ("cgroup2", "/sys/fs/cgroup", ""),
    ] {
        let _ = fs::create_dir_all(target);
        let mut args = vec!["mount", "-t", fstype];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([fstype, target]);
        sh(&args)?;
    }
    fs::create_dir_all("/run/lock")?;
    sh(&["ip", "link", "set", "lo", "up"])?;
    sh(&["hostname", "droptrace-vm"])?;
    // A Kubernetes node has conntrack loaded (kube-proxy, the CNI): so does this one. And
    // /dev/net/tun, which systemd creates as a static node at boot (the TUN black-hole test).
    sh(&["modprobe", "nf_conntrack"])?;
    sh(&["modprobe", "tun"])
}

fn run(out: &Path, log: &mut Results) -> anyhow::Result<()> {
    mount_node()?;
    let plan: Plan = serde_json::from_str(&fs::read_to_string(out.join("plan.json"))?)?;
    let release = fs::read_to_string("/proc/sys/kernel/osrelease")?
        .trim()
        .to_string();
    log.line(json!({"step": "boot", "kernel": release}));
    println!("droptrace-vm: kernel {release}");

    let check = Command::new(&plan.droptrace)
        .args(["check", "--json"])
        .env("PATH", PATH)
        .env("NO_COLOR", "1")
        .output()
        .context("droptrace check")?;
    let report: Value = serde_json::from_slice(&check.stdout).unwrap_or_else(
        |_| json!({"ok": false, "error": String::from_utf8_lossy(&check.stderr).trim()}),
    );
    println!(
        "droptrace-vm: droptrace check {}",
        if report["ok"] == true { "ok" } else { "FAILED" }
    );
    log.line(json!({"step": "check", "exit": check.status.code(), "report": report}));

    if let Err(e) = collect_kernel_facts(&out.join("kernel")) {
        log.line(json!({"step": "facts", "error": format!("{e:#}")}));
    }
    log.line(hooks(&plan));

    fs::create_dir_all(out.join("logs"))?;
    for t in &plan.tests {
        let r = run_test(&plan, t, out);
        println!(
            "droptrace-vm: {}::{} {}",
            t.target,
            t.name,
            r["status"].as_str().unwrap_or("?")
        );
        log.line(r);
    }
    Ok(())
}

/// What droptrace resolves its layouts from on this kernel: BTF of vmlinux and of the
/// conntrack module, and the record formats of its tracepoints (for fixtures, see
/// `--save-fixtures`).
fn collect_kernel_facts(dir: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    fs::copy("/sys/kernel/btf/vmlinux", dir.join("vmlinux.btf"))?;
    let module = Path::new("/sys/kernel/btf/nf_conntrack");
    if module.exists() {
        fs::copy(module, dir.join("nf_conntrack.btf"))?;
    }
    for (category, name) in super::FORMATS {
        let src = Path::new("/sys/kernel/tracing/events")
            .join(category)
            .join(name)
            .join("format");
        fs::copy(&src, dir.join(format!("{name}.format")))
            .with_context(|| src.display().to_string())?;
    }
    Ok(())
}

/// Strips terminal colour sequences from a log line.
fn plain(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `programs=["a", "b"]` of droptrace's "attached; tracing" line.
pub(crate) fn attached_programs(line: &str) -> Vec<String> {
    let Some(rest) = line.split("programs=[").nth(1) else {
        return Vec::new();
    };
    rest.split(']')
        .next()
        .unwrap_or("")
        .split(',')
        .map(|p| p.trim().trim_matches('"').to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

/// Starts `droptrace run` once, as a user would, and records which programs attached and
/// which hooks it skipped (its warnings), then stops it with SIGINT.
fn hooks(plan: &Plan) -> Value {
    let t0 = Instant::now();
    let child = Command::new(&plan.droptrace)
        .arg("run")
        .env("PATH", PATH)
        .env("NO_COLOR", "1")
        .env("DROPTRACE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return json!({"step": "hooks", "ok": false, "error": e.to_string()}),
    };
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped");
    let reader = thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(plain(&line));
        }
    });
    let mut lines = Vec::new();
    let mut programs = None;
    let deadline = Instant::now() + ATTACH_TIMEOUT;
    while programs.is_none() && Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(l) => {
                if l.contains("attached; tracing") {
                    programs = Some(attached_programs(&l));
                }
                lines.push(l);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let attach_secs = t0.elapsed().as_secs_f64();
    signal(child.id(), "INT");
    let t1 = Instant::now();
    // Detaching waits for RCU grace periods: over 30 s once on an emulated 5.10 while the
    // host ran other builds.
    let code = wait_for(&mut child, STOP_TIMEOUT);
    let stop_secs = t1.elapsed().as_secs_f64();
    let _ = reader.join();
    lines.extend(rx.try_iter());
    let warnings: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    json!({
        "step": "hooks",
        "ok": programs.is_some() && code == Some(0),
        "programs": programs.unwrap_or_default(),
        "warnings": warnings,
        "exit": code,
        "attach_secs": (attach_secs * 10.0).round() / 10.0,
        "stop_secs": (stop_secs * 10.0).round() / 10.0,
        "stderr": lines,
    })
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .env("PATH", PATH)
        .status();
}

/// Exit code, or None when it had to be killed.
fn wait_for(child: &mut Child, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(100));
    }
}

fn run_test(plan: &Plan, t: &super::PlannedTest, out: &Path) -> Value {
    let log_rel = PathBuf::from("logs").join(format!("{}__{}.log", t.target, t.name));
    let log_path = out.join(&log_rel);
    let t0 = Instant::now();
    let spawned = fs::File::create(&log_path).and_then(|f| {
        let f2 = f.try_clone()?;
        Command::new(&t.binary)
            .args([&t.name, "--exact", "--nocapture", "--test-threads=1"])
            .env("PATH", PATH)
            .env("HOME", "/root")
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .env("DROPTRACE_BIN", &plan.droptrace)
            .env("DROPTRACE_PYTHON", &plan.python)
            .env("CI", &plan.ci)
            .current_dir(&plan.workspace)
            // Its own process group: a test that runs over its time is killed with everything
            // it started (droptrace, the python client, ip netns exec ...).
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return json!({"step": "test", "target": t.target, "name": t.name,
                          "status": "fail", "secs": 0, "error": e.to_string()});
        }
    };
    let code = wait_for_group(&mut child, Duration::from_secs(plan.test_timeout_secs));
    let secs = t0.elapsed().as_secs_f64();
    let text = fs::read_to_string(&log_path).unwrap_or_default();
    let status = match code {
        None => "timeout",
        Some(0) if text.contains("test result: ok. 1 passed") => "pass",
        // A filter that matched nothing passes with 0 tests: that is not a pass.
        Some(0) => "missing",
        Some(_) => "fail",
    };
    // The test prints "stall: {json}" (libtest's "test NAME ... " may precede it on the line).
    let stall = text
        .lines()
        .find_map(|l| l.split_once("stall: {"))
        .map(|(_, rest)| format!("{{{rest}"));
    let failure = (status != "pass").then(|| {
        text.lines()
            .filter(|l| l.contains("panicked at") || l.contains("assertion"))
            .take(3)
            .collect::<Vec<_>>()
            .join(" | ")
    });
    json!({
        "step": "test",
        "target": t.target,
        "name": t.name,
        "status": status,
        "secs": (secs * 10.0).round() / 10.0,
        "log": log_rel,
        "stall": stall,
        "failure": failure,
    })
}

fn wait_for_group(child: &mut Child, limit: Duration) -> Option<i32> {
    let pgid = child.id();
    let code = wait_for(child, limit);
    // Whatever the test left behind in its group goes with it.
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .env("PATH", PATH)
        .stderr(Stdio::null())
        .status();
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attached_line_names_the_programs() {
        let l = plain(
            "\u{1b}[2m2026-12-02T07:00:00Z\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m attached; tracing \
             programs=[\"kfree_skb\", \"tns_ingress\", \"nf_ct_delete_kprobe\"] ports=[1521]",
        );
        assert_eq!(
            attached_programs(&l),
            vec!["kfree_skb", "tns_ingress", "nf_ct_delete_kprobe"]
        );
        assert!(attached_programs("INFO something else").is_empty());
    }
}
