//! Delivery to a SIEM that is not there when droptrace starts, and across a restart during a
//! drop storm: the real `droptrace run`, real drops, a `tcp://` receiver the test starts late.
//! What the receiver gets is compared line for line with what the same run printed on stdout.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use droptrace_tests::{
    netns::{AppDb, Family},
    oracle_client,
    receiver::{LineReceiver, free_port},
    scenario::Proc,
    tracer::{Droptrace, Finished, at, str_at},
};
use serde_json::Value;

/// A storm next to another test's timings makes both flaky: one test at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// A spool directory of this test, empty at the start and removed at the end.
struct SpoolDir(PathBuf);

impl SpoolDir {
    fn new(tag: &str) -> Self {
        let d = droptrace_tests::scratch_dir().join(format!("spool-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Self(d)
    }

    fn arg(&self) -> &str {
        self.0.to_str().expect("utf-8")
    }
}

impl Drop for SpoolDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn parsed(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "line {i} of {}: {e}: {l:?}; around it: {:?}",
                    lines.len(),
                    &lines[i.saturating_sub(2)..(i + 3).min(lines.len())]
                )
            })
        })
        .collect()
}

/// The final stall of a sqlplus that times out against the dropped listener.
fn stalled_sqlplus(topo: &AppDb, tracer: &Droptrace, nth: usize) {
    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, "ORCLPDB1", 2.0);
    assert!(out.error.contains("timed out"), "{out:?}");
    let db = topo.db_ip.to_string();
    wait_until("the stall on stdout", Duration::from_secs(10), || {
        tracer
            .events()
            .iter()
            .filter(|v| {
                str_at(v, "kind") == "stall"
                    && str_at(v, "flow.dst_ip") == db
                    && str_at(v, "attempt.outcome") == "timeout"
            })
            .count()
            >= nth
    });
}

/// The sink's line of the exit summary.
fn summary_of<'a>(fin: &'a Finished, sink: &str) -> &'a str {
    let line = fin
        .stderr
        .lines()
        .find(|l| l.starts_with("droptrace: outputs"))
        .unwrap_or_else(|| panic!("no summary: {}", fin.stderr));
    let at = line
        .find(&format!("{sink}: "))
        .expect("sink in the summary");
    line[at..].split(';').next().unwrap_or("")
}

#[test]
fn siem_down_at_start_gets_what_stdout_got() {
    let _alone = alone();
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(1521);
    let spool = SpoolDir::new("down-at-start");
    let port = free_port();
    let sink = format!("tcp://127.0.0.1:{port}");
    let started = Instant::now();
    let tracer = Droptrace::start(&["-o", "-", "-o", &sink, "--spool-dir", spool.arg()]);

    // While the SIEM is down: a stalled sqlplus (spooled).
    stalled_sqlplus(&topo, &tracer, 1);
    let before = tracer.events().len();
    std::thread::sleep(Duration::from_secs(5).saturating_sub(started.elapsed()));
    let receiver = LineReceiver::start(port);
    // Retries back off (doubling to 30 s): the receiver is found within one interval.
    wait_until(
        "the spooled events at the receiver",
        Duration::from_secs(40),
        || receiver.lines().len() >= before,
    );
    // Once it is up: another one (straight through).
    stalled_sqlplus(&topo, &tracer, 2);
    let fin = tracer.stop();
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    wait_until(
        "every event at the receiver",
        Duration::from_secs(10),
        || receiver.lines().len() >= fin.events.len(),
    );
    std::thread::sleep(Duration::from_millis(300));

    let got = parsed(&receiver.lines());
    println!(
        "stdout: {} events, receiver: {} events ({before} spooled while it was down)\n{}",
        fin.events.len(),
        got.len(),
        summary_of(&fin, &sink)
    );
    assert!(
        before >= 1,
        "something happened while the receiver was down"
    );
    assert_eq!(
        got, fin.events,
        "receiver and stdout hold the same events, in order"
    );
    let said = fin
        .stderr
        .lines()
        .filter(|l| l.contains("receiver unreachable at start"))
        .count();
    assert_eq!(said, 1, "said once: {}", fin.stderr);
    assert!(fin.stderr.contains("sink recovered"), "{}", fin.stderr);
    assert!(
        summary_of(&fin, &sink).starts_with(&format!("{sink}: {} sent, ", got.len()))
            && summary_of(&fin, &sink).ends_with("0 discarded, 0 left in spool"),
        "{}",
        fin.stderr
    );
}

/// hping3 SYNs from random sources into the dropped port, 2,000 a second (every one a new
/// flow: the kernel folds them past --new-flows-per-sec), for at most `secs` (a count, not
/// `timeout`: killing `timeout` left its hping3 running, with nothing to stop it, after the
/// test). Not --flood: the point is a restart under load, not the debug build's event
/// throughput. `ip netns exec` execs hping3: the child killed on drop is hping3 itself.
fn flood(topo: &AppDb, secs: u32) -> Proc {
    const PER_SEC: u32 = 2_000;
    let count = (secs * PER_SEC).to_string();
    let child = Command::new("ip")
        .args(["netns", "exec", &topo.app.name])
        .args([
            "hping3",
            "-q",
            "-S",
            "-p",
            "1521",
            "-i",
            "u500",
            "-c",
            &count,
            "--rand-source",
        ])
        .arg(topo.db_ip.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("hping3 (Debian package hping3)");
    Proc(child)
}

#[test]
fn sigterm_during_storm_spools_and_next_instance_delivers() {
    let _alone = alone();
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(1521);
    let spool = SpoolDir::new("restart");
    let port = free_port();
    let sink = format!("tcp://127.0.0.1:{port}");
    let args = ["-o", "-", "-o", &sink, "--spool-dir", spool.arg()];

    // The SIEM is down for the whole first instance: everything it sends goes to the spool.
    let first = Droptrace::start(&args);
    let _storm = flood(&topo, 40);
    let db = topo.db_ip.to_string();
    let is_storm_drop = |v: &Value| str_at(v, "kind") == "drop" && str_at(v, "flow.dst_ip") == db;
    wait_until("storm drops on stdout", Duration::from_secs(10), || {
        first.events().iter().filter(|v| is_storm_drop(v)).count() >= 3
    });
    std::thread::sleep(Duration::from_secs(2));
    let fin1 = first.stop_with(libc::SIGTERM);
    assert_eq!(fin1.code, Some(0), "clean exit on SIGTERM: {}", fin1.stderr);
    let n1 = fin1.events.len();
    let s1 = summary_of(&fin1, &sink);
    println!("first instance: {n1} events on stdout; {s1}");
    assert!(
        s1.starts_with(&format!("{sink}: 0 sent, "))
            && s1.ends_with(&format!(" 0 discarded, {n1} left in spool")),
        "every event of the first instance spooled: {s1}"
    );

    // The storm goes on; the SIEM is back; the next instance starts on the same spool.
    let receiver = LineReceiver::start(port);
    let second = Droptrace::start(&args);
    // Attaching takes seconds in an emulated VM: the first flood may be over by now (seen on
    // 6.12 under TCG), so the second instance gets a flood of its own.
    let _storm2 = flood(&topo, 40);
    wait_until(
        "the first instance's events at the receiver",
        Duration::from_secs(40),
        || receiver.lines().len() >= n1,
    );
    wait_until(
        "storm drops of the second instance",
        Duration::from_secs(10),
        || second.events().iter().filter(|v| is_storm_drop(v)).count() >= 1,
    );
    let fin2 = second.stop();
    assert_eq!(fin2.code, Some(0), "{}", fin2.stderr);
    wait_until(
        "every event at the receiver",
        Duration::from_secs(20),
        || receiver.lines().len() >= n1 + fin2.events.len(),
    );
    std::thread::sleep(Duration::from_millis(300));

    let got = parsed(&receiver.lines());
    let s2 = summary_of(&fin2, &sink);
    println!(
        "receiver: {} events = {n1} spooled by the first instance + {} of the second; {s2}",
        got.len(),
        fin2.events.len()
    );
    assert_eq!(got.len(), n1 + fin2.events.len(), "once each");
    assert_eq!(got[..n1], fin1.events[..], "the spool first, in order");
    assert_eq!(got[n1..], fin2.events[..], "then the second instance's own");
    let storm: u64 = got
        .iter()
        .filter(|v| is_storm_drop(v))
        .map(|v| at(v, "count").as_u64().unwrap_or(0))
        .sum();
    assert!(storm > 0, "the storm's drops reached the SIEM");
    assert!(
        s2.starts_with(&format!("{sink}: {} sent, ", got.len()))
            && s2.ends_with("0 discarded, 0 left in spool"),
        "{s2}"
    );
}
