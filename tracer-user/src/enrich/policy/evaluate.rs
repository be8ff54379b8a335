//! The verdict for one connection: the source pod's egress and the destination pod's ingress
//! must both allow it. Pure: the caller resolves addresses to pods ([`Side`]).
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
};

use serde::Serialize;

use super::rules::{CompiledPolicy, PeerMatch, PortSpec, Rule};
use crate::{
    enrich::model::{Labels, ObjectKey, Pod, Protocol},
    event::{self, PolicyRef},
};

/// Near misses named in a denial; more would bury the explanation.
const MAX_NEAR_MISSES: usize = 3;

/// A pod that policies can select (not hostNetwork), with what selectors look at.
#[derive(Debug, Clone, Copy)]
pub struct PodRef<'a> {
    pub pod: &'a Pod,
    pub namespace_labels: &'a Labels,
    /// Addresses of the node the pod runs on: traffic with them is always allowed.
    pub node_ips: &'a [IpAddr],
}

/// One end of a flow.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub ip: IpAddr,
    /// Set when the address is a selectable pod's.
    pub pod: Option<PodRef<'a>>,
    /// Set when the address is a node's (hostNetwork pods included).
    pub node: Option<&'a str>,
}

impl<'a> Side<'a> {
    pub fn pod(ip: IpAddr, pod: PodRef<'a>) -> Self {
        Self {
            ip,
            pod: Some(pod),
            node: None,
        }
    }

    pub fn address(ip: IpAddr) -> Self {
        Self {
            ip,
            pod: None,
            node: None,
        }
    }
}

impl fmt::Display for Side<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.pod, self.node) {
            (Some(p), _) => write!(f, "{}/{}", p.pod.namespace, p.pod.name),
            (None, Some(node)) => write!(f, "node {node} ({})", self.ip),
            (None, None) => write!(f, "{}", self.ip),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Egress,
    Ingress,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Egress => "egress",
            Direction::Ingress => "ingress",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not an address policies select (outside the cluster, a node, a hostNetwork pod).
    NotSelectable,
    /// A pod reaching itself never leaves its network namespace.
    Loopback,
    /// Traffic between a pod and its own node is always allowed.
    OwnNode,
    /// No policy selects the pod for this direction.
    NotIsolated,
    /// A rule of a policy selecting the pod matches.
    AllowedByRule,
    /// Policies isolate the pod and none of their rules matches.
    NoRuleMatches,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DirectionVerdict {
    pub direction: Direction,
    pub allowed: bool,
    pub reason: Reason,
    /// The allowing policies (with the first matching rule), or the isolating ones.
    pub policies: Vec<PolicyRef>,
    pub explanation: String,
    /// Rules that match the peer but not the port, or the port but not the peer.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub near_misses: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    pub protocol: Protocol,
    pub port: u16,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
}

impl Verdict {
    pub fn allowed(&self) -> bool {
        self.egress.allowed && self.ingress.allowed
    }

    /// The event's `policy` section (without `suggested_fix`). Denied when either direction
    /// denies, naming egress first; allowed verdicts name ingress unless only egress rules
    /// were involved.
    pub fn to_event(&self) -> event::Policy {
        let denied: Vec<&DirectionVerdict> = [&self.egress, &self.ingress]
            .into_iter()
            .filter(|d| !d.allowed)
            .collect();
        if let Some(first) = denied.first() {
            let mut explanation = Vec::new();
            for d in &denied {
                explanation.push(d.explanation.clone());
                if !d.near_misses.is_empty() {
                    explanation.push(format!("closest: {}", d.near_misses.join(", ")));
                }
            }
            return event::Policy {
                verdict: "denied".into(),
                direction: first.direction.as_str().into(),
                policies: denied
                    .iter()
                    .flat_map(|d| d.policies.iter().cloned())
                    .collect(),
                explanation: explanation.join("; "),
                suggested_fix: None,
                fix_check: None,
            };
        }
        let direction = if self.egress.reason == Reason::AllowedByRule
            && self.ingress.reason != Reason::AllowedByRule
        {
            Direction::Egress
        } else {
            Direction::Ingress
        };
        event::Policy {
            verdict: "allowed".into(),
            direction: direction.as_str().into(),
            policies: self
                .egress
                .policies
                .iter()
                .chain(&self.ingress.policies)
                .cloned()
                .collect(),
            explanation: format!("{}; {}", self.egress.explanation, self.ingress.explanation),
            suggested_fix: None,
            fix_check: None,
        }
    }
}

/// NetworkPolicies indexed by namespace: a pod is only ever selected by its own namespace's.
#[derive(Debug, Clone, Default)]
pub struct PolicySet {
    by_namespace: HashMap<String, BTreeMap<String, CompiledPolicy>>,
    len: usize,
}

impl PolicySet {
    pub fn insert(&mut self, policy: CompiledPolicy) {
        let ns = self
            .by_namespace
            .entry(policy.namespace.clone())
            .or_default();
        if ns.insert(policy.name.clone(), policy).is_none() {
            self.len += 1;
        }
    }

    pub fn remove(&mut self, key: &ObjectKey) -> Option<CompiledPolicy> {
        let ns = self.by_namespace.get_mut(&key.namespace)?;
        let removed = ns.remove(&key.name)?;
        if ns.is_empty() {
            self.by_namespace.remove(&key.namespace);
        }
        self.len -= 1;
        Some(removed)
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&CompiledPolicy> {
        self.by_namespace.get(&key.namespace)?.get(&key.name)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = &CompiledPolicy> {
        self.by_namespace.values().flat_map(|m| m.values())
    }

    pub fn keys(&self) -> Vec<ObjectKey> {
        self.iter().map(CompiledPolicy::key).collect()
    }

    /// Whether some policy of `namespace` selects a pod with `labels` for `direction`.
    pub fn isolates(&self, namespace: &str, labels: &Labels, direction: Direction) -> bool {
        self.by_namespace.get(namespace).is_some_and(|m| {
            m.values().any(|p| {
                let rules = match direction {
                    Direction::Egress => &p.egress,
                    Direction::Ingress => &p.ingress,
                };
                rules.is_some() && p.pod_selector.matches(labels)
            })
        })
    }

    /// The verdict for a connection from `src` to `dst` on `protocol`/`port` (destination port).
    pub fn evaluate(&self, src: &Side, dst: &Side, protocol: Protocol, port: u16) -> Verdict {
        let flow = FlowCtx {
            src,
            dst,
            protocol,
            port,
        };
        Verdict {
            protocol,
            port,
            egress: self.direction(&flow, Direction::Egress),
            ingress: self.direction(&flow, Direction::Ingress),
        }
    }

    fn direction(&self, flow: &FlowCtx, direction: Direction) -> DirectionVerdict {
        let (subject, peer) = match direction {
            Direction::Egress => (flow.src, flow.dst),
            Direction::Ingress => (flow.dst, flow.src),
        };
        let verdict = |allowed, reason, explanation: String| DirectionVerdict {
            direction,
            allowed,
            reason,
            policies: Vec::new(),
            explanation,
            near_misses: Vec::new(),
        };
        let dir = direction.as_str();
        let Some(pod) = subject.pod else {
            return verdict(
                true,
                Reason::NotSelectable,
                format!("{subject} is not a pod NetworkPolicies select: no {dir} policy applies"),
            );
        };
        if let Some(p) = peer.pod
            && p.pod.namespace == pod.pod.namespace
            && p.pod.name == pod.pod.name
        {
            return verdict(
                true,
                Reason::Loopback,
                format!("{subject} reaches itself: no policy applies"),
            );
        }
        if pod.node_ips.contains(&peer.ip) {
            return verdict(
                true,
                Reason::OwnNode,
                format!("{} is the node of {subject}: always allowed", peer.ip),
            );
        }
        let mut allowers = Vec::new();
        let mut isolators = Vec::new();
        let mut near_misses = Vec::new();
        for policy in self
            .by_namespace
            .get(&pod.pod.namespace)
            .into_iter()
            .flat_map(|m| m.values())
        {
            let rules = match direction {
                Direction::Egress => &policy.egress,
                Direction::Ingress => &policy.ingress,
            };
            let Some(rules) = rules else { continue };
            if !policy.pod_selector.matches(&pod.pod.labels) {
                continue;
            }
            let mut allowing = None;
            for (i, rule) in rules.iter().enumerate() {
                let peer_ok = peers_match(rule, peer, &policy.namespace);
                let port_ok = ports_match(rule, flow);
                if peer_ok && port_ok {
                    allowing = Some(i);
                    break;
                }
                if near_misses.len() < MAX_NEAR_MISSES && (peer_ok || port_ok) {
                    let miss = if peer_ok {
                        format!(
                            "{}/{} {dir} rule {i} matches {peer} but not {}",
                            policy.namespace,
                            policy.name,
                            flow.what()
                        )
                    } else {
                        let prep = if direction == Direction::Egress {
                            "to"
                        } else {
                            "from"
                        };
                        format!(
                            "{}/{} {dir} rule {i} allows {} but not {prep} {peer}",
                            policy.namespace,
                            policy.name,
                            flow.what()
                        )
                    };
                    near_misses.push(miss);
                }
            }
            let r = PolicyRef {
                namespace: policy.namespace.clone(),
                name: policy.name.clone(),
                rule: allowing,
            };
            match allowing {
                Some(_) => allowers.push(r),
                None => isolators.push(r),
            }
        }
        if !allowers.is_empty() {
            let names: Vec<String> = allowers
                .iter()
                .map(|p| {
                    format!(
                        "{}/{} rule {}",
                        p.namespace,
                        p.name,
                        p.rule.unwrap_or_default()
                    )
                })
                .collect();
            let mut v = verdict(
                true,
                Reason::AllowedByRule,
                format!("{dir} of {subject} allowed by {}", names.join(", ")),
            );
            v.policies = allowers;
            return v;
        }
        if isolators.is_empty() {
            return verdict(
                true,
                Reason::NotIsolated,
                format!("no policy selects {subject} for {dir}"),
            );
        }
        let names: Vec<String> = isolators
            .iter()
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let mut v = verdict(
            false,
            Reason::NoRuleMatches,
            format!(
                "no {dir} rule of {} allows {} to {} from {}",
                names.join(", "),
                flow.what(),
                flow.dst,
                flow.src
            ),
        );
        v.policies = isolators;
        v.near_misses = near_misses;
        v
    }
}

struct FlowCtx<'a> {
    src: &'a Side<'a>,
    dst: &'a Side<'a>,
    protocol: Protocol,
    port: u16,
}

impl FlowCtx<'_> {
    fn what(&self) -> String {
        format!("{}/{}", self.protocol, self.port)
    }
}

pub(crate) fn peers_match(rule: &Rule, peer: &Side, policy_namespace: &str) -> bool {
    rule.peers.is_empty()
        || rule
            .peers
            .iter()
            .any(|m| peer_matches(m, peer, policy_namespace))
}

fn peer_matches(m: &PeerMatch, peer: &Side, policy_namespace: &str) -> bool {
    match m {
        PeerMatch::Block { cidr, except } => {
            cidr.contains(peer.ip) && !except.iter().any(|e| e.contains(peer.ip))
        }
        PeerMatch::Pods { pods, namespaces } => {
            let Some(p) = peer.pod else { return false };
            let ns_ok = match namespaces {
                None => p.pod.namespace == policy_namespace,
                Some(sel) => sel.matches(p.namespace_labels),
            };
            ns_ok && pods.as_ref().is_none_or(|sel| sel.matches(&p.pod.labels))
        }
    }
}

fn ports_match(rule: &Rule, flow: &FlowCtx) -> bool {
    rule.ports.is_empty()
        || rule.ports.iter().any(|pm| {
            pm.protocol == flow.protocol
                && match &pm.port {
                    PortSpec::All => true,
                    PortSpec::Range(lo, hi) => (*lo..=*hi).contains(&flow.port),
                    // Named ports always mean the destination pod's port, in both directions.
                    PortSpec::Named(name) => flow.dst.pod.is_some_and(|d| {
                        d.pod.ports.iter().any(|cp| {
                            cp.name.as_deref() == Some(name.as_str())
                                && cp.protocol == pm.protocol
                                && cp.port == flow.port
                        })
                    }),
                }
        })
}
