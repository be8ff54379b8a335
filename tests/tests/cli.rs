//! Bad input and missing privileges: one line naming the problem, exit 2, no panic.
use std::process::Command;

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

#[test]
fn bad_ports_are_rejected_with_one_line() {
    for (arg, needle) in [
        ("0", "port 0 is not a port"),
        ("70000", "70000 is above 65535"),
        ("15x1", "`15x1` is not a port number"),
        ("1521,,", "is not a port number"),
    ] {
        let (code, err) = run(&["run", "--ports", arg]);
        assert_eq!(code, Some(2), "--ports {arg}: {err}");
        let first = err.lines().next().unwrap_or("");
        assert!(first.contains(needle), "--ports {arg}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn bad_duration_and_unknown_flag_exit_2() {
    let (code, err) = run(&["run", "--duration", "soon"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.lines().next().unwrap().contains("soon"), "{err}");
    let (code, _) = run(&["run", "--no-such-flag"]);
    assert_eq!(code, Some(2));
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
