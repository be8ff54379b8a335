//! A suggested fix, proven: the cluster re-evaluated with the fix's policies applied. The flow
//! must be allowed, and every other connection the fix newly allows is listed, so a fix wider
//! than the flow (a selector that also picks the other replicas, a peer that is a whole
//! namespace, a port range) says so before anyone applies it.
//!
//! Only connections the fix's rules match can change from denied to allowed (adding policies
//! never removes a rule, and a direction allowed only by a new rule must match one of them),
//! so the candidates are: pods the fix selects x peers its rules match x the ports they name,
//! each evaluated before and after with the full evaluator.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;

use super::Cluster;
use crate::{
    enrich::{
        model::{Labels, Pod, Protocol},
        policy::{
            evaluate::{Direction, PolicySet, Side, Verdict, peers_match},
            rules::{CompiledPolicy, PeerMatch, PortSpec, Rule},
        },
    },
    event::{Admitted, FixCheck},
};

/// Entries listed; the rest is flagged `truncated`.
pub const MAX_LISTED: usize = 100;
/// Ports taken from one port range (an endPort rule wider than this is sampled from its start).
const MAX_RANGE: u32 = 1024;

/// The policies of a suggested fix (YAML documents); None if they do not parse.
pub fn parse_fix(yaml: &str) -> Option<Vec<CompiledPolicy>> {
    let mut out = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let np = NetworkPolicy::deserialize(doc).ok()?;
        out.push(CompiledPolicy::from_api(&np).ok()?);
    }
    Some(out)
}

/// Re-evaluates `cluster` with `fix` applied: whether `src` -> `dst` on `protocol` and
/// `ports[0]` is allowed (and the other `ports`, which the fix is also for), and what else
/// the fix newly allows.
pub fn check(
    cluster: &Cluster,
    src: &Side,
    dst: &Side,
    protocol: Protocol,
    ports: &[u16],
    fix: &str,
) -> Option<FixCheck> {
    check_with_range(cluster, src, dst, protocol, ports, None, fix)
}

/// [`check`] for a fix that is also for `range` (inclusive) of ports between `src` and `dst`
/// (the dynamic ports of an Oracle listener): those are the flow's own, not newly allowed.
pub fn check_with_range(
    cluster: &Cluster,
    src: &Side,
    dst: &Side,
    protocol: Protocol,
    ports: &[u16],
    range: Option<(u16, u16)>,
    fix: &str,
) -> Option<FixCheck> {
    let policies = parse_fix(fix)?;
    let before = cluster.policies();
    let after = After::new(before, &policies);
    let allows_flow = ports
        .first()
        .is_some_and(|p| after.evaluate(src, dst, protocol, *p).allowed());
    // The other ports the fix is for (an Oracle redirect port), still denied with it applied.
    let still_denied = ports
        .iter()
        .skip(1)
        .filter(|p| !after.evaluate(src, dst, protocol, **p).allowed())
        .map(|p| Admitted {
            from: src.to_string(),
            to: dst.to_string(),
            port: *p,
            protocol: protocol.as_str().to_string(),
        })
        .collect();
    let mut seen = BTreeSet::new();
    let mut newly = BTreeSet::new();
    for policy in &policies {
        for (direction, rules) in [
            (Direction::Egress, policy.egress.as_deref()),
            (Direction::Ingress, policy.ingress.as_deref()),
        ] {
            for rule in rules.unwrap_or_default() {
                for (a, b) in pairs(cluster, policy, direction, rule) {
                    for (proto, port) in rule_ports(rule, &b) {
                        let own = a.ip == src.ip
                            && b.ip == dst.ip
                            && proto == protocol
                            && (ports.contains(&port)
                                || range.is_some_and(|(lo, hi)| (lo..=hi).contains(&port)));
                        if own || same_pod(&a, &b) || !seen.insert((a.ip, b.ip, proto, port)) {
                            continue;
                        }
                        if !before.evaluate(&a, &b, proto, port).allowed()
                            && after.evaluate(&a, &b, proto, port).allowed()
                        {
                            newly.insert(Admitted {
                                from: a.to_string(),
                                to: b.to_string(),
                                port,
                                protocol: proto.as_str().to_string(),
                            });
                        }
                    }
                }
            }
        }
    }
    let truncated = newly.len() > MAX_LISTED;
    Some(FixCheck {
        allows_flow,
        newly_allowed: newly.into_iter().take(MAX_LISTED).collect(),
        truncated,
        still_denied,
    })
}

fn same_pod(a: &Side, b: &Side) -> bool {
    match (a.pod, b.pod) {
        (Some(x), Some(y)) => x.pod.namespace == y.pod.namespace && x.pod.name == y.pod.name,
        _ => a.ip == b.ip,
    }
}

/// A pod as a flow end, if policies can select it.
fn pod_side<'a>(cluster: &'a Cluster, pod: &'a Pod) -> Option<Side<'a>> {
    if pod.host_network {
        return None;
    }
    Some(Side::pod(*pod.ips.first()?, cluster.pod_ref(pod)))
}

/// (source, destination) of every connection `rule` of `policy` matches for `direction`.
fn pairs<'a>(
    cluster: &'a Cluster,
    policy: &CompiledPolicy,
    direction: Direction,
    rule: &Rule,
) -> Vec<(Side<'a>, Side<'a>)> {
    let subjects: Vec<Side> = cluster
        .pods_in(&policy.namespace)
        .filter(|p| policy.pod_selector.matches(&p.labels))
        .filter_map(|p| pod_side(cluster, p))
        .collect();
    if subjects.is_empty() {
        return Vec::new();
    }
    // Namespaces no peer of the rule can select are skipped whole.
    let blocks = rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|m| matches!(m, PeerMatch::Block { .. }));
    let mut peers: Vec<Side> = cluster
        .pod_namespaces()
        .filter(|ns| {
            blocks
                || rule.peers.iter().any(|m| match m {
                    PeerMatch::Pods {
                        namespaces: None, ..
                    } => *ns == policy.namespace,
                    PeerMatch::Pods {
                        namespaces: Some(sel),
                        ..
                    } => sel.matches(cluster.namespace_labels(ns).unwrap_or(&Labels::new())),
                    PeerMatch::Block { .. } => true,
                })
        })
        .flat_map(|ns| cluster.pods_in(ns))
        .filter_map(|p| pod_side(cluster, p))
        .filter(|s| peers_match(rule, s, &policy.namespace))
        .collect();
    // Single addresses an ipBlock names that are no selectable pod (a node, an outside host).
    let pod_ips: BTreeSet<IpAddr> = peers.iter().map(|s| s.ip).collect();
    for m in &rule.peers {
        if let PeerMatch::Block { cidr, except } = m
            && let Some(ip) = cidr.single_address()
            && !pod_ips.contains(&ip)
            && !except.iter().any(|e| e.contains(ip))
        {
            peers.push(cluster.side(ip, None));
        }
    }
    let mut out = Vec::with_capacity(subjects.len() * peers.len());
    for s in &subjects {
        for p in &peers {
            out.push(match direction {
                Direction::Egress => (*s, *p),
                Direction::Ingress => (*p, *s),
            });
        }
    }
    out
}

/// The concrete (protocol, port)s `rule` admits toward `dst`: its ports and ranges, named
/// ports resolved on the destination pod; a rule without ports, the destination's ports.
fn rule_ports(rule: &Rule, dst: &Side) -> Vec<(Protocol, u16)> {
    let served = || {
        dst.pod
            .map(|p| {
                p.pod
                    .ports
                    .iter()
                    .map(|cp| (cp.protocol, cp.port))
                    .collect()
            })
            .unwrap_or_default()
    };
    if rule.ports.is_empty() {
        return served();
    }
    let mut out = Vec::new();
    for pm in &rule.ports {
        match &pm.port {
            PortSpec::Range(lo, hi) => {
                let hi = (*hi).min((u32::from(*lo) + MAX_RANGE - 1).min(65535) as u16);
                out.extend((*lo..=hi).map(|p| (pm.protocol, p)));
            }
            PortSpec::Named(name) => {
                if let Some(p) = dst.pod {
                    out.extend(
                        p.pod
                            .ports
                            .iter()
                            .filter(|cp| {
                                cp.name.as_deref() == Some(name) && cp.protocol == pm.protocol
                            })
                            .map(|cp| (cp.protocol, cp.port)),
                    );
                }
            }
            PortSpec::All => out.extend(
                served()
                    .into_iter()
                    .filter(|(proto, _)| *proto == pm.protocol),
            ),
        }
    }
    out
}

/// The cluster's policies with a fix applied, without copying them all: a direction whose
/// subject pod is in a namespace the fix does not touch keeps its verdict; the others are
/// evaluated against that namespace's policies plus the fix's.
struct After<'a> {
    before: &'a PolicySet,
    touched: PolicySet,
    namespaces: BTreeSet<&'a str>,
}

impl<'a> After<'a> {
    fn new(before: &'a PolicySet, fix: &'a [CompiledPolicy]) -> Self {
        let namespaces: BTreeSet<&str> = fix.iter().map(|p| p.namespace.as_str()).collect();
        let mut touched = PolicySet::default();
        for p in before
            .iter()
            .filter(|p| namespaces.contains(p.namespace.as_str()))
        {
            touched.insert(p.clone());
        }
        for p in fix {
            touched.insert(p.clone());
        }
        Self {
            before,
            touched,
            namespaces,
        }
    }

    fn evaluate(&self, src: &Side, dst: &Side, protocol: Protocol, port: u16) -> Verdict {
        let touched = |s: &Side| {
            s.pod
                .is_some_and(|p| self.namespaces.contains(p.pod.namespace.as_str()))
        };
        if !touched(src) && !touched(dst) {
            return self.before.evaluate(src, dst, protocol, port);
        }
        let mut v = self.touched.evaluate(src, dst, protocol, port);
        if !touched(src) || !touched(dst) {
            let b = self.before.evaluate(src, dst, protocol, port);
            if !touched(src) {
                v.egress = b.egress;
            }
            if !touched(dst) {
                v.ingress = b.ingress;
            }
        }
        v
    }
}
