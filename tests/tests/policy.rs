//! NetworkPolicy attribution end to end: the namespaces play two pods of a cluster snapshot,
//! iptables plays the CNI enforcing the snapshot's policies, the real client stalls, and the
//! `stall` names the pods, the denying policy and a fix that, applied, lets the client in.
use std::{collections::BTreeMap, net::SocketAddr};

use droptrace_tests::{
    netns::{AppDb, Family},
    netpol_render::{PodInfo, apply, egress_rules, policies_of},
    oracle_client, scratch_dir,
    tns_listener::{Behavior, FakeListener},
    tracer::{Droptrace, at, str_at},
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::{Value, json};

fn pod(ns: &str, name: &str, uid: &str, labels: Value, ip: &str, port: Option<u16>) -> Value {
    let ports = port.map(|p| json!([{"name": "tns", "containerPort": p, "protocol": "TCP"}]));
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid, "labels": labels},
        "spec": {"nodeName": "worker-1", "containers": [{"name": "c", "image": "x", "ports": ports.unwrap_or(json!([]))}]},
        "status": {"phase": "Running", "hostIP": "192.168.77.11", "podIP": ip, "podIPs": [{"ip": ip}]}
    })
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

/// A snapshot of app/client at `app_ip` and db/oracle-0 (serving 1521) at `db_ip`, their
/// namespaces, and `policies`.
fn client_and_oracle<const N: usize>(app_ip: &str, db_ip: &str, policies: [Value; N]) -> Value {
    let mut items = vec![
        namespace("app"),
        namespace("db"),
        pod(
            "app",
            "client",
            "11111111-2222-3333-4444-555555555555",
            json!({"app": "client"}),
            app_ip,
            None,
        ),
        pod(
            "db",
            "oracle-0",
            "66666666-7777-8888-9999-000000000000",
            json!({"app": "oracle"}),
            db_ip,
            Some(1521),
        ),
    ];
    items.extend(policies);
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

/// db's `name`: oracle pods admit the app namespace on 1521 only.
fn db_admits_app_on_1521(name: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": "db"},
           "spec": {"podSelector": {"matchLabels": {"app": "oracle"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "app"}}}],
                                 "ports": [{"port": 1521}]}]}})
}

#[test]
fn default_deny_egress_is_named_and_its_fix_lets_the_client_in() {
    let topo = AppDb::new(Family::V4);
    let (app_ip, db_ip) = (topo.app_ip.to_string(), topo.db_ip.to_string());
    let snapshot = client_and_oracle(
        &app_ip,
        &db_ip,
        [
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                   "metadata": {"name": "default-deny-egress", "namespace": "app"},
                   "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}),
            db_admits_app_on_1521("allow-app-to-oracle"),
        ],
    );
    let file = scratch_dir().join(format!("snapshot-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec_pretty(&snapshot).unwrap()).unwrap();

    let pods = [
        PodInfo {
            namespace: "app".into(),
            labels: BTreeMap::from([("app".into(), "client".into())]),
            ip: app_ip.clone(),
        },
        PodInfo {
            namespace: "db".into(),
            labels: BTreeMap::from([("app".into(), "oracle".into())]),
            ip: db_ip.clone(),
        },
    ];
    let mut policies = policies_of(&snapshot);
    apply(&topo.app, &egress_rules(&pods[0], &pods, &policies));
    // A listener that answers (REFUSE 12514): reaching it proves the path is open.
    let _listener = FakeListener::from_listener(
        topo.db.tcp_listener(SocketAddr::new(topo.db_ip, 1521)),
        Behavior::Refuse { err: 12514 },
    )
    .unwrap();

    let tracer = Droptrace::start(&["--k8s-snapshot", file.to_str().unwrap()]);
    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, "ORCLPDB1", 3.0);
    assert!(
        out.error.contains("timed out"),
        "blocked by default-deny egress: {out:?}"
    );
    let s = tracer
        .wait_for(droptrace_tests::tracer::EVENT_WAIT, |v| {
            str_at(v, "kind") == "stall"
                && str_at(v, "flow.dst_ip") == db_ip
                && str_at(v, "attempt.outcome") == "timeout"
        })
        .unwrap_or_else(|| panic!("no stall: {:#?}", tracer.events()));
    tracer.stop();
    println!("stall: {s}");
    assert_eq!(str_at(&s, "source.namespace"), "app");
    assert_eq!(str_at(&s, "source.pod"), "client");
    assert_eq!(str_at(&s, "destination.namespace"), "db");
    assert_eq!(str_at(&s, "destination.pod"), "oracle-0");
    assert_eq!(str_at(&s, "policy.verdict"), "denied");
    assert_eq!(str_at(&s, "policy.direction"), "egress");
    let named: Vec<(String, String)> = at(&s, "policy.policies")
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (str_at(p, "namespace").into(), str_at(p, "name").into()))
        .collect();
    assert_eq!(
        named,
        [("app".to_string(), "default-deny-egress".to_string())]
    );
    let fix = str_at(&s, "policy.suggested_fix");
    assert!(fix.contains("kind: NetworkPolicy"), "{fix}");

    // Apply the suggested fix the way the CNI would, and the same client gets through.
    let fix: NetworkPolicy = serde_yaml::from_str(fix).expect("the fix is a NetworkPolicy");
    policies.push(fix);
    apply(&topo.app, &egress_rules(&pods[0], &pods, &policies));
    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, "ORCLPDB1", 3.0);
    assert!(
        out.error.contains("DPY-6001"),
        "after the fix the listener answers: {out:?}"
    );
    let _ = std::fs::remove_file(&file);
}

#[test]
fn pod_flag_keeps_only_that_pods_flows() {
    let mine = AppDb::new(Family::V4);
    let other = AppDb::new(Family::V4);
    mine.iptables_drop_ingress(1521);
    other.iptables_drop_ingress(1521);
    let snapshot = json!({
        "apiVersion": "v1", "kind": "List",
        "items": [
            namespace("app"),
            pod("app", "client", "11111111-2222-3333-4444-555555555555", json!({"app": "client"}), &mine.app_ip.to_string(), None),
        ]
    });
    let file = scratch_dir().join(format!("snapshot-pod-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_vec(&snapshot).unwrap()).unwrap();
    let tracer = Droptrace::start(&[
        "--for",
        "30s",
        "--pod",
        "app/client",
        "--k8s-snapshot",
        file.to_str().unwrap(),
    ]);
    let a = oracle_client::Connect::start(&mine.app, mine.db_ip, 1521, "ORCLPDB1", 2.0);
    let b = oracle_client::Connect::start(&other.app, other.db_ip, 1521, "ORCLPDB1", 2.0);
    a.wait();
    b.wait();
    tracer
        .wait_for(droptrace_tests::tracer::EVENT_WAIT, |v| {
            str_at(v, "kind") == "stall" && str_at(v, "flow.src_ip") == mine.app_ip.to_string()
        })
        .expect("the pod's stall");
    let fin = tracer.stop();
    let theirs = other.app_ip.to_string();
    assert!(
        !fin.events
            .iter()
            .any(|v| str_at(v, "flow.src_ip") == theirs || str_at(v, "flow.dst_ip") == theirs),
        "another pod's flows are filtered out"
    );
    assert!(
        fin.events
            .iter()
            .any(|v| str_at(v, "kind") == "drop" && str_at(v, "source.pod") == "client")
    );
    let _ = std::fs::remove_file(&file);
}

/// The dynamic-port scenario: a listener on db's 1521 that sends each session to another port
/// (a Windows database without USE_SHARED_SOCKET), each of them dropped (the policy admits
/// the listener port only); three sqlplus sessions with droptrace recording `--emit connects`.
struct DynamicPorts {
    topo: AppDb,
    snapshot: std::path::PathBuf,
    /// The ports in the order the listener hands them out.
    ports: [u16; 3],
    /// The final stall of the third session.
    stall: Value,
    events: Vec<Value>,
    _listeners: Vec<FakeListener>,
}

impl DynamicPorts {
    fn run(tag: &str) -> Self {
        let topo = AppDb::new(Family::V4);
        let (app_ip, db_ip) = (topo.app_ip.to_string(), topo.db_ip.to_string());
        let snapshot = client_and_oracle(
            &app_ip,
            &db_ip,
            [db_admits_app_on_1521("oracle-listener-only")],
        );
        let file = scratch_dir().join(format!("snapshot-{tag}-{}.json", std::process::id()));
        std::fs::write(&file, serde_json::to_vec_pretty(&snapshot).unwrap()).unwrap();
        let ports = [40311, 40123, 40200];
        let mut listeners = vec![
            FakeListener::from_listener(
                topo.db.tcp_listener(SocketAddr::new(topo.db_ip, 1521)),
                Behavior::RedirectEach {
                    host: db_ip.clone(),
                    ports: ports.to_vec(),
                },
            )
            .unwrap(),
        ];
        for p in ports {
            // The dispatcher answers if reached; the iptables DROP (the CNI enforcing
            // oracle-listener-only) makes sure it is not.
            listeners.push(
                FakeListener::from_listener(
                    topo.db.tcp_listener(SocketAddr::new(topo.db_ip, p)),
                    Behavior::AcceptAndHang,
                )
                .unwrap(),
            );
            topo.iptables_drop_ingress(p);
        }
        let tracer = Droptrace::start(&[
            "--k8s-snapshot",
            file.to_str().unwrap(),
            "--emit",
            "connects",
        ]);
        for p in ports {
            let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, "ORCLPDB1", 3.0);
            assert!(out.error.contains("timed out"), "leg to {p}: {out:?}");
        }
        let last = ports[2];
        // Other tests' tracers and topologies run at the same time: this one's by address.
        let stall = tracer
            .wait_for(droptrace_tests::tracer::EVENT_WAIT, |v| {
                str_at(v, "kind") == "stall"
                    && str_at(v, "flow.dst_ip") == db_ip
                    && at(v, "flow.dst_port") == last
                    && str_at(v, "attempt.outcome") == "timeout"
            })
            .unwrap_or_else(|| panic!("no stall on {last}: {:#?}", tracer.events()));
        let fin = tracer.stop();
        Self {
            topo,
            snapshot: file,
            ports,
            stall,
            events: fin.events,
            _listeners: listeners,
        }
    }
}

impl Drop for DynamicPorts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.snapshot);
    }
}

/// Part 4 of issue 17: the third session's stall lists every port the listener used, names
/// the Oracle-side remedy, and its fix covers the ports with one port + endPort range that
/// fix_check proves lets the flow through and nothing else.
#[test]
fn listener_handing_out_dynamic_ports_gets_a_port_range_fix_and_the_oracle_remedy() {
    let d = DynamicPorts::run("dynamic");
    let s = &d.stall;
    println!("stall: {s}");
    let db = d.topo.db_ip.to_string();
    let mut sorted = d.ports;
    sorted.sort_unstable();
    let seen: Vec<u64> = at(s, "oracle.redirect_ports")
        .as_array()
        .unwrap_or_else(|| panic!("{s}"))
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert_eq!(seen, sorted.map(u64::from), "{s}");
    assert_eq!(at(s, "oracle.listener.port"), 1521);
    let remedy = str_at(s, "oracle.remedy");
    assert!(
        remedy.starts_with(&format!(
            "listener {db}:1521 redirected clients to 3 different ports on {db} (40123, 40200, 40311)"
        )) && remedy.contains("USE_SHARED_SOCKET=TRUE")
            && remedy.contains("DISPATCHERS=\"(ADDRESS=(PROTOCOL=TCP)(PORT=40123))\""),
        "{remedy}"
    );
    assert_eq!(str_at(s, "policy.verdict"), "denied");
    assert_eq!(str_at(s, "policy.direction"), "ingress");
    let fix = str_at(s, "policy.suggested_fix");
    println!("suggested fix:\n{fix}");
    assert!(
        fix.contains("redirected clients to ports 40123, 40200, 40311 (seen)"),
        "{fix}"
    );
    let np: NetworkPolicy = serde_yaml::from_str(fix).expect("the fix is a NetworkPolicy");
    let rule = &np.spec.as_ref().unwrap().ingress.as_ref().unwrap()[0];
    let ports: Vec<(String, Option<i32>)> = rule
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .map(|p| {
            let port = match p.port.as_ref().unwrap() {
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n) => n.to_string(),
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(s) => s.clone(),
            };
            (port, p.end_port)
        })
        .collect();
    assert_eq!(
        ports,
        [
            ("1521".to_string(), None),
            ("40123".to_string(), Some(40311))
        ],
        "{fix}"
    );
    assert_eq!(at(s, "policy.fix_check.allows_flow"), true, "{s}");
    assert_eq!(
        at(s, "policy.fix_check.newly_allowed")
            .as_array()
            .map(Vec::len),
        Some(0),
        "{s}"
    );
    // The earlier legs: the first saw one port (nothing dynamic yet), the second two.
    let first = d
        .events
        .iter()
        .find(|v| {
            str_at(v, "kind") == "stall"
                && str_at(v, "flow.dst_ip") == db
                && at(v, "flow.dst_port") == d.ports[0]
                && str_at(v, "attempt.outcome") == "timeout"
        })
        .expect("first leg's stall");
    assert!(at(first, "oracle.redirect_ports").is_null(), "{first}");
}

/// Part 6 of issue 17 on a real recording: the stream droptrace wrote with `--emit connects`
/// (three listener sessions that connected, three legs that stalled) checked against two
/// changes. Tightening the listener policy breaks the sessions that connected (exit 3); the
/// stall's own suggested fix unblocks the three stalled legs and breaks nothing (exit 0).
#[test]
fn explain_apply_on_a_recorded_stream_names_the_sessions_a_change_breaks_or_unblocks() {
    let d = DynamicPorts::run("apply");
    let dir = scratch_dir();
    let pid = std::process::id();
    let observed = dir.join(format!("observed-{pid}.ndjson"));
    let lines: Vec<String> = d.events.iter().map(Value::to_string).collect();
    std::fs::write(&observed, lines.join("\n") + "\n").unwrap();
    let connects = d
        .events
        .iter()
        .filter(|v| {
            str_at(v, "kind") == "connect"
                && str_at(v, "flow.dst_ip") == d.topo.db_ip.to_string()
                && at(v, "flow.dst_port") == 1521
        })
        .count();
    assert_eq!(
        connects, 3,
        "the listener sessions are recorded: {:#?}",
        d.events
    );
    let tighten = dir.join(format!("tighten-{pid}.yaml"));
    std::fs::write(
        &tighten,
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: oracle-listener-only, namespace: db}\n\
         spec:\n  podSelector: {matchLabels: {app: oracle}}\n  policyTypes: [Ingress]\n  ingress:\n  \
         - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: reporting}}}]\n    ports: [{port: 1521}]\n",
    )
    .unwrap();
    let fix = dir.join(format!("fix-{pid}.yaml"));
    std::fs::write(&fix, str_at(&d.stall, "policy.suggested_fix")).unwrap();
    let explain = |change: &std::path::Path| {
        let out = std::process::Command::new(droptrace_tests::tracer::binary())
            .args(["explain", "--k8s-snapshot"])
            .arg(&d.snapshot)
            .arg("--apply")
            .arg(change)
            .arg("--flows")
            .arg(&observed)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("{text}{}", String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let (app, db) = (d.topo.app_ip, d.topo.db_ip);
    let (code, out) = explain(&tighten);
    assert_eq!(code, Some(3), "{out}");
    assert!(
        out.starts_with(&format!(
            "BREAKS    app/client ({app}) -> db/oracle-0 ({db}) TCP/1521  (observed: established x3)"
        )),
        "{out}"
    );
    assert!(out.contains("1 breaking, 0 unblocked"), "{out}");
    let (code, out) = explain(&fix);
    assert_eq!(code, Some(0), "{out}");
    for p in d.ports {
        assert!(
            out.contains(&format!(
                "UNBLOCKS  app/client ({app}) -> db/oracle-0 ({db}) TCP/{p}  (observed: "
            )),
            "{p}: {out}"
        );
    }
    assert!(out.contains("0 breaking, 3 unblocked"), "{out}");
    for f in [observed, tighten, fix] {
        let _ = std::fs::remove_file(f);
    }
}
