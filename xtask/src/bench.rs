//! `cargo xtask bench`: every figure a ratio measured side by side in one run on this machine,
//! written to BENCHMARKS.md with the command that produced it. Nothing here asserts a target:
//! machines are noisy; the numbers are recorded, not gated.
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{step, workspace_root};

pub(crate) const APP: &str = "dtbench-app";
pub(crate) const DB: &str = "dtbench-db";
pub(crate) const APP_IP: &str = "10.250.0.1";
pub(crate) const DB_IP: &str = "10.250.0.2";

pub(crate) struct Options {
    pub storm_secs: u64,
    pub iperf_secs: u64,
    pub rounds: usize,
    /// Another droptrace build (main's) measured side by side for the cost figures.
    pub baseline: Option<PathBuf>,
    /// Untraced/traced flood pairs per binary and flood kind, and their length.
    pub pairs: usize,
    pub pair_secs: u64,
    /// Only the cost figures: printed, and BENCHMARKS.md's Cost section rewritten.
    pub cost_only: bool,
}

/// Two namespaces joined by a veth pair, removed on drop (with their rules).
pub(crate) struct Topo;

impl Topo {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Self::cleanup();
        let t = Topo;
        for ns in [APP, DB] {
            sh(&["ip", "netns", "add", ns])?;
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        sh(&[
            "ip",
            "link",
            "add",
            "dtbench-a",
            "netns",
            APP,
            "type",
            "veth",
            "peer",
            "name",
            "dtbench-d",
            "netns",
            DB,
        ])?;
        sh(&[
            "ip",
            "-n",
            APP,
            "addr",
            "add",
            &format!("{APP_IP}/24"),
            "dev",
            "dtbench-a",
        ])?;
        sh(&[
            "ip",
            "-n",
            DB,
            "addr",
            "add",
            &format!("{DB_IP}/24"),
            "dev",
            "dtbench-d",
        ])?;
        sh(&["ip", "-n", APP, "link", "set", "dtbench-a", "up"])?;
        sh(&["ip", "-n", DB, "link", "set", "dtbench-d", "up"])?;
        Ok(t)
    }

    fn cleanup() {
        for ns in [APP, DB] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }

    pub(crate) fn drop_rule(&self, add: bool) -> anyhow::Result<()> {
        sh(&[
            "ip",
            "netns",
            "exec",
            DB,
            "iptables",
            if add { "-A" } else { "-D" },
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            "1521",
            "-j",
            "DROP",
        ])
    }

    pub(crate) fn zero_counters(&self) -> anyhow::Result<()> {
        sh(&["ip", "netns", "exec", DB, "iptables", "-Z", "INPUT"])
    }

    pub(crate) fn dropped(&self) -> anyhow::Result<u64> {
        let out = out(&[
            "ip", "netns", "exec", DB, "iptables", "-L", "INPUT", "-v", "-n", "-x",
        ])?;
        Ok(out
            .lines()
            .filter(|l| l.contains("DROP") && l.contains("dpt:1521"))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum())
    }
}

impl Drop for Topo {
    fn drop(&mut self) {
        Self::cleanup();
    }
}

pub(crate) fn sh(args: &[&str]) -> anyhow::Result<()> {
    let o = Command::new(args[0]).args(&args[1..]).output()?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(())
}

pub(crate) fn out(args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new(args[0]).args(&args[1..]).output()?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

/// Jiffies of all CPUs that are not idle/iowait (user, nice, system, irq, softirq, steal).
fn busy_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or("");
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    [0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum()
}

fn ticks_per_sec() -> f64 {
    100.0
}

/// utime + stime of a process, in seconds.
pub(crate) fn proc_cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (t(11) + t(12)) as f64 / ticks_per_sec()
}

fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// run_time_ns of every loaded BPF program, by id (needs kernel.bpf_stats_enabled=1).
fn bpf_run_time() -> BTreeMap<u64, u64> {
    crate::bench_cost::prog_stats()
        .into_iter()
        .map(|(id, p)| (id, p.run_ns))
        .collect()
}

/// BPF run time (s) of the programs loaded since `before`.
fn new_programs_secs(before: &BTreeMap<u64, u64>, now: &BTreeMap<u64, u64>) -> f64 {
    let old: HashSet<&u64> = before.keys().collect();
    now.iter()
        .filter(|(id, _)| !old.contains(id))
        .map(|(_, ns)| *ns)
        .sum::<u64>() as f64
        / 1e9
}

/// A tracer under test: droptrace or bpftrace, stdout to a file.
pub(crate) struct Traced {
    child: Child,
    out: PathBuf,
    started: Instant,
}

impl Traced {
    pub(crate) fn droptrace(
        bin: &Path,
        args: &[&str],
        out: PathBuf,
    ) -> anyhow::Result<(Self, Duration)> {
        Self::spawn(Command::new(bin), args, out)
    }

    /// `droptrace` on the given CPUs only (`taskset -c`).
    pub(crate) fn droptrace_pinned(
        bin: &Path,
        cpus: &str,
        args: &[&str],
        out: PathBuf,
    ) -> anyhow::Result<(Self, Duration)> {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", cpus]).arg(bin);
        Self::spawn(cmd, args, out)
    }

    fn spawn(mut cmd: Command, args: &[&str], out: PathBuf) -> anyhow::Result<(Self, Duration)> {
        let file = std::fs::File::create(&out)?;
        let started = Instant::now();
        let mut child = cmd
            .arg("run")
            .args(args)
            .stdout(file)
            .stderr(Stdio::piped())
            .spawn()?;
        let err = child.stderr.take().context("stderr")?;
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("attached; tracing") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30))
            .context("droptrace did not attach within 30 s")?;
        let attach = started.elapsed();
        Ok((
            Self {
                child,
                out,
                started,
            },
            attach,
        ))
    }

    fn bpftrace(script: &str, out: PathBuf) -> anyhow::Result<Self> {
        let file = std::fs::File::create(&out)?;
        let child = Command::new("bpftrace")
            .args(["-e", script])
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()?;
        // bpftrace prints "Attaching 1 probe..." once attached.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&out)
            .unwrap_or_default()
            .contains("Attaching")
        {
            if Instant::now() > deadline {
                bail!("bpftrace did not attach");
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(Self {
            child,
            out,
            started: Instant::now(),
        })
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn stop(mut self) -> anyhow::Result<String> {
        unsafe_kill(self.child.id(), 2);
        let _ = self.child.wait();
        let _ = self.started;
        Ok(std::fs::read_to_string(&self.out)?)
    }
}

fn unsafe_kill(pid: u32, sig: i32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub(crate) fn iperf_gbps(secs: u64) -> anyhow::Result<f64> {
    let mut server = Command::new("ip")
        // Pinned (server CPU 1, client CPU 0): unpinned runs on 2 CPUs swing between two
        // throughput levels with the scheduler's placement, which drowns a few percent.
        .args([
            "netns", "exec", DB, "iperf3", "-s", "-1", "-B", DB_IP, "-A", "1",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    thread::sleep(Duration::from_millis(500));
    let o = out(&[
        "ip",
        "netns",
        "exec",
        APP,
        "iperf3",
        "-c",
        DB_IP,
        "-t",
        &secs.to_string(),
        "-J",
    ]);
    let _ = server.kill();
    let _ = server.wait();
    let v: serde_json::Value = serde_json::from_str(&o?)?;
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|b| b / 1e9)
        .context("iperf3 JSON without end.sum_received.bits_per_second")
}

fn flood(secs: u64) -> anyhow::Result<()> {
    let _ = Command::new("ip")
        .args([
            "netns",
            "exec",
            APP,
            "timeout",
            "-s",
            "INT",
            &secs.to_string(),
        ])
        .args(["hping3", "-q", "--flood", "-S", "-p", "1521", DB_IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    Ok(())
}

#[derive(Default)]
struct Storm {
    drops: u64,
    secs: f64,
    busy_secs: f64,
    tracer_cpu: f64,
    bpf_secs: f64,
    peak_rss_kib: u64,
}

impl Storm {
    fn rate(&self) -> f64 {
        self.drops as f64 / self.secs
    }
    /// Kernel (non-tracer) CPU per drop, in microseconds.
    fn kernel_us_per_drop(&self) -> f64 {
        (self.busy_secs - self.tracer_cpu).max(0.0) / self.drops as f64 * 1e6
    }
    /// Tracer CPU (process + its BPF programs) per drop, in microseconds.
    fn tracer_us_per_drop(&self) -> f64 {
        (self.tracer_cpu + self.bpf_secs) / self.drops as f64 * 1e6
    }
}

fn storm(
    topo: &Topo,
    secs: u64,
    tracer: Option<&mut dyn FnMut() -> anyhow::Result<Traced>>,
) -> anyhow::Result<(Storm, Option<String>)> {
    topo.zero_counters()?;
    let bpf_before = bpf_run_time();
    let traced = match tracer {
        Some(start) => Some(start()?),
        None => None,
    };
    let busy0 = busy_ticks();
    let cpu0 = traced
        .as_ref()
        .map(|t| proc_cpu_secs(t.pid()))
        .unwrap_or(0.0);
    let t0 = Instant::now();
    flood(secs)?;
    let elapsed = t0.elapsed().as_secs_f64();
    let busy1 = busy_ticks();
    let mut s = Storm {
        drops: topo.dropped()?,
        secs: elapsed,
        busy_secs: (busy1 - busy0) as f64 / ticks_per_sec(),
        ..Storm::default()
    };
    let output = match traced {
        Some(t) => {
            // Let the last flush land before reading the tracer's own costs.
            thread::sleep(Duration::from_millis(1500));
            s.tracer_cpu = proc_cpu_secs(t.pid()) - cpu0;
            s.bpf_secs = new_programs_secs(&bpf_before, &bpf_run_time());
            s.peak_rss_kib = peak_rss_kib(t.pid());
            Some(t.stop()?)
        }
        None => None,
    };
    Ok((s, output))
}

fn sum_droptrace(out: &str) -> (u64, u64, u64) {
    let (mut sum, mut records, mut lost) = (0, 0, 0);
    for line in out.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match v["kind"].as_str() {
            Some("drop") if v["flow"]["dst_ip"] == DB_IP && v["flow"]["dst_port"] == 1521 => {
                sum += v["count"].as_u64().unwrap_or(0);
                records += 1;
            }
            Some("lost") => lost += v["count"].as_u64().unwrap_or(0),
            _ => {}
        }
    }
    (sum, records, lost)
}

const BPFTRACE: &str = r#"tracepoint:skb:kfree_skb { $skb = (struct sk_buff *)args->skbaddr; $ip = (struct iphdr *)($skb->head + $skb->network_header); if ($ip->protocol == 6) { $th = (struct tcphdr *)($skb->head + $skb->network_header + ($ip->ihl * 4)); printf("%s:%d -> %s:%d reason=%d\n", ntop($ip->saddr), bswap($th->source), ntop($ip->daddr), bswap($th->dest), args->reason); } }"#;

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub(crate) fn run(opts: &Options, droptrace: &Path) -> anyhow::Result<()> {
    if !crate::is_root() {
        bail!(
            "the benchmarks need root (namespaces, firewall rules, eBPF): sudo -E cargo xtask bench"
        );
    }
    let scratch = workspace_root().join("target/bench");
    std::fs::create_dir_all(&scratch)?;
    let _ = Command::new("sysctl")
        .args(["-q", "-w", "kernel.bpf_stats_enabled=1"])
        .status();
    if let Some(b) = &opts.baseline {
        crate::bench_cost::check_bin(b)?;
    }
    if opts.cost_only {
        return cost_only(opts, droptrace, &scratch);
    }
    // Userspace micro-benchmarks (criterion) first: they need no lock.
    step("userspace pipeline micro-benchmarks (criterion)");
    let criterion: Vec<(String, String, String)> = crate::bench_criterion::run()?
        .into_iter()
        .map(|(name, (v, d))| (name, v, d))
        .collect();
    let snapshot = crate::bench_criterion::synthetic_snapshot(&scratch)?;
    // Namespaces, firewall rules, floods and attached programs: only under the e2e lock, so
    // no test or other benchmark runs at the same time (held to the end of the run).
    step("waiting for /run/lock/droptrace-e2e.lock");
    let _lock = e2e_lock()?;
    let topo = Topo::new()?;
    let mut md = String::new();
    let mut table: Vec<(String, String, String)> = Vec::new();

    // 0. Cost figures, before (--baseline) and after, side by side.
    let (cost_rows, cost_opts) = cost(opts, droptrace, &topo, &scratch)?;

    // 1. Idle overhead.
    step(&format!(
        "idle overhead: iperf3 {}s x {} rounds, alternating",
        opts.iperf_secs, opts.rounds
    ));
    let (mut plain, mut traced) = (Vec::new(), Vec::new());
    for _ in 0..opts.rounds {
        plain.push(iperf_gbps(opts.iperf_secs)?);
        let (t, _) = Traced::droptrace(droptrace, &[], scratch.join("idle.ndjson"))?;
        traced.push(iperf_gbps(opts.iperf_secs)?);
        t.stop()?;
    }
    let (p, t) = (median(plain.clone()), median(traced.clone()));
    table.push((
        "idle overhead: iperf3 throughput traced / untraced".into(),
        format!("{:.3}", t / p),
        format!(
            "{t:.2} / {p:.2} Gbit/s (median of {}; target >= 0.99)",
            opts.rounds
        ),
    ));

    // 2. Drop storm, untraced vs droptrace.
    topo.drop_rule(true)?;
    step(&format!(
        "drop storm untraced: hping3 --flood SYN -> iptables DROP, {}s",
        opts.storm_secs
    ));
    let (base, _) = storm(&topo, opts.storm_secs, None)?;
    step("drop storm traced by droptrace");
    let out_file = scratch.join("storm.ndjson");
    let mut start_dt = || Traced::droptrace(droptrace, &[], out_file.clone()).map(|(t, _)| t);
    let (dt, out) = storm(&topo, opts.storm_secs, Some(&mut start_dt))?;
    let (sum, records, lost) = sum_droptrace(&out.unwrap_or_default());
    step("drop storm traced by a bpftrace one-liner");
    let bt_file = scratch.join("storm.bpftrace");
    let mut start_bt = || Traced::bpftrace(BPFTRACE, bt_file.clone());
    let (bt, bt_out) = storm(&topo, opts.storm_secs, Some(&mut start_bt))?;
    let bt_lines = bt_out
        .as_deref()
        .unwrap_or("")
        .lines()
        .filter(|l| l.contains(&format!("-> {DB_IP}:1521")))
        .count() as u64;
    topo.drop_rule(false)?;

    table.push((
        "drop storm: drops/s (iptables counter)".into(),
        format!("{:.0}", dt.rate()),
        format!("untraced {:.0}/s, bpftrace {:.0}/s", base.rate(), bt.rate()),
    ));
    table.push((
        "drop storm: sum of `count` / iptables counter".into(),
        format!("{sum} / {}", dt.drops),
        format!(
            "{} (must be equal); {records} drop records (hping3 moves the source port every \
             packet: up to 65535 flows)",
            if sum == dt.drops {
                "equal"
            } else {
                "DIFFERENT"
            }
        ),
    ));
    table.push((
        "drop storm: events lost by droptrace".into(),
        lost.to_string(),
        "`lost` records in the stream (target 0)".into(),
    ));
    table.push((
        "drop storm: droptrace CPU per drop (process + BPF)".into(),
        format!("{:.3} us", dt.tracer_us_per_drop()),
        format!(
            "process {:.2}s + BPF {:.2}s for {} drops",
            dt.tracer_cpu, dt.bpf_secs, dt.drops
        ),
    ));
    table.push((
        "drop storm: kernel CPU per drop, traced / untraced".into(),
        format!("{:.3}", dt.kernel_us_per_drop() / base.kernel_us_per_drop()),
        format!(
            "{:.3} us / {:.3} us (target within 10%)",
            dt.kernel_us_per_drop(),
            base.kernel_us_per_drop()
        ),
    ));
    table.push((
        "drop storm: droptrace peak RSS".into(),
        format!("{:.1} MiB", dt.peak_rss_kib as f64 / 1024.0),
        "VmHWM".into(),
    ));
    table.push((
        "bpftrace one-liner CPU per drop / droptrace".into(),
        format!("{:.2}", bt.tracer_us_per_drop() / dt.tracer_us_per_drop()),
        format!(
            "bpftrace {:.3} us/drop (process {:.2}s + BPF {:.2}s), printed {} of {} drops ({} lost)",
            bt.tracer_us_per_drop(),
            bt.tracer_cpu,
            bt.bpf_secs,
            bt_lines,
            bt.drops,
            bt.drops.saturating_sub(bt_lines)
        ),
    ));

    // 6. Start-up.
    step("start-up: exec to attached, 5 runs");
    let mut starts = Vec::new();
    for _ in 0..5 {
        let (t, attach) = Traced::droptrace(droptrace, &[], scratch.join("start.ndjson"))?;
        starts.push(attach.as_secs_f64() * 1000.0);
        t.stop()?;
    }
    table.push((
        "start-up: exec to attached".into(),
        format!("{:.0} ms", median(starts.clone())),
        format!("median of 5: {starts:.0?} (target < 1 s)"),
    ));

    table.extend(criterion);

    // 5. Memory with a large cluster snapshot.
    if let Some((rss, note)) = crate::bench_criterion::snapshot_rss(droptrace, &snapshot)? {
        table.push((
            "memory: RSS with 10k-pod / 2k-policy snapshot".into(),
            rss,
            note,
        ));
    }

    drop(topo);
    let _ = Command::new("sysctl")
        .args(["-q", "-w", "kernel.bpf_stats_enabled=0"])
        .status();

    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    writeln!(md, "# droptrace benchmarks\n")?;
    writeln!(
        md,
        "Produced by `sudo -E cargo xtask bench` on {} (kernel {}, {cpus} CPUs). Every ratio is \
         measured side by side in the same run; targets are recorded, not asserted in tests.\n",
        crate::today(),
        kernel.trim()
    )?;
    writeln!(md, "| measurement | value | detail |\n| --- | --- | --- |")?;
    for (k, v, d) in &table {
        writeln!(md, "| {k} | {v} | {d} |")?;
    }
    writeln!(
        md,
        "\nHow: two network namespaces joined by a veth pair; storm = `hping3 --flood -S -p 1521` \
         for {}s into an iptables DROP in the receiving namespace; CPU from /proc/stat (all CPUs, \
         non-idle) and /proc/PID/stat, BPF program time from `kernel.bpf_stats_enabled` \
         (`bpftool prog show`); bpftrace runs the one-liner in xtask/src/bench.rs printing each \
         dropped TCP tuple.",
        opts.storm_secs
    )?;
    writeln!(
        md,
        "\n{}",
        crate::bench_cost::markdown(&cost_rows, opts.baseline.as_deref(), &cost_opts)?.trim_end()
    )?;
    println!("{md}");
    // `cargo xtask soak` owns its section: keep it.
    let path = workspace_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    if let (_, Some(soak)) = split_soak(&old) {
        writeln!(md, "\n{}", soak.trim_end())?;
    }
    std::fs::write(&path, &md)?;
    Ok(())
}

/// The cost figures of `droptrace` and the baseline (when given), side by side.
fn cost(
    opts: &Options,
    droptrace: &Path,
    topo: &Topo,
    scratch: &Path,
) -> anyhow::Result<(Vec<crate::bench_cost::Row>, crate::bench_cost::Options)> {
    let cost_opts = crate::bench_cost::Options {
        iperf_secs: opts.iperf_secs.max(5),
        pairs: opts.pairs,
        pair_secs: opts.pair_secs,
    };
    let rows = crate::bench_cost::run(
        topo,
        &crate::bench_cost::Bins {
            before: opts.baseline.as_deref(),
            after: droptrace,
        },
        scratch,
        &cost_opts,
    )?;
    Ok((rows, cost_opts))
}

/// `--cost-only`: the cost section alone, printed and written over BENCHMARKS.md's own.
fn cost_only(opts: &Options, droptrace: &Path, scratch: &Path) -> anyhow::Result<()> {
    step("waiting for /run/lock/droptrace-e2e.lock");
    let lock = e2e_lock()?;
    let topo = Topo::new()?;
    let measured = cost(opts, droptrace, &topo, scratch);
    drop(topo);
    drop(lock);
    let _ = Command::new("sysctl")
        .args(["-q", "-w", "kernel.bpf_stats_enabled=0"])
        .status();
    let (rows, cost_opts) = measured?;
    let section = crate::bench_cost::markdown(&rows, opts.baseline.as_deref(), &cost_opts)?;
    println!("{section}");
    let path = workspace_root().join("BENCHMARKS.md");
    let old = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let new = replace_cost(&old, &section)
        .context("BENCHMARKS.md has no `## Cost` section: run the whole `cargo xtask bench`")?;
    std::fs::write(&path, new)?;
    step("BENCHMARKS.md: the Cost section rewritten from this run (the rest kept)");
    Ok(())
}

/// `md` with its `## Cost` section (up to the next `## ` heading or the end) replaced.
fn replace_cost(md: &str, section: &str) -> Option<String> {
    let start = md.find("\n## Cost")? + 1;
    let end = md[start + 1..]
        .find("\n## ")
        .map_or(md.len(), |i| start + 1 + i + 1);
    Some(format!(
        "{}{}\n{}{}",
        &md[..start],
        section.trim_end(),
        if end < md.len() { "\n" } else { "" },
        &md[end..]
    ))
}

/// The e2e lock, held until the returned file is dropped.
fn e2e_lock() -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    let path = "/run/lock/droptrace-e2e.lock";
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| path.to_string())?;
    // SAFETY: flock on an open file descriptor.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        bail!("{path}: {}", std::io::Error::last_os_error());
    }
    Ok(f)
}

/// BENCHMARKS.md before its `## Soak` section, and that section (to the end).
pub(crate) fn split_soak(md: &str) -> (&str, Option<&str>) {
    match md.find("\n## Soak\n") {
        Some(i) => (&md[..i + 1], Some(&md[i + 1..])),
        None => (md, None),
    }
}

pub(crate) fn ensure_tools() -> anyhow::Result<()> {
    crate::setup::debian_packages(&[
        ("iperf3", "iperf3"),
        ("hping3", "hping3"),
        ("bpftrace", "bpftrace"),
        ("bpftool", "bpftool"),
    ])
}

#[cfg(test)]
mod cost_section_tests {
    use super::replace_cost;

    #[test]
    fn only_the_cost_section_is_replaced() {
        let md = "# b\n\n| a | b |\n\n## Cost: old\n\nold rows\n\n## Soak\n\nsoak rows\n";
        let new = replace_cost(md, "## Cost: new\n\nnew rows\n").unwrap();
        assert_eq!(
            new,
            "# b\n\n| a | b |\n\n## Cost: new\n\nnew rows\n\n## Soak\n\nsoak rows\n"
        );
        let last = replace_cost("# b\n\n## Cost\n\nold\n", "## Cost\n\nnew").unwrap();
        assert_eq!(last, "# b\n\n## Cost\n\nnew\n");
        assert!(replace_cost("# b\n", "## Cost").is_none());
    }
}
