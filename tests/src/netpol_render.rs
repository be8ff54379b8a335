//! The tests' own, deliberately small NetworkPolicy -> iptables renderer: egress of the pods
//! in one network namespace, for the subset the scenarios use (podSelector / namespaceSelector
//! matchLabels peers, TCP ports). It plays the CNI: droptrace never sees these rules, only the
//! drops they cause.
use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::Value;

use crate::netns::Netns;

/// A pod of the scenario: namespace, labels, address.
pub struct PodInfo {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub ip: String,
}

fn matches(selector: Option<&BTreeMap<String, String>>, labels: &BTreeMap<String, String>) -> bool {
    selector.is_none_or(|s| s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// iptables rules (OUTPUT chain) enforcing the egress policies that select `pod`.
pub fn egress_rules(
    pod: &PodInfo,
    pods: &[PodInfo],
    policies: &[NetworkPolicy],
) -> Vec<Vec<String>> {
    let ns_labels =
        |ns: &str| BTreeMap::from([("kubernetes.io/metadata.name".to_string(), ns.to_string())]);
    let selecting: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(pod.namespace.as_str()))
        .filter(|p| {
            let spec = p.spec.as_ref().expect("spec");
            let egress_type = spec
                .policy_types
                .as_ref()
                .is_some_and(|t| t.iter().any(|t| t == "Egress"))
                || spec.egress.is_some();
            egress_type
                && matches(
                    spec.pod_selector
                        .as_ref()
                        .and_then(|s| s.match_labels.as_ref()),
                    &pod.labels,
                )
        })
        .collect();
    let mut rules = Vec::new();
    if selecting.is_empty() {
        return rules; // not isolated for egress
    }
    let rule = |args: &[&str]| args.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    rules.push(rule(&[
        "-A",
        "OUTPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "ESTABLISHED,RELATED",
        "-j",
        "ACCEPT",
    ]));
    rules.push(rule(&["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"]));
    for p in selecting {
        let ns = p.metadata.namespace.clone().unwrap_or_default();
        for r in p
            .spec
            .as_ref()
            .and_then(|s| s.egress.clone())
            .unwrap_or_default()
        {
            let peers: Vec<&PodInfo> = pods
                .iter()
                .filter(|peer| {
                    r.to.as_ref().is_none_or(|to| {
                        to.iter().any(|t| {
                            let ns_ok = match &t.namespace_selector {
                                Some(sel) => {
                                    matches(sel.match_labels.as_ref(), &ns_labels(&peer.namespace))
                                }
                                None => peer.namespace == ns,
                            };
                            let pod_ok = t
                                .pod_selector
                                .as_ref()
                                .is_none_or(|sel| matches(sel.match_labels.as_ref(), &peer.labels));
                            ns_ok && pod_ok
                        })
                    })
                })
                .collect();
            let ports: Vec<String> = r
                .ports
                .as_ref()
                .map(|ps| {
                    ps.iter()
                        .filter_map(|p| match &p.port {
                            Some(
                                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n),
                            ) => Some(n.to_string()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default();
            for peer in peers {
                if ports.is_empty() {
                    rules.push(rule(&[
                        "-A", "OUTPUT", "-p", "tcp", "-d", &peer.ip, "-j", "ACCEPT",
                    ]));
                }
                for port in &ports {
                    rules.push(rule(&[
                        "-A", "OUTPUT", "-p", "tcp", "-d", &peer.ip, "--dport", port, "-j",
                        "ACCEPT",
                    ]));
                }
            }
        }
    }
    rules.push(rule(&["-A", "OUTPUT", "-p", "tcp", "-j", "DROP"]));
    rules
}

/// Replaces the OUTPUT chain of `ns` with `rules`.
pub fn apply(ns: &Netns, rules: &[Vec<String>]) {
    ns.exec(&["iptables", "-F", "OUTPUT"]);
    for r in rules {
        let mut args = vec!["iptables"];
        args.extend(r.iter().map(String::as_str));
        ns.exec(&args);
    }
}

/// NetworkPolicies of a kubectl List.
pub fn policies_of(list: &Value) -> Vec<NetworkPolicy> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|i| i["kind"] == "NetworkPolicy")
        .map(|i| serde_json::from_value(i.clone()).expect("NetworkPolicy"))
        .collect()
}
