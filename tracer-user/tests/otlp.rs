//! OTLP logs end to end through the real binary (`droptrace replay`) into a receiver that
//! decodes with the official opentelemetry-proto definitions (tests/otlp/receiver.py, in the
//! venv `cargo xtask setup` makes): OTLP/HTTP and OTLP/gRPC, plain and TLS, retries, a
//! receiver that is down and comes back (spool), and the decoded records' attributes.
mod output_common;

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use droptrace::{
    encode::{self, Format},
    event::{Event, Kind},
};
use output_common::*;
use serde_json::Value;

/// The test venv's Python (DROPTRACE_PYTHON, else the workspace's .venv).
fn python() -> PathBuf {
    let py = std::env::var_os("DROPTRACE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    let ok = Command::new(&py)
        .args([
            "-c",
            "import grpc, opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc",
        ])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import opentelemetry-proto and grpcio: run `cargo xtask setup`",
        py.display()
    );
    py
}

struct Receiver {
    proc: Guard,
    port: u16,
    out: PathBuf,
    transport: &'static str,
    tls: Option<(PathBuf, PathBuf)>,
}

impl Receiver {
    fn start(dir: &Path, transport: &'static str, tls: Option<&Certs>, fail: u32) -> Self {
        let mut r = Receiver {
            proc: Guard(None),
            port: 0,
            out: dir.join(format!("received-{transport}.ndjson")),
            transport,
            tls: tls.map(|c| (c.cert.clone(), c.key.clone())),
        };
        r.spawn(fail);
        r
    }

    fn spawn(&mut self, fail: u32) {
        let mut c = Command::new(python());
        c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otlp/receiver.py"))
            .args(["--transport", self.transport])
            .args(["--port", &self.port.to_string()])
            .arg("--out")
            .arg(&self.out)
            .args(["--fail", &fail.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some((cert, key)) = &self.tls {
            c.arg("--cert").arg(cert).arg("--key").arg(key);
        }
        let mut child = c.spawn().expect("start the OTLP receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("receiver said `{line}`"));
        self.port = port;
        self.proc = Guard(Some(child));
    }

    fn url(&self) -> String {
        let scheme = match (self.transport, self.tls.is_some()) {
            ("grpc", false) => "otlp",
            ("grpc", true) => "otlps",
            (_, false) => "otlp+http",
            (_, true) => "otlp+https",
        };
        // TLS: the test certificate names localhost.
        let host = if self.tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{scheme}://{host}:{}", self.port)
    }

    fn records(&self) -> Vec<Value> {
        read_lines(&self.out)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn wait_for(&self, n: usize) -> Vec<Value> {
        wait_for(
            &format!("{n} records at the receiver"),
            Duration::from_secs(20),
            || read_lines(&self.out).len() >= n,
        );
        std::thread::sleep(Duration::from_millis(200));
        self.records()
    }
}

fn replay(events: &[Event], args: &[&str], envs: &[(&str, &str)]) -> (i32, String) {
    let dir = tmpdir();
    let input = dir.path().join("in.ndjson");
    std::fs::write(&input, ndjson(events)).unwrap();
    let mut c = droptrace();
    c.arg("replay")
        .arg("--input")
        .arg(&input)
        .args(["--node-name", "test-node"])
        .args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn line(format: Format, e: &Event) -> String {
    let mut buf = Vec::new();
    encode::encode(format, e, &mut buf);
    String::from_utf8(buf).unwrap()
}

fn severity(kind: Kind) -> (u64, &'static str) {
    match kind {
        Kind::Lost => (17, "ERROR"),
        Kind::Drop | Kind::Stall | Kind::Storm => (13, "WARN"),
        Kind::Tns | Kind::Connect => (9, "INFO"),
        _ => (5, "DEBUG"),
    }
}

/// Every record is its event: body in the chosen format, kind, severity, time, resource.
fn check_records(got: &[Value], events: &[Event], format: Format) {
    assert_eq!(got.len(), events.len(), "one LogRecord per event");
    for (i, (r, e)) in got.iter().zip(events).enumerate() {
        let what = format!("record {i} ({})", e.kind.as_str());
        assert_eq!(r["body"], line(format, e).as_str(), "{what}: body");
        assert_eq!(r["attributes"]["droptrace.kind"], e.kind.as_str(), "{what}");
        assert_eq!(r["event_name"], format!("droptrace.{}", e.kind.as_str()));
        let (num, text) = severity(e.kind);
        assert_eq!(r["severity_number"], num, "{what}");
        assert_eq!(r["severity_text"], text, "{what}");
        let want_ns = encode::rfc3339_nanos(&e.time).unwrap() as u64;
        assert_eq!(r["time_unix_nano"].as_u64(), Some(want_ns), "{what}: time");
        // Observed: when droptrace encoded it (this test's last minutes).
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let observed = r["observed_time_unix_nano"].as_u64().unwrap();
        assert!(
            observed <= now && now - observed < 600_000_000_000,
            "{what}: {observed}"
        );
        assert_eq!(r["resource"]["service.name"], "droptrace");
        assert_eq!(r["resource"]["k8s.node.name"], e.node.as_str(), "{what}");
        assert!(
            r["resource"]["host.name"]
                .as_str()
                .is_some_and(|h| !h.is_empty())
        );
        assert_eq!(r["scope"], "droptrace");
    }
}

/// The enriched drop sample: what a SIEM filters on.
fn check_drop_attributes(r: &Value) {
    let a = &r["attributes"];
    assert_eq!(a["droptrace.kind"], "drop");
    assert_eq!(a["droptrace.drop.reason"], "NETFILTER_DROP");
    assert_eq!(a["network.transport"], "tcp");
    assert_eq!(a["network.type"], "ipv4");
    assert_eq!(a["source.address"], "10.244.1.17");
    assert_eq!(a["source.port"], 43512);
    assert_eq!(a["destination.address"], "10.244.2.9");
    assert_eq!(a["destination.port"], 1521);
    assert_eq!(a["network.peer.address"], "10.244.2.9");
    assert_eq!(a["k8s.pod.name"], "checkout-7d9f");
    assert_eq!(a["k8s.namespace.name"], "shop");
    assert_eq!(a["droptrace.destination.k8s.pod.name"], "oracle-0");
    assert_eq!(a["droptrace.destination.k8s.namespace.name"], "data");
    assert_eq!(a["droptrace.policy.verdict"], "denied");
    assert_eq!(a["droptrace.policy.name"], "shop/default-deny");
    assert_eq!(a["process.pid"], 4240);
    assert_eq!(a["process.executable.name"], "java");
    assert!(
        a["droptrace.flow.community_id"]
            .as_str()
            .is_some_and(|c| c.starts_with("1:"))
    );
}

fn samples_only() -> Vec<Event> {
    samples().into_iter().map(|(_, e)| e).collect()
}

#[test]
fn otlp_http_records_decoded_by_opentelemetry_proto() {
    let dir = tmpdir();
    let r = Receiver::start(dir.path(), "http", None, 0);
    let events = samples_only();
    let (code, err) = replay(
        &events,
        &["-o", &r.url()],
        &[
            ("DROPTRACE_HTTP_AUTH", "Bearer s3cret"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=team%20a"),
        ],
    );
    assert_eq!(code, 0, "{err}");
    let got = r.wait_for(events.len());
    check_records(&got, &events, Format::Native);
    check_drop_attributes(&got[0]);
    println!(
        "decoded OTLP/HTTP record:\n{}",
        serde_json::to_string_pretty(&got[0]).unwrap()
    );
    assert_eq!(got[0]["headers"]["authorization"], "Bearer s3cret");
    assert_eq!(got[0]["headers"]["x-tenant"], "team a");
    assert!(
        err.contains(&format!("{}: {} sent, 0 errors", r.url(), events.len())),
        "{err}"
    );
}

#[test]
fn otlp_grpc_records_decoded_with_retries() {
    let dir = tmpdir();
    // The first two exports fail with UNAVAILABLE: retried, nothing lost.
    let r = Receiver::start(dir.path(), "grpc", None, 2);
    let events = samples_only();
    let (code, err) = replay(
        &events,
        &["-o", &r.url(), "--format", "ecs", "--batch", "5"],
        &[("DROPTRACE_HTTP_AUTH", "Bearer s3cret")],
    );
    assert_eq!(code, 0, "{err}");
    let got = r.wait_for(events.len());
    check_records(&got, &events, Format::Ecs);
    check_drop_attributes(&got[0]);
    println!(
        "decoded OTLP/gRPC record:\n{}",
        serde_json::to_string_pretty(&got[0]).unwrap()
    );
    assert_eq!(got[0]["transport"], "grpc");
    assert_eq!(got[0]["headers"]["authorization"], "Bearer s3cret");
    assert!(
        err.contains(&format!(
            "{}: {} sent, 2 errors, 0 discarded",
            r.url(),
            events.len()
        )),
        "{err}"
    );
}

#[test]
fn otlp_over_tls_both_transports() {
    let dir = tmpdir();
    let certs = make_certs(dir.path());
    let events = samples_only();
    for transport in ["http", "grpc"] {
        let r = Receiver::start(dir.path(), transport, Some(&certs), 0);
        let (code, err) = replay(
            &events,
            &["-o", &r.url(), "--ca", certs.ca.to_str().unwrap()],
            &[],
        );
        assert_eq!(code, 0, "{transport}: {err}");
        check_records(&r.wait_for(events.len()), &events, Format::Native);
        // A CA that did not sign the receiver's certificate: refused at start.
        let other = dir.path().join(format!("other-{transport}"));
        std::fs::create_dir_all(&other).unwrap();
        let other = make_certs(&other);
        let (code, err) = replay(
            &events,
            &["-o", &r.url(), "--ca", other.ca.to_str().unwrap()],
            &[],
        );
        assert_eq!(code, 2, "{transport}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("TLS handshake"), "{err}");
    }
}

/// Down mid-stream, back on the same port: every record arrives exactly once, in order.
fn receiver_down_then_up(transport: &'static str) {
    let dir = tmpdir();
    let mut r = Receiver::start(dir.path(), transport, None, 0);
    let spool = dir.path().join("spool");
    let url = r.url();
    let mut live = LiveReplay::start(&[
        "-o",
        &url,
        "--spool-dir",
        spool.to_str().unwrap(),
        "--flush-timeout",
        "60s",
    ]);
    let events = numbered_drops(300);
    live.send(&events[..100]);
    r.wait_for(100);
    r.proc.kill();
    live.send(&events[100..200]);
    wait_for(
        "the outage to reach the spool",
        Duration::from_secs(20),
        || {
            std::fs::read_dir(&spool)
                .into_iter()
                .flatten()
                .flatten()
                .any(|d| std::fs::read_dir(d.path()).is_ok_and(|mut f| f.next().is_some()))
        },
    );
    r.spawn(0);
    assert_eq!(r.url(), url, "the receiver is back on its port");
    live.send(&events[200..]);
    let err = live.finish(Duration::from_secs(90));
    let got = r.wait_for(300);
    let counts: Vec<u64> = got
        .iter()
        .map(|v| {
            let body: Value = serde_json::from_str(v["body"].as_str().unwrap()).unwrap();
            body["count"].as_u64().unwrap()
        })
        .collect();
    assert_eq!(
        counts,
        (1..=300).collect::<Vec<u64>>(),
        "out of order, twice or not at all\n{err}"
    );
    // Spooled records keep their attributes.
    for v in &got[100..200] {
        check_drop_attributes(v);
    }
    assert!(err.contains(&format!("{url}: 300 sent")), "{err}");
    assert!(err.contains("0 discarded, 0 left in spool"), "{err}");
}

#[test]
fn otlp_http_receiver_down_then_up_replays_spool() {
    receiver_down_then_up("http");
}

#[test]
fn otlp_grpc_receiver_down_then_up_replays_spool() {
    receiver_down_then_up("grpc");
}

#[test]
fn bad_otlp_outputs_fail_at_start_with_one_line() {
    for (args, env, expect) in [
        (vec!["-o", "otlp://h:4317/v1/logs"], None, "takes no path"),
        (vec!["-o", "otlp+http://u:p@h"], None, "credentials"),
        (
            vec!["-o", "otlp+http://127.0.0.1:1"],
            Some(("OTEL_EXPORTER_OTLP_HEADERS", "novalue")),
            "OTEL_EXPORTER_OTLP_HEADERS",
        ),
    ] {
        let envs: Vec<(&str, &str)> = env.into_iter().collect();
        let (code, err) = replay(&samples_only()[..1], &args, &envs);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    // A receiver that is down is no configuration error: droptrace starts, says so once,
    // and counts what it could not deliver (see the down-then-up tests for the spool).
    let (code, err) = replay(&samples_only()[..1], &["-o", "otlp://127.0.0.1:1"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("receiver unreachable at start"), "{err}");
    assert!(err.contains("1 discarded"), "{err}");
}
