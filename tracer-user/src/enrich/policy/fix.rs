//! The smallest NetworkPolicy that lets a denied flow through: an egress policy in the source
//! namespace when egress denies, an ingress policy in the destination namespace when ingress
//! does, both (as two YAML documents) when both do.
use serde_yaml::{Mapping, Value};

use super::{
    cidr::Cidr,
    evaluate::{Direction, Side, Verdict},
};
use crate::enrich::model::{Labels, NAMESPACE_NAME_LABEL, Pod, Protocol};

/// Labels that identify a workload across rollouts, preferred when a pod has them.
const STABLE_LABELS: [&str; 2] = ["app.kubernetes.io/name", "app"];
/// Labels that change with every rollout or name one replica: never in a selector.
const VOLATILE_LABELS: [&str; 7] = [
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "controller-uid",
    "batch.kubernetes.io/controller-uid",
];

/// What a fix must not do to the rest of the cluster.
pub trait Isolation {
    /// How many pods of `namespace` matching `selector` no policy isolates for `direction`
    /// today: a new policy selecting them would cut off the rest of their traffic.
    fn newly_isolated(&self, direction: Direction, namespace: &str, selector: &Labels) -> usize;
}

/// For callers that know no other pods: nothing else is affected.
pub struct NoOtherPods;

impl Isolation for NoOtherPods {
    fn newly_isolated(&self, _: Direction, _: &str, _: &Labels) -> usize {
        0
    }
}

/// The ports a fix is for besides the flow's own.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FixPorts {
    /// Single ports added to the same rule (e.g. the listener port of a redirected leg).
    pub extra: Vec<u16>,
    /// Ports one Oracle listener redirected clients to over time: with two or more, the rule
    /// covers them with one `port` + `endPort` range from the lowest to the highest.
    pub dynamic: Vec<u16>,
}

impl FixPorts {
    pub fn extra(ports: &[u16]) -> Self {
        Self {
            extra: ports.to_vec(),
            dynamic: Vec::new(),
        }
    }

    /// The inclusive range covering the dynamic ports, when there are two or more.
    pub fn range(&self) -> Option<(u16, u16)> {
        let lo = self.dynamic.iter().copied().filter(|p| *p != 0).min()?;
        let hi = self.dynamic.iter().copied().max()?;
        (lo < hi).then_some((lo, hi))
    }

    /// Every concrete port the fix must let through after `port`: the extra and the observed
    /// dynamic ones, without repeats.
    pub fn all(&self, port: u16) -> Vec<u16> {
        let mut out = vec![port];
        for p in self.extra.iter().chain(&self.dynamic) {
            if *p != 0 && !out.contains(p) {
                out.push(*p);
            }
        }
        out
    }
}

/// YAML for the policies to add, or None when the flow is allowed. `ports` are added to the
/// same rule (e.g. the port an Oracle listener redirects to, or the range of its dynamic
/// ports).
pub fn suggest(
    verdict: &Verdict,
    src: &Side,
    dst: &Side,
    ports: &FixPorts,
    isolation: &dyn Isolation,
) -> Option<String> {
    let range = ports.range();
    let inside = |p: u16| range.is_some_and(|(lo, hi)| (lo..=hi).contains(&p));
    let mut singles = Vec::new();
    for p in ports.all(verdict.port) {
        if !inside(p) {
            singles.push(p);
        }
    }
    let flow = FixFlow {
        src,
        dst,
        protocol: verdict.protocol,
        ports: &singles,
        range,
        first: verdict.port,
        seen: &ports.dynamic,
    };
    let mut docs = Vec::new();
    for (d, subject, peer) in [(&verdict.egress, src, dst), (&verdict.ingress, dst, src)] {
        if d.allowed {
            continue;
        }
        let pod = subject.pod?.pod;
        docs.push(policy_yaml(d.direction, pod, peer, &flow, isolation));
    }
    (!docs.is_empty()).then(|| docs.join("---\n"))
}

struct FixFlow<'a> {
    src: &'a Side<'a>,
    dst: &'a Side<'a>,
    protocol: Protocol,
    /// Single ports.
    ports: &'a [u16],
    /// One `port` + `endPort` range, for the dynamic ports in `seen`.
    range: Option<(u16, u16)>,
    /// The flow's own port (names the policy).
    first: u16,
    seen: &'a [u16],
}

/// The stable subset when selecting it isolates nobody new, else the pod's workload labels
/// if they do better; with how many pods it would newly isolate.
fn choose_selector(direction: Direction, pod: &Pod, isolation: &dyn Isolation) -> (Labels, usize) {
    let stable = stable_selector(&pod.labels);
    let n = isolation.newly_isolated(direction, &pod.namespace, &stable);
    if n == 0 {
        return (stable, 0);
    }
    let narrow = workload_selector(&pod.labels);
    let m = isolation.newly_isolated(direction, &pod.namespace, &narrow);
    if m < n { (narrow, m) } else { (stable, n) }
}

/// A subset of the pod's labels that selects its workload, not just this replica.
pub fn stable_selector(labels: &Labels) -> Labels {
    for key in STABLE_LABELS {
        if let Some(v) = labels.get(key) {
            return Labels::from([(key.to_string(), v.clone())]);
        }
    }
    workload_selector(labels)
}

/// Every label but those that change per rollout or per replica.
fn workload_selector(labels: &Labels) -> Labels {
    labels
        .iter()
        .filter(|(k, _)| !VOLATILE_LABELS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn policy_yaml(
    direction: Direction,
    pod: &Pod,
    peer: &Side,
    flow: &FixFlow,
    isolation: &dyn Isolation,
) -> String {
    let (selector, newly) = choose_selector(direction, pod, isolation);
    let mut comment = String::new();
    if selector.is_empty() {
        comment = format!(
            "# {}/{} has no labels to select it by: this selects every pod in {}.\n",
            pod.namespace, pod.name, pod.namespace
        );
    }
    if newly > 0 {
        comment += &format!(
            "# Caution: this also selects {newly} pod(s) of {} that no policy isolates for {} \
             today; they would lose their other {} traffic.\n",
            pod.namespace,
            direction.as_str(),
            direction.as_str()
        );
    }
    let peer_value = match peer.pod {
        Some(p) => map([
            (
                "namespaceSelector",
                match_labels(&Labels::from([(
                    NAMESPACE_NAME_LABEL.to_string(),
                    p.pod.namespace.clone(),
                )])),
            ),
            ("podSelector", match_labels(&stable_selector(&p.pod.labels))),
        ]),
        None => map([(
            "ipBlock",
            map([("cidr", Value::String(Cidr::host(peer.ip).to_string()))]),
        )]),
    };
    let mut port_values: Vec<Value> = flow
        .ports
        .iter()
        .map(|p| {
            map([
                ("protocol", Value::String(flow.protocol.as_str().into())),
                ("port", Value::Number((*p).into())),
            ])
        })
        .collect();
    if let Some((lo, hi)) = flow.range {
        port_values.push(map([
            ("protocol", Value::String(flow.protocol.as_str().into())),
            ("port", Value::Number(lo.into())),
            ("endPort", Value::Number(hi.into())),
        ]));
        let mut seen: Vec<u16> = flow.seen.to_vec();
        seen.sort_unstable();
        seen.dedup();
        let seen: Vec<String> = seen.iter().map(u16::to_string).collect();
        comment += &format!(
            "# The Oracle listener redirected clients to ports {} (seen): port {lo} with \
             endPort {hi} covers them, and the ports between. Pinning the ports on the \
             Oracle side (oracle.remedy) keeps the range from growing.\n",
            seen.join(", ")
        );
    }
    let (types, rules_key, peers_key) = match direction {
        Direction::Egress => ("Egress", "egress", "to"),
        Direction::Ingress => ("Ingress", "ingress", "from"),
    };
    let name = policy_name(direction, flow);
    let doc = map([
        ("apiVersion", Value::String("networking.k8s.io/v1".into())),
        ("kind", Value::String("NetworkPolicy".into())),
        (
            "metadata",
            map([
                ("name", Value::String(name)),
                ("namespace", Value::String(pod.namespace.clone())),
            ]),
        ),
        (
            "spec",
            map([
                ("podSelector", match_labels(&selector)),
                (
                    "policyTypes",
                    Value::Sequence(vec![Value::String(types.into())]),
                ),
                (
                    rules_key,
                    Value::Sequence(vec![map([
                        (peers_key, Value::Sequence(vec![peer_value])),
                        ("ports", Value::Sequence(port_values)),
                    ])]),
                ),
            ]),
        ),
    ]);
    // Serialising a Value of strings, numbers and maps cannot fail.
    comment + &serde_yaml::to_string(&doc).unwrap_or_default()
}

fn map<const N: usize>(entries: [(&str, Value); N]) -> Value {
    let mut m = Mapping::new();
    for (k, v) in entries {
        m.insert(Value::String(k.into()), v);
    }
    Value::Mapping(m)
}

fn match_labels(labels: &Labels) -> Value {
    if labels.is_empty() {
        return Value::Mapping(Mapping::new());
    }
    let mut m = Mapping::new();
    for (k, v) in labels {
        m.insert(Value::String(k.clone()), Value::String(v.clone()));
    }
    map([("matchLabels", Value::Mapping(m))])
}

/// `allow-egress-client-to-oracle-tcp-1521` (`...-tcp-40123-40311` for a range of dynamic
/// ports, so the fixes of every leg share a name): workload names over pod names, a valid
/// object name (lowercase alphanumerics and '-', at most 63).
fn policy_name(direction: Direction, flow: &FixFlow) -> String {
    let ports = match flow.range {
        Some((lo, hi)) => format!("{lo}-{hi}"),
        None => flow.first.to_string(),
    };
    let raw = format!(
        "allow-{}-{}-to-{}-{}-{ports}",
        direction.as_str(),
        side_name(flow.src),
        side_name(flow.dst),
        flow.protocol.as_str().to_ascii_lowercase(),
    );
    let mut out = String::with_capacity(raw.len());
    for c in raw.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_alphanumeric() { c } else { '-' };
        if !(c == '-' && out.ends_with('-')) {
            out.push(c);
        }
    }
    out.truncate(63);
    out.trim_end_matches('-').to_string()
}

fn side_name(side: &Side) -> String {
    match side.pod {
        Some(p) => p
            .pod
            .workload
            .as_ref()
            .map(|w| w.name.clone())
            .unwrap_or_else(|| p.pod.name.clone()),
        None => side.ip.to_string(),
    }
}
