//! `cargo xtask soak --minutes N`: the release droptrace under hours-long mixed load, sampled
//! every 10 s (RSS, open fds, CPU). The series, the slope of RSS over the run and the peak go
//! to the `## Soak` section of BENCHMARKS.md. Recorded, not gated (goal: flat, peak <= 128 MiB).
//!
//! Load, all between two network namespaces of its own (bench.rs's), all bounded by the run:
//! - churn: a client connects, writes and closes ~50 times a second to a listener on 1522 (a
//!   watched port: every connection goes through the TCP lifecycle programs and the flow table);
//! - stalls: every 5 s a client connects to 1521, which an iptables DROP eats (a `stall`);
//! - drops: hping3 SYNs to 1521 at 200/s, a new flow each;
//! - floods: every 5 minutes (and once in runs shorter than that) 20 s of
//!   `hping3 --flood --rand-source`: every packet a new flow from a new address.
use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    bench::{APP, DB, DB_IP, Topo, Traced, proc_cpu_secs},
    step, workspace_root,
};

const SAMPLE_EVERY: Duration = Duration::from_secs(10);
const FLOOD_EVERY: Duration = Duration::from_secs(300);
const FLOOD_FOR: Duration = Duration::from_secs(20);
const METRICS: &str = "127.0.0.1:9749";
const GOAL_PEAK_MIB: f64 = 128.0;

/// A load generator in a process group of its own, killed with the whole group on drop:
/// killing `timeout` alone leaves its hping3 running with nothing to stop it.
struct Load(Child);

impl Drop for Load {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group this child leads (process_group(0) at spawn).
        unsafe { libc::kill(-(self.0.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<Load> {
    use std::os::unix::process::CommandExt as _;
    let child = Command::new("ip")
        .process_group(0)
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {args:?} in {ns}"))?;
    Ok(Load(child))
}

/// Accepts on 1522, reads what comes, closes.
const CHURN_SERVER: &str = r#"
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 1522))
s.listen(128)
while True:
    c, _ = s.accept()
    try:
        c.settimeout(1)
        c.recv(4096)
    except OSError:
        pass
    c.close()
"#;

/// Until `secs` have passed: connect, write, close, 50 times a second.
const CHURN_CLIENT: &str = r#"
import socket, sys, time
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        c = socket.create_connection((sys.argv[1], 1522), timeout=2)
        c.sendall(b"x" * 256)
        c.close()
    except OSError:
        pass
    time.sleep(0.02)
"#;

/// Until `secs` have passed: every 5 s a connect that the firewall drops (3 s timeout).
const STALL_CLIENT: &str = r#"
import socket, sys, time
end = time.time() + float(sys.argv[2])
while time.time() < end:
    try:
        socket.create_connection((sys.argv[1], 1521), timeout=3).close()
    except OSError:
        pass
    time.sleep(2)
"#;

struct Sample {
    secs: u64,
    rss_kib: u64,
    fds: usize,
    cpu_pct: f64,
    flooding: bool,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

/// GET /metrics from droptrace; the `droptrace_events_total` lines.
fn event_totals() -> String {
    let Ok(mut s) = std::net::TcpStream::connect(METRICS) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {METRICS}\r\nConnection: close\r\n\r\n"
    );
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with("droptrace_events_total{"))
        .map(|l| {
            l.trim_start_matches("droptrace_events_total{kind=\"")
                .replace("\"} ", "=")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn run(minutes: u64, droptrace: &Path) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!("the soak needs root (namespaces, firewall rules, eBPF): sudo -E cargo xtask soak");
    }
    if minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    let total = Duration::from_secs(minutes * 60);
    let scratch = workspace_root().join("target/soak");
    std::fs::create_dir_all(&scratch)?;
    // The soak's drops are every droptrace's drops on this node: keep the e2e suites out.
    let _node = crate::e2e_lock()?;
    let topo = Topo::new()?;
    topo.drop_rule(true)?;

    let events = scratch.join("events.ndjson");
    let events_arg = format!("file:{}", events.display());
    let (tracer, _) = Traced::droptrace(
        droptrace,
        &[
            "-o",
            &events_arg,
            "--rotate-size",
            "16M",
            "--rotate-keep",
            "1",
            "--metrics",
            METRICS,
        ],
        scratch.join("stdout"),
    )?;
    let pid = tracer.pid();
    step(&format!(
        "soak: {minutes} min against {} (pid {pid}); sampling every {}s",
        droptrace.display(),
        SAMPLE_EVERY.as_secs()
    ));

    let secs = total.as_secs().to_string();
    let _server = in_ns(DB, &["python3", "-c", CHURN_SERVER, DB_IP])?;
    thread::sleep(Duration::from_millis(500));
    let _churn = in_ns(APP, &["python3", "-c", CHURN_CLIENT, DB_IP, &secs])?;
    let _stalls = in_ns(APP, &["python3", "-c", STALL_CLIENT, DB_IP, &secs])?;
    let _drops = in_ns(
        APP,
        &[
            "timeout", &secs, "hping3", "-q", "-S", "-p", "1521", "-i", "u5000", DB_IP,
        ],
    )?;

    // First flood after a minute of baseline (or halfway through shorter runs).
    let first_flood = Duration::from_secs(60).min(total / 2);
    let mut flood: Option<(Load, Instant)> = None;
    let mut floods = 0;
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut last_cpu = proc_cpu_secs(pid);
    let mut next = started + SAMPLE_EVERY;
    println!("   t(s)  RSS(MiB)  fds  CPU(%)  phase");
    while started.elapsed() < total {
        let now = Instant::now();
        let since = now - started;
        if flood.is_none() && since >= first_flood + FLOOD_EVERY * floods {
            let left = total.saturating_sub(since).min(FLOOD_FOR).as_secs().max(1);
            flood = Some((
                in_ns(
                    APP,
                    &[
                        "timeout",
                        &left.to_string(),
                        "hping3",
                        "-q",
                        "--flood",
                        "--rand-source",
                        "-S",
                        "-p",
                        "1521",
                        DB_IP,
                    ],
                )?,
                now + Duration::from_secs(left),
            ));
            floods += 1;
        }
        let flooding = flood.as_ref().is_some_and(|(_, until)| now < *until);
        if !flooding {
            flood = None;
        }
        if now >= next {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                bail!("droptrace (pid {pid}) exited during the soak");
            }
            let cpu = proc_cpu_secs(pid);
            let s = Sample {
                secs: since.as_secs(),
                rss_kib: rss_kib(pid),
                fds: open_fds(pid),
                cpu_pct: (cpu - last_cpu) / SAMPLE_EVERY.as_secs_f64() * 100.0,
                flooding,
            };
            last_cpu = cpu;
            println!(
                "{:>7}  {:>8.1}  {:>3}  {:>6.1}  {}",
                s.secs,
                s.rss_kib as f64 / 1024.0,
                s.fds,
                s.cpu_pct,
                if s.flooding { "flood" } else { "" }
            );
            samples.push(s);
            next += SAMPLE_EVERY;
        }
        thread::sleep(Duration::from_millis(200));
    }
    drop(flood);
    let totals = event_totals();
    let _ = tracer.stop()?;
    drop(topo);
    if samples.len() < 2 {
        bail!("too few samples");
    }
    let report = report(minutes, &samples, &totals, floods);
    print!("{report}");
    write_section(&report)?;
    step("BENCHMARKS.md: ## Soak updated");
    Ok(())
}

fn report(minutes: u64, samples: &[Sample], totals: &str, floods: u32) -> String {
    let mib = |k: u64| k as f64 / 1024.0;
    let points: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.secs as f64 / 3600.0, mib(s.rss_kib)))
        .collect();
    // Past the first tenth of the run (start-up, first flood's tables filling).
    let settled = &points[points.len() / 10..];
    let peak = samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    let cpu: Vec<f64> = samples.iter().map(|s| s.cpu_pct).collect();
    let (fd_min, fd_max) = samples.iter().fold((usize::MAX, 0), |(lo, hi), s| {
        (lo.min(s.fds), hi.max(s.fds))
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut md = String::new();
    let _ = writeln!(md, "## Soak\n");
    let _ = writeln!(
        md,
        "Produced by `sudo -E cargo xtask soak --minutes {minutes}` on {} (kernel {}), release \
         build. Load: connection churn on 1522 (~50 connects/s), a dropped connect to 1521 \
         every 5 s (a stall each), hping3 SYNs to 1521 at 200/s, and {floods} random-source \
         `hping3 --flood` phase(s) of {}s (every 5 min). Sampled every {}s from /proc. Goal: \
         flat RSS, peak <= {GOAL_PEAK_MIB:.0} MiB.\n",
        crate::today(),
        kernel.trim(),
        FLOOD_FOR.as_secs(),
        SAMPLE_EVERY.as_secs()
    );
    let _ = writeln!(md, "| measurement | value |\n| --- | --- |");
    let _ = writeln!(
        md,
        "| RSS slope over the run | {:+.2} MiB/hour |",
        slope(&points)
    );
    let _ = writeln!(
        md,
        "| RSS slope after the first tenth | {:+.2} MiB/hour |",
        slope(settled)
    );
    // Step-ups while the first floods fill the tables weigh on a whole-run fit; the second
    // half says whether it keeps growing.
    let _ = writeln!(
        md,
        "| RSS slope over the second half | {:+.2} MiB/hour |",
        slope(&points[points.len() / 2..])
    );
    let _ = writeln!(
        md,
        "| RSS first / last / peak | {:.1} / {:.1} / {:.1} MiB ({}) |",
        mib(samples[0].rss_kib),
        mib(samples[samples.len() - 1].rss_kib),
        mib(peak),
        if mib(peak) <= GOAL_PEAK_MIB {
            "within the goal"
        } else {
            "ABOVE the goal"
        }
    );
    let _ = writeln!(
        md,
        "| open fds min / max / last | {fd_min} / {fd_max} / {} |",
        samples[samples.len() - 1].fds
    );
    let _ = writeln!(
        md,
        "| CPU mean / max (one core = 100%) | {:.1}% / {:.1}% |",
        cpu.iter().sum::<f64>() / cpu.len() as f64,
        cpu.iter().cloned().fold(0.0, f64::max)
    );
    let _ = writeln!(md, "| events by kind | {totals} |");
    let _ = writeln!(
        md,
        "\n<details><summary>Series ({} samples)</summary>\n",
        samples.len()
    );
    let _ = writeln!(md, "| t (s) | RSS (MiB) | fds | CPU (%) | phase |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- |");
    for s in samples {
        let _ = writeln!(
            md,
            "| {} | {:.1} | {} | {:.1} | {} |",
            s.secs,
            mib(s.rss_kib),
            s.fds,
            s.cpu_pct,
            if s.flooding { "flood" } else { "" }
        );
    }
    let _ = writeln!(md, "\n</details>");
    md
}

/// Replaces (or appends) the `## Soak` section of BENCHMARKS.md.
fn write_section(section: &str) -> anyhow::Result<()> {
    let path = workspace_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let (head, _) = crate::bench::split_soak(&old);
    let mut md = head.trim_end().to_string();
    md.push_str("\n\n");
    md.push_str(section);
    std::fs::write(&path, md)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_flat() {
        let line: Vec<_> = (0..10).map(|i| (i as f64, 3.0 + 2.0 * i as f64)).collect();
        assert!((slope(&line) - 2.0).abs() < 1e-9);
        let flat: Vec<_> = (0..10).map(|i| (i as f64, 5.0)).collect();
        assert_eq!(slope(&flat), 0.0);
        assert_eq!(slope(&[(1.0, 1.0)]), 0.0);
    }
}
