//! `--k8s-events`: each stall incident as an events.k8s.io/v1 Event on the pods it concerns,
//! so the app team sees "NetworkPolicyDenied" in `kubectl describe pod` without the
//! observability stack.
//!
//! - Regarding the client pod; for ingress denials also the destination pod (`related` is
//!   the other pod).
//! - One Event per (pod, destination, reason); repeats update its `series` (count,
//!   lastObservedTime) with a merge PATCH: the second occurrence at once, later ones at most
//!   every [`SERIES_EVERY`] per Event and at exit (client-go's events library does the same).
//! - Writes are rate-limited per node (a token bucket: [`BURST`] writes, then one every
//!   [`REFILL_EVERY`]). A new Event that finds the bucket empty is discarded and counted
//!   (`rate_limited`); series updates wait for a token and are never lost.
//! - Failed writes are retried with backoff; what is still unwritten at the flush deadline is
//!   counted (`shutdown`). Counts are this output's (`k8s-events`), announced in-stream as
//!   `lost` records and in the sink metrics like any sink's.
use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use k8s_openapi::api::events::v1::Event as KubeEvent;
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

use super::{
    delivery::{Phase, phase_at_least},
    stats::{Discard, SinkStats},
};
use crate::event::{Endpoint, Event, Kind};

/// The name of this output in `lost.sink`, metrics and the exit summary.
pub(crate) const SINK_NAME: &str = "k8s-events";
/// Writes (creates and series patches) a node may make at once.
pub const BURST: u32 = 25;
/// Then one more write per this long.
pub const REFILL_EVERY: Duration = Duration::from_secs(5);
/// A series is patched at most this often after its second occurrence.
pub(crate) const SERIES_EVERY: Duration = Duration::from_secs(30);
/// Events the API server keeps (its --event-ttl default is 1h): older ones are made anew.
const EVENT_TTL: Duration = Duration::from_secs(50 * 60);
/// (pod, destination, reason) keys remembered; the least recently seen are forgotten.
const MAX_KEYS: usize = 4096;
/// Creates waiting for the API (it is down or slow); beyond it they are discarded.
const MAX_PENDING: usize = 256;
/// `note` is at most 1 kB.
const MAX_NOTE: usize = 1024;

/// Why, as the Event's `reason`: the documented set.
pub(crate) fn reason(e: &Event) -> Option<&'static str> {
    let outcome = e.attempt.as_ref().map(|a| a.outcome.as_str())?;
    if outcome == "in_progress" {
        return None;
    }
    if e.policy.as_ref().is_some_and(|p| p.verdict == "denied") {
        return Some("NetworkPolicyDenied");
    }
    Some(match outcome {
        "refused" | "refused_by_listener" => "ConnectRefused",
        "data_stalled" => "DataStalled",
        _ => "ConnectStalled",
    })
}

/// Whether the denial involves the destination's ingress (its namespace's policies).
fn denies_ingress(e: &Event) -> bool {
    e.policy.as_ref().is_some_and(|p| {
        p.verdict == "denied"
            && (p.direction == "ingress"
                || p.suggested_fix
                    .as_deref()
                    .is_some_and(|f| f.contains("- Ingress")))
    })
}

fn pod_name(ep: &Endpoint) -> Option<String> {
    Some(format!("{}/{}", ep.namespace.as_ref()?, ep.pod.as_ref()?))
}

/// `ns/pod` or the address, with the port.
fn destination(e: &Event) -> String {
    let port = e.flow.as_ref().map(|f| f.dst_port).unwrap_or_default();
    let ep = e.destination.as_deref();
    match ep.and_then(pod_name) {
        Some(p) => format!("{p}:{port}"),
        None => match (ep.and_then(|d| d.service.as_ref()), e.flow.as_ref()) {
            (Some(svc), _) => format!(
                "service {}/{svc}:{port}",
                ep.and_then(|d| d.namespace.as_deref()).unwrap_or_default()
            ),
            (None, Some(f)) => match f.dst_ip {
                std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
                a => format!("{a}:{port}"),
            },
            (None, None) => "unknown".into(),
        },
    }
}

/// The Events one incident makes: (key, Event object).
pub(crate) fn events_for(e: &Event, node: &str) -> Vec<(Key, Value)> {
    if e.kind != Kind::Stall {
        return Vec::new();
    }
    let Some(reason) = reason(e) else {
        return Vec::new();
    };
    let dest = destination(e);
    let client = e.source.as_deref().filter(|s| pod_name(s).is_some());
    let server = e
        .destination
        .as_deref()
        .filter(|d| pod_name(d).is_some() && denies_ingress(e));
    let mut out = Vec::new();
    for (subject, other, role) in [(client, server, "client"), (server, client, "server")] {
        let Some(pod) = subject else { continue };
        let key = Key {
            pod: pod_name(pod).unwrap_or_default(),
            destination: dest.clone(),
            reason,
        };
        let note = note(e, role, &dest);
        let mut obj = json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"namespace": pod.namespace, "name": ""},
            "eventTime": e.time,
            "reportingController": "droptrace",
            "reportingInstance": truncate(node, 128),
            "action": if reason == "DataStalled" { "Send" } else { "Connect" },
            "reason": reason,
            "type": "Warning",
            "note": note,
            "regarding": object_ref(pod),
        });
        if let Some(o) = other {
            obj["related"] = object_ref(o);
        }
        out.push((key, obj));
    }
    out
}

fn object_ref(ep: &Endpoint) -> Value {
    let mut r = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "namespace": ep.namespace,
        "name": ep.pod,
    });
    if let Some(uid) = &ep.pod_uid {
        r["uid"] = uid.clone().into();
    }
    r
}

/// The diagnosis with the policy named and where the fix comes from.
fn note(e: &Event, role: &str, dest: &str) -> String {
    let client = e
        .source
        .as_deref()
        .and_then(pod_name)
        .or_else(|| e.flow.as_ref().map(|f| f.src_ip.to_string()))
        .unwrap_or_else(|| "a client".into());
    let outcome = e.attempt.as_ref().map_or("stalled", |a| a.outcome.as_str());
    let mut n = match role {
        "server" => format!("connection from {client} to this pod ({dest}): {outcome}"),
        _ => format!("connection to {dest}: {outcome}"),
    };
    if let Some(a) = &e.attempt
        && a.duration_ms > 0
    {
        n.push_str(&format!(" after {} ms", a.duration_ms));
    }
    if let Some(p) = e.policy.as_ref().filter(|p| p.verdict == "denied") {
        let names: Vec<String> = p
            .policies
            .iter()
            .map(|r| format!("{}/{}", r.namespace, r.name))
            .collect();
        n.push_str(&format!(
            ". Denied by NetworkPolicy {} ({})",
            names.join(", "),
            p.direction
        ));
    }
    if let Some(d) = &e.diagnosis {
        n.push_str(". ");
        n.push_str(d);
    }
    if let (Some(p), Some(f)) = (e.policy.as_ref(), e.flow.as_ref())
        && p.suggested_fix.is_some()
    {
        n.push_str(&format!(
            ". Fix: droptrace explain --from {client} --to {} --port {}",
            e.destination
                .as_deref()
                .and_then(pod_name)
                .unwrap_or_else(|| f.dst_ip.to_string()),
            f.dst_port
        ));
    }
    truncate(&n, MAX_NOTE)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) pod: String,
    pub(crate) destination: String,
    pub(crate) reason: &'static str,
}

/// One Event and what the API knows of it.
struct Series {
    namespace: String,
    /// Set once created.
    name: Option<String>,
    /// The object to create (until created).
    object: Value,
    /// Occurrences seen, and how many the API has.
    count: u64,
    reported: u64,
    last_observed: String,
    created_at: Instant,
    last_write: Option<Instant>,
    last_seen: Instant,
}

/// Token bucket, per node.
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() / REFILL_EVERY.as_secs_f64();
        self.tokens = (self.tokens + refill).min(f64::from(BURST));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub(crate) struct Writer {
    api: Client,
    node: String,
    stats: Arc<SinkStats>,
    series: HashMap<Key, Series>,
    /// Keys whose Event is not created yet, oldest first.
    pending: VecDeque<Key>,
    bucket: Bucket,
    /// A write failed: no writes before this.
    backoff_until: Option<Instant>,
    backoff: Duration,
    seq: u64,
}

enum WriteError {
    Retry(String),
    /// The object is gone (a PATCH answered 404): make it anew.
    Gone,
    /// A name taken (409 on create): pick another.
    Conflict,
    Rejected(String),
}

impl Writer {
    pub(crate) fn new(api: Client, node: &str, stats: Arc<SinkStats>) -> Self {
        Self {
            api,
            node: node.to_string(),
            stats,
            series: HashMap::new(),
            pending: VecDeque::new(),
            bucket: Bucket {
                tokens: f64::from(BURST),
                at: Instant::now(),
            },
            backoff_until: None,
            backoff: Duration::from_millis(200),
            seq: 0,
        }
    }

    /// One incident: new Events are queued (if the bucket allows), repeats counted.
    fn observe(&mut self, e: &Event) {
        for (key, object) in events_for(e, &self.node) {
            let now = Instant::now();
            if let Some(s) = self.series.get_mut(&key)
                && now.duration_since(s.created_at) < EVENT_TTL
            {
                s.count += 1;
                s.last_observed = e.time.clone();
                s.last_seen = now;
                continue;
            }
            // New (or expired on the server): needs a create, and a token for it.
            if self.pending.len() >= MAX_PENDING {
                self.stats.discard(Discard::QueueFull, 1);
                continue;
            }
            if !self.bucket.take() {
                self.stats.discard(Discard::RateLimited, 1);
                continue;
            }
            self.forget_oldest();
            self.series.insert(
                key.clone(),
                Series {
                    namespace: object["metadata"]["namespace"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    name: None,
                    object,
                    count: 1,
                    reported: 0,
                    last_observed: e.time.clone(),
                    created_at: now,
                    last_write: None,
                    last_seen: now,
                },
            );
            self.pending.retain(|k| k != &key);
            self.pending.push_back(key);
        }
    }

    fn forget_oldest(&mut self) {
        if self.series.len() < MAX_KEYS {
            return;
        }
        let oldest = self
            .series
            .iter()
            .filter(|(_, s)| s.name.is_some() && s.count == s.reported)
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(k, _)| k.clone());
        if let Some(k) = oldest {
            self.series.remove(&k);
        }
    }

    /// Writes what is due: pending creates, then series updates (all of them when
    /// `draining`). Returns whether anything is still unwritten.
    async fn write_due(&mut self, draining: bool) -> bool {
        if self
            .backoff_until
            .is_some_and(|t| Instant::now() < t && !draining)
        {
            return self.unwritten();
        }
        let mut conflicts = 0;
        while let Some(key) = self.pending.front().cloned() {
            // The token was taken when the occurrence was admitted.
            match self.create(&key).await {
                Ok(()) => {
                    self.pending.pop_front();
                }
                // The generated name is taken: the next try makes another.
                Err(WriteError::Conflict) if conflicts < 3 => conflicts += 1,
                Err(WriteError::Retry(why)) => {
                    self.failed(&why);
                    return true;
                }
                Err(e) => {
                    let why = match e {
                        WriteError::Rejected(why) => why,
                        WriteError::Gone => "namespace not found".into(),
                        _ => "the Event name is always taken".into(),
                    };
                    tracing::warn!(sink = SINK_NAME, "API refused an Event: {why}");
                    self.pending.pop_front();
                    if let Some(s) = self.series.remove(&key) {
                        self.stats.discard(Discard::Rejected, s.count - s.reported);
                    }
                }
            }
        }
        let now = Instant::now();
        let due: Vec<Key> = self
            .series
            .iter()
            .filter(|(_, s)| {
                s.name.is_some()
                    && s.count > s.reported
                    && (draining
                        || s.reported <= 1
                        || s.last_write
                            .is_none_or(|t| now.duration_since(t) >= SERIES_EVERY))
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if !self.bucket.take() {
                break;
            }
            match self.patch(&key).await {
                Ok(()) => {}
                Err(WriteError::Gone) => {
                    // Expired on the server: create it anew with what it has not counted.
                    if let Some(s) = self.series.get_mut(&key) {
                        s.name = None;
                        s.object["eventTime"] = s.last_observed.clone().into();
                        s.count -= s.reported;
                        s.reported = 0;
                        s.created_at = Instant::now();
                        self.pending.push_back(key);
                    }
                }
                Err(WriteError::Rejected(why)) => {
                    tracing::warn!(sink = SINK_NAME, "API refused an Event update: {why}");
                    if let Some(s) = self.series.get_mut(&key) {
                        self.stats.discard(Discard::Rejected, s.count - s.reported);
                        s.reported = s.count;
                    }
                }
                Err(WriteError::Retry(why)) => {
                    self.failed(&why);
                    return true;
                }
                Err(WriteError::Conflict) => {}
            }
        }
        self.unwritten()
    }

    fn failed(&mut self, why: &str) {
        self.stats.errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(sink = SINK_NAME, "Kubernetes Event write failed: {why}");
        self.backoff_until = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(30));
    }

    fn succeeded(&mut self) {
        self.backoff_until = None;
        self.backoff = Duration::from_millis(200);
    }

    fn unwritten(&self) -> bool {
        !self.pending.is_empty() || self.series.values().any(|s| s.count > s.reported)
    }

    /// What is still unwritten at the deadline: counted.
    fn give_up(&mut self) {
        let n: u64 = self.series.values().map(|s| s.count - s.reported).sum();
        self.stats.discard(Discard::Shutdown, n);
        self.pending.clear();
        self.series.clear();
    }

    async fn create(&mut self, key: &Key) -> Result<(), WriteError> {
        let Some(s) = self.series.get_mut(key) else {
            return Ok(());
        };
        self.seq += 1;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let pod = key.pod.rsplit('/').next().unwrap_or("pod");
        let name = format!("{}.{:x}{:x}", truncate_name(pod), nanos, self.seq);
        s.object["metadata"]["name"] = name.clone().into();
        let ev: KubeEvent = serde_json::from_value(s.object.clone())
            .map_err(|e| WriteError::Rejected(format!("Event object: {e}")))?;
        let api: Api<KubeEvent> = Api::namespaced(self.api.clone(), &s.namespace);
        api.create(&PostParams::default(), &ev)
            .await
            .map_err(classify)?;
        let s = self.series.get_mut(key).ok_or(WriteError::Gone)?;
        s.name = Some(name);
        s.reported = 1;
        s.last_write = Some(Instant::now());
        self.stats.sent.fetch_add(1, Ordering::Relaxed);
        self.succeeded();
        Ok(())
    }

    async fn patch(&mut self, key: &Key) -> Result<(), WriteError> {
        let Some(s) = self.series.get(key) else {
            return Ok(());
        };
        let Some(name) = s.name.clone() else {
            return Ok(());
        };
        let count = s.count;
        let body = json!({"series": {"count": count, "lastObservedTime": s.last_observed}});
        let api: Api<KubeEvent> = Api::namespaced(self.api.clone(), &s.namespace);
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
            .await
            .map_err(classify)?;
        if let Some(s) = self.series.get_mut(key) {
            self.stats
                .sent
                .fetch_add(count - s.reported, Ordering::Relaxed);
            s.reported = count;
            s.last_write = Some(Instant::now());
        }
        self.succeeded();
        Ok(())
    }
}

/// Object names are DNS subdomains: the pod name leaves room for the suffix.
fn truncate_name(pod: &str) -> &str {
    let mut end = pod.len().min(200);
    while !pod.is_char_boundary(end) {
        end -= 1;
    }
    &pod[..end]
}

fn classify(e: kube::Error) -> WriteError {
    match e {
        kube::Error::Api(s) => match s.code {
            404 => WriteError::Gone,
            409 => WriteError::Conflict,
            // Throttling, server trouble, and RBAC an operator fixes while droptrace runs.
            401 | 403 | 408 | 429 | 500..=599 => {
                WriteError::Retry(format!("HTTP {}: {}", s.code, s.message))
            }
            c => WriteError::Rejected(format!("HTTP {c}: {}", s.message)),
        },
        other => WriteError::Retry(other.to_string()),
    }
}

/// The writer's task: takes stall incidents until the encoder is done, writes until nothing
/// is left or the flush deadline.
/// `taken` fires once every incident is taken in (and its discards counted), so the last
/// loss announcement of the run includes them.
pub(super) async fn run(
    mut w: Writer,
    mut rx: mpsc::Receiver<Arc<Event>>,
    mut phase: watch::Receiver<Phase>,
    taken: tokio::sync::oneshot::Sender<()>,
) {
    let mut taken = Some(taken);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut open = true;
    loop {
        tokio::select! {
            r = rx.recv(), if open => match r {
                Some(e) => {
                    w.observe(&e);
                    while let Ok(e) = rx.try_recv() {
                        w.observe(&e);
                    }
                }
                None => {
                    open = false;
                    if let Some(t) = taken.take() {
                        let _ = t.send(());
                    }
                }
            },
            _ = tick.tick() => {}
            _ = phase_at_least(&mut phase, Phase::Stop) => break,
        }
        let draining = !open || *phase.borrow() != Phase::Running;
        let left = tokio::select! {
            left = w.write_due(draining) => left,
            _ = phase_at_least(&mut phase, Phase::Stop) => break,
        };
        if !open && !left {
            return;
        }
    }
    // Deadline: whatever is left was not written.
    while let Ok(e) = rx.try_recv() {
        w.observe(&e);
    }
    w.give_up();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Attempt, Policy, PolicyRef, Shared};

    fn stall(outcome: &str, policy: Option<(&str, &str)>) -> Event {
        let mut e = Event::new(Kind::Stall, "2026-01-01T00:00:05.000000Z".into(), "n1");
        e.flow = Some(crate::event::Flow {
            proto: "tcp".into(),
            family: crate::event::Family::Ipv4,
            src_ip: "10.0.0.1".parse().unwrap(),
            src_port: 40000,
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: 1521,
            community_id: None,
        });
        e.attempt = Some(Attempt {
            id: 1,
            started: "2026-01-01T00:00:00.000000Z".into(),
            syn_retransmits: 3,
            duration_ms: 5000,
            outcome: outcome.into(),
            data_retransmits: 0,
            side: None,
            storm: None,
        });
        let pod = |ns: &str, name: &str| Endpoint {
            ip: None,
            namespace: Some(ns.into()),
            pod: Some(name.into()),
            pod_uid: Some(format!("uid-{name}")),
            ..Endpoint::default()
        };
        e.source = Some(Shared::new(pod("app", "client-1")));
        e.destination = Some(Shared::new(pod("db", "oracle-0")));
        e.policy = policy.map(|(dir, name)| {
            Shared::new(Policy {
                verdict: "denied".into(),
                direction: dir.into(),
                policies: vec![PolicyRef {
                    namespace: "db".into(),
                    name: name.into(),
                    rule: None,
                }],
                explanation: String::new(),
                suggested_fix: Some("kind: NetworkPolicy".into()),
                fix_check: None,
            })
        });
        e
    }

    #[test]
    fn reasons_and_subjects() {
        let ev = events_for(&stall("timeout", Some(("ingress", "deny-all"))), "n1");
        assert_eq!(ev.len(), 2, "client and destination pods");
        assert_eq!(ev[0].0.reason, "NetworkPolicyDenied");
        assert_eq!(ev[0].1["regarding"]["name"], "client-1");
        assert_eq!(ev[0].1["related"]["name"], "oracle-0");
        assert_eq!(ev[1].1["regarding"]["name"], "oracle-0");
        assert_eq!(ev[1].1["metadata"]["namespace"], "db");
        let note = ev[0].1["note"].as_str().unwrap();
        assert!(note.contains("db/deny-all (ingress)"), "{note}");
        assert!(note.contains("droptrace explain --from app/client-1 --to db/oracle-0"));

        let ev = events_for(&stall("timeout", Some(("egress", "deny-all"))), "n1");
        assert_eq!(ev.len(), 1, "egress denial: the client only");
        let ev = events_for(&stall("refused", None), "n1");
        assert_eq!(ev[0].0.reason, "ConnectRefused");
        assert_eq!(
            events_for(&stall("data_stalled", None), "n1")[0].0.reason,
            "DataStalled"
        );
        assert_eq!(
            events_for(&stall("timeout", None), "n1")[0].0.reason,
            "ConnectStalled"
        );
        assert!(events_for(&stall("in_progress", None), "n1").is_empty());
        let mut no_pods = stall("timeout", None);
        no_pods.source = None;
        no_pods.destination = None;
        assert!(events_for(&no_pods, "n1").is_empty());
    }

    #[test]
    fn long_notes_are_cut_on_a_char_boundary() {
        let s = "é".repeat(600);
        let t = truncate(&s, MAX_NOTE);
        assert!(t.len() <= MAX_NOTE && t.ends_with("..."));
    }
}
