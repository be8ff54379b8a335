//! NetworkPolicy attribution end to end: the namespaces play two pods of a cluster snapshot,
//! iptables plays the CNI enforcing the snapshot's policies, the real client stalls, and the
//! `stall` names the pods, the denying policy and a fix that, applied, lets the client in.
use std::{collections::BTreeMap, net::SocketAddr, time::Duration};

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

#[test]
fn default_deny_egress_is_named_and_its_fix_lets_the_client_in() {
    let topo = AppDb::new(Family::V4);
    let (app_ip, db_ip) = (topo.app_ip.to_string(), topo.db_ip.to_string());
    let snapshot = json!({
        "apiVersion": "v1", "kind": "List",
        "items": [
            namespace("app"), namespace("db"),
            pod("app", "client", "11111111-2222-3333-4444-555555555555", json!({"app": "client"}), &app_ip, None),
            pod("db", "oracle-0", "66666666-7777-8888-9999-000000000000", json!({"app": "oracle"}), &db_ip, Some(1521)),
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "default-deny-egress", "namespace": "app"},
             "spec": {"podSelector": {}, "policyTypes": ["Egress"]}},
            {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": "allow-app-to-oracle", "namespace": "db"},
             "spec": {"podSelector": {"matchLabels": {"app": "oracle"}}, "policyTypes": ["Ingress"],
                      "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "app"}}}],
                                   "ports": [{"port": 1521}]}]}},
        ]
    });
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
        .wait_for(Duration::from_secs(8), |v| {
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
        .wait_for(Duration::from_secs(8), |v| {
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
