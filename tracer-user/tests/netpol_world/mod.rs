//! The e2e netpol / cyclonus world: namespaces x, y, z (label ns=<name>), pods a, b, c in
//! each (label pod=<name>) serving 80 and 81 on TCP, UDP and SCTP under names like
//! `serve-80-tcp`. Pods a run on node n1 (192.168.0.1), b and c on n2 (192.168.0.2).
//! Pod addresses: x 10.0.1.1-3, y 10.0.2.1-3, z 10.0.3.1-3 (a, b, c).
#![allow(dead_code)]

use std::net::IpAddr;

use droptrace::enrich::k8s::{
    Cluster, DEFAULT_IP_HISTORY, FlowQuery, Object, evaluate_flow,
    snapshot::{Mode, Snapshot},
};
use droptrace::enrich::model::{Protocol, now};
use serde_json::{Value, json};

pub(crate) const PODS: [&str; 9] = [
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];

pub(crate) fn pod_ip(pod: &str) -> IpAddr {
    let (ns, name) = pod.split_once('/').unwrap();
    let n = match ns {
        "x" => 1,
        "y" => 2,
        _ => 3,
    };
    let h = match name {
        "a" => 1,
        "b" => 2,
        _ => 3,
    };
    format!("10.0.{n}.{h}").parse().unwrap()
}

pub(crate) fn namespace_json(ns: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}})
}

pub(crate) fn pod_json(pod: &str, labels: Value) -> Value {
    let (ns, name) = pod.split_once('/').unwrap();
    let node = if name == "a" { "n1" } else { "n2" };
    let host_ip = if name == "a" {
        "192.168.0.1"
    } else {
        "192.168.0.2"
    };
    let mut ports = Vec::new();
    for port in [80, 81] {
        for proto in ["TCP", "UDP", "SCTP"] {
            ports.push(json!({
                "name": format!("serve-{port}-{}", proto.to_lowercase()),
                "containerPort": port,
                "protocol": proto,
            }));
        }
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": uid(pod), "labels": labels,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"nodeName": node, "containers": [{"name": "agnhost", "image": "agnhost", "ports": ports}]},
        "status": {"phase": "Running", "hostIP": host_ip, "podIP": pod_ip(pod).to_string(),
                   "podIPs": [{"ip": pod_ip(pod).to_string()}]},
    })
}

fn uid(pod: &str) -> String {
    let ip = pod_ip(pod).to_string().replace('.', "");
    format!("00000000-0000-4000-8000-{ip:0>12}")
}

/// The world plus `policies` (YAML manifests, may be empty), loaded as a snapshot would be.
pub(crate) fn world(policies: &str) -> Cluster {
    let mut docs: Vec<String> = Vec::new();
    for ns in ["x", "y", "z"] {
        docs.push(namespace_json(ns, json!({"ns": ns})).to_string());
    }
    for pod in PODS {
        let name = pod.split_once('/').unwrap().1;
        docs.push(pod_json(pod, json!({"pod": name})).to_string());
    }
    docs.push(policies.to_string());
    let text = docs.join("\n---\n");
    Snapshot::parse(&text, Mode::Strict)
        .unwrap_or_else(|e| panic!("world: {e}"))
        .into_cluster(now(), DEFAULT_IP_HISTORY)
}

pub(crate) fn apply_json(cluster: &mut Cluster, value: Value) {
    let object = Object::try_from(value).unwrap_or_else(|e| panic!("apply_json: {e}"));
    cluster.apply(&object, now()).unwrap();
}

/// A connection now.
pub(crate) fn query(src: IpAddr, dst: IpAddr, protocol: Protocol, port: u16) -> FlowQuery {
    FlowQuery {
        src,
        dst,
        protocol,
        port,
        at: None,
    }
}

pub(crate) fn allowed(
    cluster: &Cluster,
    from: IpAddr,
    to: IpAddr,
    protocol: Protocol,
    port: u16,
) -> bool {
    evaluate_flow(cluster, &query(from, to, protocol, port), &[])
        .verdict
        .allowed()
}

/// Compare every pod pair with a hand-written table: rows are sources, columns destinations,
/// `.` allowed, `X` denied.
#[track_caller]
pub(crate) fn assert_table(cluster: &Cluster, protocol: Protocol, port: u16, expected: &str) {
    let mut lines = expected.lines().map(str::trim).filter(|l| !l.is_empty());
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(header, PODS, "table header");
    let mut wrong = Vec::new();
    let mut actual_table = format!("     {}\n", PODS.join(" "));
    for (row, from) in lines.zip(PODS) {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells.len(), 10, "row {row:?}");
        assert_eq!(cells[0], from, "row order");
        actual_table.push_str(&format!("{from:<4}"));
        for (to, want) in PODS.iter().zip(&cells[1..]) {
            let got = allowed(cluster, pod_ip(from), pod_ip(to), protocol, port);
            actual_table.push_str(if got { "   ." } else { "   X" });
            let want = match *want {
                "." => true,
                "X" => false,
                other => panic!("bad cell {other:?}"),
            };
            if got != want {
                wrong.push(format!(
                    "{from} -> {to}: expected {}",
                    if want { "allowed" } else { "denied" }
                ));
            }
        }
        actual_table.push('\n');
    }
    assert!(
        wrong.is_empty(),
        "{protocol}/{port}: {} wrong:\n{}\nactual:\n{actual_table}",
        wrong.len(),
        wrong.join("\n")
    );
}
