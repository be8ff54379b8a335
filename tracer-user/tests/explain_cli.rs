//! `droptrace explain` end to end: the built binary on a snapshot fixture.
use std::{path::PathBuf, process::Command};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/k8s/cluster.json")
}

/// (exit code, stdout, stderr)
fn explain(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_droptrace"))
        .arg("explain")
        .args(args)
        .env_remove("DROPTRACE_LOG")
        .output()
        .expect("run droptrace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn text_names_verdicts_policies_and_fix() {
    let f = fixture();
    let (code, out, err) = explain(&[
        "--k8s-snapshot",
        f.to_str().unwrap(),
        "--from",
        "app/client-7d9f8b6c5d-x2k4p",
        "--to",
        "db/oracle-0",
        "--port",
        "1521",
    ]);
    assert_eq!((code, err.as_str()), (0, ""));
    let expected_head = "\
app/client-7d9f8b6c5d-x2k4p (10.244.1.15) -> db/oracle-0 (10.244.2.7) TCP/1521
egress:  denied
  isolated by: app/default-deny-egress
  no egress rule of app/default-deny-egress allows TCP/1521 to db/oracle-0 from app/client-7d9f8b6c5d-x2k4p
  closest: app/default-deny-egress egress rule 1 matches db/oracle-0 but not TCP/1521
ingress: allowed
  allowed by: db/allow-app-to-oracle (rule 0)
  ingress of db/oracle-0 allowed by db/allow-app-to-oracle rule 0
verdict: denied (egress)

suggested fix:
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-egress-client-to-oracle-tcp-1521
  namespace: app
";
    assert!(out.starts_with(expected_head), "{out}");
    assert!(
        out.ends_with(
            "\nfix check (the snapshot re-evaluated with the fix applied):\n  allows this flow\n  allows nothing else\n"
        ),
        "{out}"
    );
}

#[test]
fn allowed_flow_has_no_fix() {
    let f = fixture();
    // kube-proxy's node address to the client on its own node: always allowed.
    let (code, out, _) = explain(&[
        "--k8s-snapshot",
        f.to_str().unwrap(),
        "--from",
        "192.168.10.11",
        "--to",
        "app/client-7d9f8b6c5d-x2k4p",
        "--port",
        "8080",
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "\
192.168.10.11 -> app/client-7d9f8b6c5d-x2k4p (10.244.1.15) TCP/8080
egress:  allowed
  node worker-1 (192.168.10.11) is not a pod NetworkPolicies select: no egress policy applies
ingress: allowed
  192.168.10.11 is the node of app/client-7d9f8b6c5d-x2k4p: always allowed
verdict: allowed (ingress)
"
    );
}

#[test]
fn json_output_is_one_object() {
    let f = fixture();
    let (code, out, _) = explain(&[
        "--k8s-snapshot",
        f.to_str().unwrap(),
        "--from",
        "app/client-7d9f8b6c5d-x2k4p",
        "--to",
        "db/oracle",
        "--port",
        "1521",
        "--protocol",
        "tcp",
        "--extra-ports",
        "1522",
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    assert_eq!(v["to"], "service db/oracle (10.96.12.34)");
    assert_eq!(v["backend"], "db/oracle-0");
    assert_eq!(v["destination"]["service"], "oracle");
    assert_eq!(v["egress"]["allowed"], false);
    assert_eq!(v["ingress"]["policies"][0]["rule"], 0);
    assert_eq!(v["policy"]["verdict"], "denied");
    assert_eq!(v["policy"]["direction"], "egress");
    assert_eq!(v["policy"]["policies"][0]["name"], "default-deny-egress");
    let fix = v["policy"]["suggested_fix"].as_str().unwrap();
    assert!(
        fix.contains("port: 1521") && fix.contains("port: 1522"),
        "{fix}"
    );
    // The fix lets 1521 through and nothing else; the oracle pod's ingress still refuses
    // 1522, which an egress-only fix cannot change.
    let check = &v["policy"]["fix_check"];
    assert_eq!(check["allows_flow"], true, "{check}");
    assert_eq!(check["newly_allowed"], serde_json::json!([]), "{check}");
    assert_eq!(
        check["still_denied"],
        serde_json::json!([{"from": "app/client-7d9f8b6c5d-x2k4p", "to": "db/oracle-0",
            "port": 1522, "protocol": "TCP"}]),
        "{check}"
    );
}

#[test]
fn bad_input_is_one_line_and_exit_2() {
    let f = fixture();
    let f = f.to_str().unwrap();
    let cases: [(&[&str], String); 4] = [
        (
            &[
                "--k8s-snapshot",
                f,
                "--from",
                "app/nope",
                "--to",
                "db/oracle-0",
                "--port",
                "1521",
            ],
            format!("droptrace: {f}: no pod app/nope in the snapshot\n"),
        ),
        (
            &[
                "--k8s-snapshot",
                f,
                "--from",
                "app/client-7d9f8b6c5d-x2k4p",
                "--to",
                "db/oracle-0",
                "--port",
                "15x",
            ],
            "droptrace: --port: \"15x\" is not a port (1-65535)\n".to_string(),
        ),
        (
            &[
                "--k8s-snapshot",
                f,
                "--from",
                "client",
                "--to",
                "db/oracle-0",
                "--port",
                "1521",
            ],
            "droptrace: \"client\" is neither NAMESPACE/POD nor an IP address\n".to_string(),
        ),
        (
            &[
                "--k8s-snapshot",
                "/nonexistent.json",
                "--from",
                "a/b",
                "--to",
                "c/d",
                "--port",
                "1",
            ],
            "droptrace: /nonexistent.json: No such file or directory (os error 2)\n".to_string(),
        ),
    ];
    for (args, want) in cases {
        let (code, out, err) = explain(args);
        assert_eq!(
            (code, out.as_str(), err.as_str()),
            (2, "", want.as_str()),
            "{args:?}"
        );
    }
}

#[test]
fn malformed_snapshot_is_one_line_and_exit_2() {
    let dir = std::env::temp_dir().join(format!("droptrace-explain-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.yaml");
    std::fs::write(
        &path,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: db}\n\
         spec:\n  podSelector:\n    matchExpressions: [{key: app, operator: Exists, values: [x]}]\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, _, err) = explain(&[
        "--k8s-snapshot",
        p,
        "--from",
        "a/b",
        "--to",
        "c/d",
        "--port",
        "1521",
    ]);
    assert_eq!(code, 2);
    assert_eq!(
        err,
        format!(
            "droptrace: {p}: document 1 (NetworkPolicy db/p): spec.podSelector.matchExpressions[0].values: \
             operator Exists takes no values\n"
        )
    );
}
