//! Bad input and missing privileges: one line naming the problem, exit 2, no panic.
use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use droptrace_tests::tracer::binary;

fn run(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(binary())
        .args(args)
        .output()
        .expect("run droptrace");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs droptrace with bad input; it must answer at once (a run that started tracing instead
/// is killed and fails the case).
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run droptrace");
    let deadline = Instant::now() + Duration::from_secs(15);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return (
                None,
                format!("{args:?} was accepted: still running after 15 s"),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("stderr");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every flag and file input of every subcommand, each given one bad value: one line naming
/// the problem (`droptrace: ...`), exit 2, nothing started.
#[test]
fn every_bad_flag_and_file_is_one_line_and_exit_2() {
    droptrace_tests::require_root();
    let dir = droptrace_tests::scratch_dir().join(format!("cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, content: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_str().unwrap().to_string()
    };
    let (empty, not_utf8, bad_json, comments, not_cert) = (
        file("empty", b""),
        file("not-utf8", b"\xff\xfe\n"),
        file("bad.json", b"{\n"),
        file("comments.yaml", b"---\n# nothing here\n---\n"),
        file("not-a-cert.pem", b"not a certificate\n"),
    );
    let d = dir.to_str().unwrap();
    let fixtures = explain_fixtures();
    let (snapshot, change, observed) = (
        format!("{fixtures}/snapshot.yaml"),
        format!("{fixtures}/open-range.yaml"),
        format!("{fixtures}/observed.ndjson"),
    );
    let pod_doc = file(
        "pod.yaml",
        b"apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
    );
    let end_port = file(
        "endport.yaml",
        b"apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x, namespace: db}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{endPort: 2000}]}]\n",
    );
    let apply = |change: &str, flows: &str| apply_args(&snapshot, change, flows);
    let explain = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["explain", "--from", "a/b", "--to", "c/d", "--port", "1521"]
            .map(String::from)
            .to_vec();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let w = |a: &[&str]| -> Vec<String> { a.iter().map(|s| s.to_string()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        // Global.
        (
            w(&["--log-level", "nope", "check"]),
            "`nope` is not a level",
        ),
        (w(&["--log-level", "info,[", "check"]), "--log-level"),
        (w(&["frobnicate"]), "unrecognized subcommand 'frobnicate'"),
        (w(&[]), "a subcommand is required"),
        // check
        (w(&["check", "--nope"]), "unexpected argument '--nope'"),
        // run: kernel and pipeline settings.
        (w(&["run", "--ports", "0"]), "port 0 is not a port"),
        (w(&["run", "--ports", "70000"]), "70000 is above 65535"),
        (w(&["run", "--ports", ""]), "is not a port number"),
        (w(&["run", "--duration", "soon"]), "soon"),
        (w(&["run", "--duration", "0s"]), "too short"),
        (w(&["run", "--max-events", "x"]), "--max-events"),
        (w(&["run", "--max-events", "0"]), "--max-events"),
        (w(&["run", "--node-name", ""]), "--node-name"),
        (w(&["run", "--node-name", " "]), "empty"),
        (w(&["run", "--ringbuf-bytes", "100"]), "power of two"),
        (w(&["run", "--ringbuf-bytes", "x"]), "not a size in bytes"),
        (w(&["run", "--stall-after", "0"]), "too short"),
        (w(&["run", "--flow-table", "1"]), "--flow-table"),
        (w(&["run", "--flush", "1ms"]), "too short"),
        (w(&["run", "--agg-entries", "0"]), "--agg-entries"),
        (
            w(&["run", "--new-flows-per-sec", "x"]),
            "--new-flows-per-sec",
        ),
        (w(&["run", "--new-flows-per-sec", "-1"]), "'-1'"),
        (w(&["run", "--ip-history", "x"]), "--ip-history"),
        (w(&["run", "--pod", "db/x"]), "--pod needs"),
        (w(&["run", "--all-tcp=yes"]), "--all-tcp"),
        // run: cluster identity files.
        (w(&["run", "--watch-snapshot"]), "--k8s-snapshot"),
        (
            w(&["run", "--k8s-snapshot", "/nonexistent.json"]),
            "No such file",
        ),
        (
            w(&["run", "--k8s-snapshot", "/dev/null"]),
            "/dev/null: empty",
        ),
        (w(&["run", "--k8s-snapshot", &empty]), "empty"),
        (w(&["run", "--k8s-snapshot", d]), "Is a directory"),
        (w(&["run", "--k8s-snapshot", &not_utf8]), "not UTF-8"),
        (w(&["run", "--k8s-snapshot", &bad_json]), "not valid JSON"),
        (
            w(&["run", "--k8s-snapshot", &comments]),
            "no document in it",
        ),
        (w(&["run", "--kubeconfig", "/nonexistent"]), "No such file"),
        (
            w(&["run", "--kubeconfig", "/dev/null"]),
            "no current-context",
        ),
        (
            w(&["run", "--k8s-snapshot", &empty, "--k8s-api"]),
            "cannot be used with",
        ),
        // run: outputs.
        (w(&["run", "-o", "gopher://x:70"]), "unknown scheme"),
        (w(&["run", "-o", "tcp://host"]), "no port"),
        (w(&["run", "-o", "file:"]), "empty path"),
        (w(&["run", "-o", &format!("file:{d}")]), "Is a directory"),
        (
            w(&["run", "-o", "file:/nonexistent/x.ndjson"]),
            "No such file",
        ),
        (w(&["run", "-o", "-", "-o", "-"]), "twice"),
        (w(&["run", "--format", "xml"]), "unknown format"),
        (w(&["run", "--rotate-size", "x"]), "not a size"),
        (w(&["run", "--rotate-keep", "x"]), "--rotate-keep"),
        (w(&["run", "--ca", "/nonexistent/ca.pem"]), "CA file"),
        (w(&["run", "--ca", &not_cert]), "CA file"),
        (w(&["run", "--client-cert", &not_cert]), "--client-key"),
        (
            w(&["run", "--client-cert", &not_cert, "--client-key", &not_cert]),
            "client certificate",
        ),
        (w(&["run", "--http-mode", "x"]), "unknown HTTP mode"),
        (
            w(&["run", "--http-auth-file", "/nonexistent"]),
            "--http-auth-file",
        ),
        (w(&["run", "--http-auth-file", "/dev/null"]), "empty"),
        (w(&["run", "--batch", "0"]), "--batch"),
        (
            w(&["run", "--spool-dir", &format!("{not_cert}/spool")]),
            "--spool-dir",
        ),
        (w(&["run", "--spool-max", "x"]), "not a size"),
        (w(&["run", "--spool-max", "0"]), "holds nothing"),
        (w(&["run", "--queue-size", "0"]), "--queue-size"),
        (w(&["run", "--flush-timeout", "x"]), "--flush-timeout"),
        (w(&["run", "--io-timeout", "0s"]), "zero timeout"),
        (w(&["run", "--metrics", "x"]), "not an address:port"),
        (w(&["run", "--metrics-max-pods", "x"]), "--metrics-max-pods"),
        // replay: its input, plus the same outputs.
        (
            w(&["replay", "--input", "/nonexistent"]),
            "--input /nonexistent: No such file",
        ),
        (w(&["replay", "--input", d]), "is a directory"),
        (w(&["replay", "--node-name", ""]), "--node-name"),
        (w(&["replay", "-o", "gopher://x:70"]), "unknown scheme"),
        (w(&["replay", "--spool-max", "0"]), "holds nothing"),
        // explain
        (w(&["explain"]), "required arguments were not provided"),
        (explain(&["--k8s-snapshot", "/dev/null"]), "empty"),
        (explain(&["--k8s-snapshot", &comments]), "no document in it"),
        (explain(&["--k8s-snapshot", "/nonexistent"]), "No such file"),
        (explain(&["--kubeconfig", "/nonexistent"]), "No such file"),
        (
            explain(&["--k8s-snapshot", &empty, "--protocol", "ICMP"]),
            "--protocol",
        ),
        (
            explain(&["--k8s-snapshot", &empty, "--extra-ports", "x"]),
            "--extra-ports",
        ),
        // explain --apply --flows
        (
            w(&["explain", "--k8s-snapshot", &snapshot, "--apply", &change]),
            "--flows",
        ),
        (
            w(&["explain", "--k8s-snapshot", &snapshot, "--flows", &observed]),
            "--apply",
        ),
        (
            [apply(&change, &observed), w(&["--from", "a/b"])].concat(),
            "cannot be used with",
        ),
        (
            apply("/nonexistent", &observed),
            "--apply /nonexistent: No such file",
        ),
        (
            apply(&change, "/nonexistent"),
            "--flows /nonexistent: No such file",
        ),
        (apply(&empty, &observed), "no NetworkPolicy in it"),
        (apply(&comments, &observed), "no NetworkPolicy in it"),
        (apply(&bad_json, &observed), "document 1: not YAML"),
        (apply(&not_utf8, &observed), "valid UTF-8"),
        (
            apply(&pod_doc, &observed),
            "document 1 is a Pod, not a NetworkPolicy",
        ),
        (
            apply(&end_port, &observed),
            "spec.ingress[0].ports[0].endPort: needs port",
        ),
        (
            apply(&change, &empty),
            "no connect, stall or drop event in it",
        ),
        (
            apply(&change, &bad_json),
            "bad.json:1: not a droptrace.v1 event",
        ),
        (
            apply(&change, &comments),
            "comments.yaml:1: not a droptrace.v1 event",
        ),
        (apply(&change, &not_utf8), "valid UTF-8"),
    ];
    let mut failures = Vec::new();
    for (args, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, err) = refused(&args);
        let lines = err.trim_end().lines().count();
        if code != Some(2)
            || lines != 1
            || !err.starts_with("droptrace: ")
            || !err.contains(needle)
            || err.contains("panicked")
        {
            failures.push(format!(
                "{args:?} (want {needle:?}): exit {code:?}, {lines} lines: {err}"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    println!("{} bad inputs: one line, exit 2", cases.len());
}

/// `explain --k8s-snapshot SNAPSHOT --apply CHANGE --flows FLOWS`.
fn apply_args(snapshot: &str, change: &str, flows: &str) -> Vec<String> {
    [
        "explain",
        "--k8s-snapshot",
        snapshot,
        "--apply",
        change,
        "--flows",
        flows,
    ]
    .map(String::from)
    .to_vec()
}

/// The committed fixtures of `explain --apply` (tracer-user/tests/fixtures/explain).
fn explain_fixtures() -> String {
    format!(
        "{}/../tracer-user/tests/fixtures/explain",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `explain --apply --flows` on the committed recorded stream: the flows a change breaks are
/// printed and the exit status is 3; a change that only unblocks exits 0; `--json` says the
/// same.
#[test]
fn explain_apply_on_a_recorded_stream_exits_3_when_the_change_breaks_a_session() {
    let f = explain_fixtures();
    let snapshot = format!("{f}/snapshot.yaml");
    let observed = format!("{f}/observed.ndjson");
    let run = |change: &str, json: bool| {
        let mut args = apply_args(&snapshot, &format!("{f}/{change}"), &observed);
        if json {
            args.push("--json".into());
        }
        let out = Command::new(binary()).args(&args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = run("tighten.yaml", false);
    println!("{out}{err}");
    assert_eq!(code, Some(3), "{out}{err}");
    assert!(
        out.starts_with(
            "BREAKS    app/client (10.202.1.1) -> db/oracle-0 (10.203.1.2) TCP/1521  \
             (observed: established x3)\n  before  allowed (ingress) by db/oracle-listener-only\n  \
             after   denied (ingress), isolated by db/oracle-listener-only\n"
        ),
        "{out}"
    );
    assert!(
        out.contains(
            "change db/oracle-listener-only (replaced): 1 breaking, 0 unblocked, 3 unchanged"
        ),
        "{out}"
    );
    assert_eq!(
        err.trim_end(),
        "droptrace: the change breaks 1 observed flow(s) that were allowed"
    );
    let (code, out, err) = run("open-range.yaml", false);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.starts_with("UNBLOCKS  app/client (10.202.1.1) -> db/oracle-0 (10.203.1.2) TCP/40123  (observed: dropped x3, timeout x1)"),
        "{out}"
    );
    assert!(!out.contains("BREAKS"), "{out}");
    let (code, out, _) = run("open-range.yaml", true);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["breaks"].as_u64(), v["unblocks"].as_u64()),
        (Some(0), Some(3)),
        "{v}"
    );
    assert_eq!(v["changes"][0]["effect"], "unblocks");
    assert_eq!(v["changes"][0]["port"], 40123);
    assert_eq!(
        v["changes"][0]["after"]["policies"][0]["name"],
        "oracle-dispatchers"
    );
    assert_eq!(v["policies"][0]["action"], "created");
}

#[test]
fn help_and_version_are_not_errors() {
    for args in [&["--help"][..], &["--version"], &["run", "--help"]] {
        let (code, _) = run(args);
        assert_eq!(code, Some(0), "{args:?}");
    }
}

#[test]
fn unprivileged_run_names_the_missing_capability() {
    droptrace_tests::require_root();
    // nobody, with every capability dropped.
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(binary())
        .args(["run", "--duration", "1s"])
        .output()
        .expect("setpriv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.contains("missing capability CAP_BPF"), "{err}");
}

#[test]
fn check_reports_this_kernel_ready() {
    droptrace_tests::require_root();
    let out = Command::new(binary())
        .args(["check", "--json"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    let names: Vec<_> = v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    for n in [
        "privileges",
        "btf",
        "tracefs",
        "tracepoint skb:kfree_skb",
        "drop reasons",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
}

/// Ctrl-C while the programs load (or just after "attached" is logged) is a clean stop: the
/// run finishes attaching, detaches, prints its summary and exits 0. Seen in a 5.10 VM before
/// the fix: SIGINT 0.4 s after "attached" killed droptrace by the signal's default action.
#[test]
fn sigint_while_loading_is_a_clean_stop() {
    use std::io::{BufRead, BufReader};
    droptrace_tests::require_root();
    let mut child = Command::new(binary())
        .args(["run", "--duration", "120s"])
        .env("DROPTRACE_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run droptrace");
    let stderr = child.stderr.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("object loaded") {
                let _ = tx.send(());
            }
            lines.push(line);
        }
        lines
    });
    // Loading takes seconds under emulation: the signal lands mid-start.
    let loaded = rx.recv_timeout(Duration::from_secs(120)).is_ok();
    let status = droptrace_tests::tracer::signal_and_wait(
        &mut child,
        libc::SIGINT,
        Duration::from_secs(120),
    );
    let lines = reader.join().unwrap().join("\n");
    assert!(loaded, "no 'object loaded' line: {lines}");
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "clean exit: {status:?}\n{lines}"
    );
    assert!(lines.contains("lost in"), "the summary line: {lines}");
}
