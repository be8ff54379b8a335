//! A NetworkPolicy change checked against observed traffic (`explain --apply CHANGE.yaml
//! --flows OBSERVED.ndjson`): every connection of a recorded droptrace stream, the ones that
//! connected (`--emit connects`) and the ones that stalled or were dropped, is evaluated on
//! the cluster before and after the change; the connections whose verdict flips are the
//! sessions the change would break or unblock. No I/O: the caller reads the files.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use k8s_openapi::{api::networking::v1::NetworkPolicy, jiff::Timestamp};
use serde::{Deserialize, Serialize};

use super::{Cluster, FlowQuery, FlowReport, Object, evaluate_flow_with};
use crate::{
    enrich::model::{ObjectKey, Protocol},
    event::{self, Endpoint, Event, Kind},
};

/// A bad `--apply` or `--flows` input, as one line (exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InputError(pub String);

/// The NetworkPolicies of a change: multi-document YAML (or JSON) of NetworkPolicy objects,
/// or `kind: List` documents of them (`kubectl get networkpolicy -o yaml`). `name` names the
/// file in errors. A document that is not a NetworkPolicy, or one the API server would
/// reject, is an error.
pub fn parse_change(name: &str, text: &str) -> Result<Vec<NetworkPolicy>, InputError> {
    let err = |what: String| InputError(format!("{name}: {what}"));
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| {
            err(format!(
                "document {n}: not YAML: {}",
                one_line(&e.to_string())
            ))
        })?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or("")
            .to_string();
        let items = match kind.as_str() {
            "NetworkPolicy" => vec![value],
            "List" | "NetworkPolicyList" => match value.get("items") {
                Some(serde_yaml::Value::Sequence(items)) => items.clone(),
                None | Some(serde_yaml::Value::Null) => Vec::new(),
                Some(_) => return Err(err(format!("document {n}: items is not a list"))),
            },
            "" => return Err(err(format!("document {n} has no kind"))),
            other => {
                return Err(err(format!(
                    "document {n} is a {other}, not a NetworkPolicy (--apply takes \
                     NetworkPolicy manifests)"
                )));
            }
        };
        for (j, item) in items.into_iter().enumerate() {
            let at = if kind == "NetworkPolicy" {
                format!("document {n}")
            } else {
                format!("document {n}, items[{j}]")
            };
            let item_kind = item.get("kind").and_then(|k| k.as_str()).unwrap_or("");
            if item_kind != "NetworkPolicy" {
                return Err(err(format!(
                    "{at} is a {}, not a NetworkPolicy",
                    if item_kind.is_empty() {
                        "document without kind"
                    } else {
                        item_kind
                    }
                )));
            }
            let api = item
                .get("apiVersion")
                .and_then(|k| k.as_str())
                .unwrap_or("");
            if api != "networking.k8s.io/v1" {
                return Err(err(format!(
                    "{at}: apiVersion {api:?}, want networking.k8s.io/v1"
                )));
            }
            let np = NetworkPolicy::deserialize(item)
                .map_err(|e| err(format!("{at}: {}", one_line(&e.to_string()))))?;
            // Validate as the API server would (endPort without port, bad selectors, ...).
            crate::enrich::policy::CompiledPolicy::from_api(&np).map_err(|e| {
                err(format!(
                    "{at} ({}): {}: {}",
                    np.metadata.name.as_deref().unwrap_or("unnamed"),
                    e.field,
                    e.what
                ))
            })?;
            out.push(np);
        }
    }
    if out.is_empty() {
        return Err(err("no NetworkPolicy in it".into()));
    }
    Ok(out)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// One connection of the recorded stream (many events of one connection are one flow): from
/// the initiator to the address and port it connected to.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
}

/// What the stream says happened to a flow: how many events of each outcome
/// (`established` for connects, the stall's `attempt.outcome`, `dropped` for drops, counted
/// by packets).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Observed {
    #[serde(flatten)]
    pub outcomes: BTreeMap<String, u64>,
}

impl Observed {
    pub fn connected(&self) -> bool {
        self.outcomes.contains_key(ESTABLISHED)
    }
}

impl fmt::Display for Observed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .outcomes
            .iter()
            .map(|(k, n)| format!("{k} x{n}"))
            .collect();
        f.write_str(&parts.join(", "))
    }
}

const ESTABLISHED: &str = "established";

/// The flows of a recorded stream, and what was left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    pub flows: BTreeMap<FlowKey, Observed>,
    /// Events that made up the flows.
    pub events: usize,
    /// Events of other kinds (tns, lost, storm, ...), interim stalls (a final one follows),
    /// and non-TCP flows.
    pub ignored: usize,
}

/// Reads a droptrace.v1 NDJSON stream (`--format json`); `name` names it in errors. A line
/// that is not a droptrace.v1 event is an error naming its line number.
pub fn parse_flows(name: &str, text: &str) -> Result<Recorded, InputError> {
    let mut rec = Recorded::default();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let e: Event = serde_json::from_str(line).map_err(|e| {
            InputError(format!(
                "{name}:{}: not a droptrace.v1 event: {}",
                i + 1,
                one_line(&e.to_string())
            ))
        })?;
        if e.schema != event::SCHEMA {
            return Err(InputError(format!(
                "{name}:{}: schema {:?}, want {} (record with --format json)",
                i + 1,
                e.schema,
                event::SCHEMA
            )));
        }
        match flow_of(&e) {
            Some((key, outcome, n)) => {
                *rec.flows
                    .entry(key)
                    .or_default()
                    .outcomes
                    .entry(outcome)
                    .or_default() += n;
                rec.events += 1;
            }
            None => rec.ignored += 1,
        }
    }
    if rec.flows.is_empty() {
        return Err(InputError(format!(
            "{name}: no connect, stall or drop event in it (record with --emit connects to \
             include the connections that succeeded)"
        )));
    }
    Ok(rec)
}

/// The connection an event is about, in its initiating direction, with its outcome.
fn flow_of(e: &Event) -> Option<(FlowKey, String, u64)> {
    let f = e.flow.as_ref()?;
    let protocol = Protocol::from_str(&f.proto).ok()?;
    let outcome = match e.kind {
        Kind::Connect => ESTABLISHED.to_string(),
        Kind::Stall => {
            let o = &e.attempt.as_ref()?.outcome;
            if o == "in_progress" {
                return None;
            }
            o.clone()
        }
        Kind::Drop => "dropped".to_string(),
        _ => return None,
    };
    let n = if e.kind == Kind::Drop {
        e.count.max(1)
    } else {
        1
    };
    let reply = e.tcp.as_ref().is_some_and(|t| t.flags.is_syn_ack());
    // Policies judge connections: the conntrack original tuple (before a Service DNAT) of a
    // drop, the reversed packet of a dropped SYN-ACK, else the flow as recorded (connects
    // and stalls are written client -> address dialled).
    let (src, dst, port) = match (&e.conntrack, e.kind) {
        (Some(ct), Kind::Drop) => (ct.original.src_ip, ct.original.dst_ip, ct.original.dst_port),
        (None, Kind::Drop) if reply => (f.dst_ip, f.src_ip, f.src_port),
        _ => (f.src_ip, f.dst_ip, f.dst_port),
    };
    Some((
        FlowKey {
            src: src.to_canonical(),
            dst: dst.to_canonical(),
            protocol,
            port,
        },
        outcome,
        n,
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Effect {
    /// Allowed before, denied after.
    Breaks,
    /// Denied before, allowed after.
    Unblocks,
}

impl Effect {
    pub fn as_str(self) -> &'static str {
        match self {
            Effect::Breaks => "breaks",
            Effect::Unblocks => "unblocks",
        }
    }
}

/// A flow whose verdict the change flips.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowChange {
    pub effect: Effect,
    /// `namespace/pod (ip)`, `service ns/name (ip)` or the address.
    pub from: String,
    pub to: String,
    pub protocol: &'static str,
    pub port: u16,
    pub observed: Observed,
    pub source: Endpoint,
    pub destination: Endpoint,
    /// The backend pod evaluated, when the flow went to a Service address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    pub before: event::Policy,
    pub after: event::Policy,
}

/// A policy of the change and whether it is new or replaces one of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub namespace: String,
    pub name: String,
    /// `created` or `replaced`.
    pub action: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Impact {
    /// Distinct flows evaluated.
    pub flows: usize,
    pub events: usize,
    pub ignored: usize,
    pub policies: Vec<Applied>,
    pub breaks: usize,
    pub unblocks: usize,
    pub unchanged: usize,
    /// Breaking flows first, then unblocked ones; each in flow order.
    pub changes: Vec<FlowChange>,
}

impl Impact {
    /// Anything that was allowed becomes denied.
    pub fn breaks_something(&self) -> bool {
        self.breaks > 0
    }
}

/// `cluster` with the change applied (create or replace by namespace/name).
pub fn apply(
    cluster: &Cluster,
    change: &[NetworkPolicy],
    now: Timestamp,
) -> Result<(Cluster, Vec<Applied>), InputError> {
    let mut after = cluster.clone();
    let mut applied = Vec::new();
    let mut seen = BTreeSet::new();
    for np in change {
        let compiled = crate::enrich::policy::CompiledPolicy::from_api(np)
            .map_err(|e| InputError(format!("{}: {}", e.field, e.what)))?;
        let key = compiled.key();
        let action = if cluster.policies().get(&key).is_some() || seen.contains(&key) {
            "replaced"
        } else {
            "created"
        };
        after
            .apply(&Object::NetworkPolicy(Box::new(np.clone())), now)
            .map_err(|e| InputError(format!("{key}: {}: {}", e.field, e.what)))?;
        applied.retain(|a: &Applied| ObjectKey::new(&a.namespace, &a.name) != key);
        seen.insert(key.clone());
        applied.push(Applied {
            namespace: key.namespace,
            name: key.name,
            action,
        });
    }
    Ok((after, applied))
}

/// Every recorded flow evaluated on `before` and `after` (the verdict only, no fixes):
/// addresses are resolved on the clusters as they are, not as of the recording.
pub fn impact(
    before: &Cluster,
    after: &Cluster,
    policies: Vec<Applied>,
    recorded: &Recorded,
) -> Impact {
    let mut changes = Vec::new();
    let mut unchanged = 0;
    for (key, observed) in &recorded.flows {
        let q = FlowQuery {
            src: key.src,
            dst: key.dst,
            protocol: key.protocol,
            port: key.port,
            at: None,
        };
        let b = evaluate_flow_with(before, &q, None);
        let a = evaluate_flow_with(after, &q, None);
        let effect = match (b.verdict.allowed(), a.verdict.allowed()) {
            (true, false) => Effect::Breaks,
            (false, true) => Effect::Unblocks,
            _ => {
                unchanged += 1;
                continue;
            }
        };
        changes.push(flow_change(effect, key, observed, b, a));
    }
    changes.sort_by_key(|c| c.effect != Effect::Breaks);
    let breaks = changes
        .iter()
        .filter(|c| c.effect == Effect::Breaks)
        .count();
    Impact {
        flows: recorded.flows.len(),
        events: recorded.events,
        ignored: recorded.ignored,
        policies,
        breaks,
        unblocks: changes.len() - breaks,
        unchanged,
        changes,
    }
}

fn flow_change(
    effect: Effect,
    key: &FlowKey,
    observed: &Observed,
    before: FlowReport,
    after: FlowReport,
) -> FlowChange {
    FlowChange {
        effect,
        from: name(&after.source),
        to: name(&after.destination),
        protocol: key.protocol.as_str(),
        port: key.port,
        observed: observed.clone(),
        backend: after.backend.clone(),
        source: after.source,
        destination: after.destination,
        before: before.policy,
        after: after.policy,
    }
}

/// `ns/pod (ip)`, `service ns/name (ip)`, or the address.
fn name(e: &Endpoint) -> String {
    let ip = e.ip.map(|ip| ip.to_string()).unwrap_or_default();
    match (&e.namespace, &e.pod, &e.service) {
        (Some(ns), Some(pod), _) => format!("{ns}/{pod} ({ip})"),
        (Some(ns), None, Some(svc)) => format!("service {ns}/{svc} ({ip})"),
        _ => match &e.node {
            Some(node) => format!("node {node} ({ip})"),
            None => ip,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enrich::{
        k8s::{
            DEFAULT_IP_HISTORY,
            snapshot::{Mode, Snapshot},
        },
        model::now,
    };

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/explain");

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}/{name}")).unwrap()
    }

    fn cluster() -> Cluster {
        Snapshot::parse(&fixture("snapshot.yaml"), Mode::Strict)
            .unwrap()
            .into_cluster(now(), DEFAULT_IP_HISTORY)
    }

    fn run(change: &str) -> Impact {
        let before = cluster();
        let change = parse_change(change, &fixture(change)).unwrap();
        let recorded = parse_flows("observed.ndjson", &fixture("observed.ndjson")).unwrap();
        let (after, applied) = apply(&before, &change, now()).unwrap();
        impact(&before, &after, applied, &recorded)
    }

    /// The recorded stream (tests/fixtures/explain/README.md): three sqlplus sessions
    /// connected to the listener, and their three redirected legs each dropped and timed out.
    #[test]
    fn a_recorded_stream_is_one_flow_per_connection_with_its_outcomes() {
        let r = parse_flows("observed.ndjson", &fixture("observed.ndjson")).unwrap();
        assert_eq!(r.flows.len(), 4, "{r:#?}");
        let listener = FlowKey {
            src: "10.202.1.1".parse().unwrap(),
            dst: "10.203.1.2".parse().unwrap(),
            protocol: Protocol::Tcp,
            port: 1521,
        };
        assert_eq!(r.flows[&listener].to_string(), "established x3");
        let leg = |port| FlowKey {
            port,
            ..listener.clone()
        };
        assert_eq!(r.flows[&leg(40311)].to_string(), "dropped x3, timeout x1");
        assert_eq!(r.flows[&leg(40123)].to_string(), "dropped x3, timeout x1");
        assert_eq!(r.flows[&leg(40200)].to_string(), "dropped x2, timeout x1");
        assert_eq!((r.events, r.ignored), (14, 0));
        // Interim stalls and other kinds are no flows.
        let interim = r#"{"schema":"droptrace.v1","kind":"stall","time":"t","node":"n","count":1,"flow":{"proto":"tcp","family":"ipv4","src_ip":"10.0.0.1","src_port":1,"dst_ip":"10.0.0.2","dst_port":2},"attempt":{"id":1,"started":"t","syn_retransmits":1,"duration_ms":3000,"outcome":"in_progress"}}"#;
        let lost = r#"{"schema":"droptrace.v1","kind":"lost","time":"t","node":"n","count":3,"lost":{"source":"kernel","reason":"ringbuf_full"}}"#;
        let text = format!("{interim}\n{lost}\n{}", fixture("observed.ndjson"));
        let r2 = parse_flows("f", &text).unwrap();
        assert_eq!((r2.flows, r2.events, r2.ignored), (r.flows, 14, 2));
    }

    /// Replacing the database's policy with one that forgets the app namespace: the
    /// sessions that connected would break. Exit status 3.
    #[test]
    fn tightening_the_database_policy_breaks_the_connected_sessions() {
        let i = run("tighten.yaml");
        assert_eq!(
            i.policies,
            [Applied {
                namespace: "db".into(),
                name: "oracle-listener-only".into(),
                action: "replaced",
            }]
        );
        assert!(i.breaks_something());
        assert_eq!((i.breaks, i.unblocks, i.unchanged), (1, 0, 3), "{i:#?}");
        let c = &i.changes[0];
        assert_eq!(c.effect, Effect::Breaks);
        assert_eq!(c.from, "app/client (10.202.1.1)");
        assert_eq!(c.to, "db/oracle-0 (10.203.1.2)");
        assert_eq!(c.port, 1521);
        assert!(c.observed.connected());
        assert_eq!(c.before.verdict, "allowed");
        assert_eq!(c.after.verdict, "denied");
        assert_eq!(c.after.direction, "ingress");
        assert_eq!(c.after.policies[0].name, "oracle-listener-only");
    }

    /// A policy that opens the dispatcher ports with port + endPort: the stalled legs are
    /// unblocked, the connected sessions keep working. Nothing breaks: exit 0.
    #[test]
    fn opening_the_dispatcher_range_unblocks_the_stalled_legs_and_breaks_nothing() {
        let i = run("open-range.yaml");
        assert_eq!(i.policies[0].action, "created");
        assert!(!i.breaks_something());
        assert_eq!((i.breaks, i.unblocks, i.unchanged), (0, 3, 1), "{i:#?}");
        let ports: Vec<u16> = i.changes.iter().map(|c| c.port).collect();
        assert_eq!(ports, [40123, 40200, 40311]);
        for c in &i.changes {
            assert_eq!(c.effect, Effect::Unblocks);
            assert!(!c.observed.connected());
            assert_eq!(c.before.verdict, "denied");
            assert_eq!(c.after.verdict, "allowed");
            assert_eq!(c.after.policies[0].name, "oracle-dispatchers");
        }
    }

    #[test]
    fn bad_changes_and_streams_are_named_in_one_line() {
        let cases = [
            ("", "c.yaml: no NetworkPolicy in it"),
            ("---\n# nothing\n", "c.yaml: no NetworkPolicy in it"),
            ("kind: [", "c.yaml: document 1: not YAML"),
            (
                "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n",
                "c.yaml: document 1 is a Pod, not a NetworkPolicy",
            ),
            ("metadata: {name: x}\n", "c.yaml: document 1 has no kind"),
            (
                "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: x}\n",
                "apiVersion \"networking.k8s.io/v1beta1\"",
            ),
            (
                "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{endPort: 2000}]}]\n",
                "c.yaml: document 1 (x): spec.ingress[0].ports[0].endPort: needs port",
            ),
            (
                "kind: List\nitems: [{kind: Pod}]\n",
                "c.yaml: document 1, items[0] is a Pod",
            ),
        ];
        for (text, want) in cases {
            let e = parse_change("c.yaml", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
        let flows = [
            ("", "f: no connect, stall or drop event in it"),
            ("{\n", "f:1: not a droptrace.v1 event"),
            (
                "{\"schema\":\"droptrace.v1\",\"kind\":\"lost\",\"time\":\"t\",\"node\":\"n\",\"count\":1}\nnope\n",
                "f:2: not a droptrace.v1 event",
            ),
            (
                "{\"schema\":\"droptrace.v1\",\"kind\":\"lost\",\"time\":\"t\",\"node\":\"n\",\"count\":1}\n",
                "f: no connect, stall or drop event in it",
            ),
        ];
        for (text, want) in flows {
            let e = parse_flows("f", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }
}
