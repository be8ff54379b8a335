//! A synthetic cluster for benchmarks: 10k pods in 100 namespaces, 2k policies (20 per
//! namespace: a default deny, cross-namespace allows, ipBlocks, named ports,
//! matchExpressions). Shared by the benches and `examples/synthetic_snapshot.rs`.
#![allow(dead_code)]
use std::net::IpAddr;

use serde_json::{Value, json};

pub(crate) const NAMESPACES: usize = 100;
pub(crate) const PODS_PER_NAMESPACE: usize = 100;
pub(crate) const POLICIES_PER_NAMESPACE: usize = 20;

pub(crate) fn pod_ip(ns: usize, pod: usize) -> IpAddr {
    format!("10.{}.{}.{}", 100 + ns / 100, ns % 100, pod + 1)
        .parse()
        .unwrap()
}

/// The objects as Kubernetes JSON, in `kubectl get -o json` shape.
pub(crate) fn values() -> Vec<Value> {
    let mut out = Vec::new();
    let typed = |v: Value| v;
    for n in 0..NAMESPACES {
        let ns = format!("ns-{n}");
        out.push(typed(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": ns, "labels": {"team": format!("team-{}", n % 10), "env": if n % 2 == 0 { "prod" } else { "dev" }}}})));
        for p in 0..PODS_PER_NAMESPACE {
            out.push(typed(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("app-{}-{p}", p % 10), "namespace": ns,
                             "uid": format!("00000000-0000-4000-8000-{:06}{:06}", n, p),
                             "labels": {"app": format!("app-{}", p % 10), "tier": if p % 3 == 0 { "db" } else { "web" }}},
                "spec": {"nodeName": format!("node-{}", p % 20), "containers": [{"name": "c",
                         "ports": [{"name": "sql", "containerPort": 1521}, {"name": "http", "containerPort": 8080}]}]},
                "status": {"podIP": pod_ip(n, p).to_string(), "hostIP": format!("192.168.1.{}", p % 20 + 1)},
            })));
        }
        out.push(typed(
            json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "default-deny", "namespace": ns},
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}),
        ));
        for i in 1..POLICIES_PER_NAMESPACE {
            let spec = match i % 4 {
                0 => json!({"podSelector": {"matchLabels": {"app": format!("app-{}", i % 10)}},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("team-{}", i % 10)}},
                                           "podSelector": {"matchLabels": {"tier": "web"}}}],
                                 "ports": [{"port": "sql"}]}]}),
                1 => {
                    json!({"podSelector": {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["db"]}]},
                    "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": [format!("10.100.{i}.0/24")]}}],
                                 "ports": [{"port": 1521, "endPort": 1530}]}]})
                }
                2 => json!({"podSelector": {"matchLabels": {"app": format!("app-{}", i % 10)}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]}}],
                                "ports": [{"port": 8080, "protocol": "TCP"}]}]}),
                _ => json!({"podSelector": {"matchLabels": {"tier": "web"}},
                    "policyTypes": ["Egress"],
                    "egress": [{"to": [{"podSelector": {"matchLabels": {"app": format!("app-{}", i % 10)}}},
                                       {"podSelector": {"matchLabels": {"tier": "web"}}}],
                                "ports": [{"port": "http"}, {"port": "sql"}]}]}),
            };
            out.push(typed(
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                "metadata": {"name": format!("p-{i}"), "namespace": ns}, "spec": spec}),
            ));
        }
    }
    out
}

/// The same, as the snapshot a `droptrace run --k8s-snapshot` reads.
pub(crate) fn list() -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": values()})
}
