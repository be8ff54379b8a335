//! The droptrace.v1 event model: what every sink receives, before any SIEM reshaping.
//!
//! Field names are a contract (docs/events.md, schema/droptrace.v1/*.schema.json). Sections that
//! do not apply to a kind are left out of the JSON, never emitted as null.
use std::{
    net::IpAddr,
    ops::Deref,
    sync::{Arc, OnceLock},
};

use serde::{Deserialize, Serialize};

use crate::decode::drop_class::DropClass;

pub const SCHEMA: &str = "droptrace.v1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A packet of a watched flow dropped by the kernel.
    Drop,
    /// Events that could not be delivered (kernel ring buffer full, sink spool full, ...).
    Lost,
    /// One connection attempt that stalled, correlated across signals.
    Stall,
    /// An Oracle Net packet seen on a listener port.
    Tns,
    /// `--raw`: a TCP state change of a watched socket.
    TcpState,
    /// `--raw`: a TCP retransmission on a watched flow.
    Retransmit,
    /// `--raw`: a conntrack entry of a watched flow removed without a reply.
    Conntrack,
    /// A flood of drops toward one destination from many sources, as one incident.
    Storm,
    /// `--emit connects`: a connect to a watched port that succeeded.
    Connect,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Drop => "drop",
            Kind::Lost => "lost",
            Kind::Stall => "stall",
            Kind::Tns => "tns",
            Kind::TcpState => "tcp_state",
            Kind::Retransmit => "retransmit",
            Kind::Conntrack => "conntrack",
            Kind::Storm => "storm",
            Kind::Connect => "connect",
        }
    }
}

/// An event section that every event of a flow carries unchanged (who the endpoints are, what
/// the policy says): built once by the enrichment cache, cloned by reference count, and written
/// as JSON once, since escaping its strings again for every event was most of the cost of
/// encoding an enriched event. Only serde_json understands the cached form (its writer copies
/// it verbatim, `to_value` parses it): events are written with serde_json alone.
#[derive(Debug)]
pub struct Shared<T>(Arc<SharedInner<T>>);

#[derive(Debug)]
struct SharedInner<T> {
    value: T,
    json: OnceLock<Option<Box<serde_json::value::RawValue>>>,
}

impl<T> Shared<T> {
    pub fn new(value: T) -> Self {
        Self(Arc::new(SharedInner {
            value,
            json: OnceLock::new(),
        }))
    }
}

impl<T> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0.value
    }
}

impl<T: PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.value == other.0.value
    }
}

impl<T: Serialize> Serialize for Shared<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // The only holder and nothing cached (a replayed event's own section): written once,
        // so caching it would only cost a copy.
        if self.0.json.get().is_none() && Arc::strong_count(&self.0) == 1 {
            return self.0.value.serialize(s);
        }
        let raw = self
            .0
            .json
            .get_or_init(|| serde_json::value::to_raw_value(&self.0.value).ok());
        match raw {
            Some(raw) => raw.serialize(s),
            None => self.0.value.serialize(s),
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Shared<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        T::deserialize(d).map(Self::new)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// The large sections most events lack are boxed: an Event is built, moved and dropped once
// per kernel record, and a 1.5 KiB struct made those moves a measurable part of encoding.
// Identity and policy are `Shared` with the enrichment cache, which hands the same answer
// to every event of a flow.
pub struct Event {
    pub schema: String,
    pub kind: Kind,
    /// RFC 3339, UTC, microseconds.
    pub time: String,
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<Flow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Tcp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop: Option<Drop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ifindex: Option<u32>,
    /// How many occurrences this record stands for (drops aggregated in the kernel, events
    /// lost, ...).
    pub count: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<Lost>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_state: Option<StateChange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retransmit: Option<Retransmit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<Process>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<Attempt>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drops: Option<Vec<DropSummary>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack: Option<Box<Conntrack>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Shared<Endpoint>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Shared<Endpoint>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Shared<Policy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oracle: Option<Box<Oracle>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<Box<Storm>>,
}

impl Event {
    /// An event of `kind` with every optional section empty.
    pub fn new(kind: Kind, time: String, node: &str) -> Self {
        Self {
            schema: SCHEMA.to_string(),
            kind,
            time,
            node: node.to_string(),
            flow: None,
            tcp: None,
            drop: None,
            netns: None,
            ifindex: None,
            count: 1,
            lost: None,
            tcp_state: None,
            retransmit: None,
            process: None,
            attempt: None,
            drops: None,
            conntrack: None,
            diagnosis: None,
            source: None,
            destination: None,
            policy: None,
            oracle: None,
            storm: None,
        }
    }

    /// A `lost` record stamped now: `count` events from `source` that never made it.
    pub fn lost(
        node: &str,
        count: u64,
        source: LostSource,
        reason: &str,
        sink: Option<&str>,
    ) -> Self {
        let mut e = Self::new(Kind::Lost, crate::clock::now_rfc3339(), node);
        e.count = count;
        e.lost = Some(Lost {
            source,
            reason: reason.to_string(),
            sink: sink.map(str::to_string),
        });
        e
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Flow {
    /// "tcp"
    pub proto: String,
    pub family: Family,
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// Community ID v1 of the flow (direction independent; the same value Zeek, Suricata and
    /// Elastic compute), for joining with other sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_id: Option<String>,
}

impl Flow {
    /// The flow's Community ID: the one set when the event was made, or, for an event recorded
    /// without one, computed from the tuple; None for a storm record that folds one end (it
    /// has no one flow). Encoders and sinks take it from here and never compute their own.
    pub fn community_id_or_compute(&self) -> Option<String> {
        if self.community_id.is_some() || self.is_folded() {
            return self.community_id.clone();
        }
        crate::encode::community_id::tcp(self.src_ip, self.src_port, self.dst_ip, self.dst_port)
    }

    /// One end unspecified: a storm's many sources folded into one record (no one flow).
    pub fn is_folded(&self) -> bool {
        self.src_ip.is_unspecified() && self.src_port == 0
            || self.dst_ip.is_unspecified() && self.dst_port == 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tcp {
    /// The packet's flags, written as their names joined by '|', e.g. "SYN" or "SYN|ACK"; ""
    /// when none.
    pub flags: crate::decode::TcpFlags,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drop {
    /// Kernel drop reason without the SKB_DROP_REASON_ prefix, e.g. "NETFILTER_DROP";
    /// "UNAVAILABLE" on kernels before 5.17, which have none.
    pub reason: String,
    /// The running kernel's numeric value (numbers move between kernels; names do not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason_code: Option<u32>,
    /// network | local | unknown (see docs/events.md).
    #[serde(default = "unknown_class")]
    pub class: DropClass,
    /// Code that dropped it, `function+0xoffset`.
    pub location: String,
    /// The `storm` incident this record was folded into (its source is then unspecified).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<u64>,
}

/// One flood of drops toward a destination (`kind: storm`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Storm {
    /// Same for the `in_progress` record and the final record of one storm.
    pub id: u64,
    pub started: String,
    pub duration_ms: u64,
    /// in_progress | ended
    pub outcome: String,
    /// Drops toward the destination since the storm began (all records' counts).
    pub drops: u64,
    /// Most drops within one second.
    pub peak_per_sec: u64,
    pub sources: StormSources,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StormSources {
    /// Distinct source addresses seen (in full records or in the kernel's samples).
    pub distinct: u64,
    /// More sources than droptrace keeps per storm (65,536) were seen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub more: bool,
    /// `top[].drops` partly estimated from samples (one folded drop in 256 is sampled).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub estimated: bool,
    pub top: Vec<StormSource>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StormSource {
    pub ip: IpAddr,
    pub drops: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostSource {
    /// The kernel could not reserve ring buffer space.
    Kernel,
    /// A sink discarded events (queue and spool full).
    Sink,
    /// Input the daemon could not use (unparsable API object, malformed packet bytes, ...).
    Input,
    /// Connection attempts evicted from the full flow table before they ended.
    Correlation,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lost {
    pub source: LostSource,
    /// Why, e.g. "ringbuf_full", "spool_full".
    pub reason: String,
    /// The sink, for `source: sink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sink: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Process {
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_id: Option<String>,
    /// Pod UID from the process's cgroup path (kubepods slices), when it runs in a pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateChange {
    /// TCP state names of this kernel without the TCP_ prefix: SYN_SENT, ESTABLISHED, CLOSE, ...
    pub old: String,
    pub new: String,
    /// sk_err at the transition (111 ECONNREFUSED, 110 ETIMEDOUT, 113 EHOSTUNREACH), 0 if none.
    pub error: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retransmit {
    /// The socket's TCP state: SYN_SENT for a SYN retransmit.
    pub state: String,
    /// Oldest unacknowledged sequence number.
    pub snd_una: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// Same for the `in_progress` record and the final record of one attempt.
    pub id: u64,
    /// RFC 3339 time of the first SYN (or the first signal seen).
    pub started: String,
    pub syn_retransmits: u32,
    pub duration_ms: u64,
    /// timeout | refused | unreachable | established_late | abandoned | data_stalled |
    /// refused_by_listener | in_progress
    pub outcome: String,
    /// Data retransmits without acknowledgement (data_stalled).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub data_retransmits: u32,
    /// `connect` records: which end is on this node, "client" or "server".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<String>,
    /// The `storm` toward the same destination this attempt ran into, when it saw no drop of
    /// its own: its SYNs may be among the storm's folded drops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm: Option<u64>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

fn unknown_class() -> DropClass {
    DropClass::Unknown
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropSummary {
    pub reason: String,
    #[serde(default = "unknown_class")]
    pub class: DropClass,
    pub location: String,
    pub netns: u32,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuple {
    pub src_ip: IpAddr,
    pub src_port: u16,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// Community ID v1 of this tuple: the reply tuple's ID of a Service connect is the
    /// `flow.community_id` the destination's node reports for the same connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub community_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conntrack {
    /// NEW | ESTABLISHED | RELATED | INVALID | UNTRACKED
    pub state: String,
    /// SEEN_REPLY, ASSURED, DNAT, SNAT, ...
    pub status: Vec<String>,
    pub original: Tuple,
    pub reply: Tuple,
    /// "dnat", "snat", "both" or "none"
    pub nat: String,
    #[serde(default)]
    pub mark: u32,
    #[serde(default)]
    pub zone: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Workload {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Endpoint {
    pub ip: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_uid: Option<String>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub namespace: String,
    pub name: String,
    /// Index of the allowing rule; absent for isolating (denying) policies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    /// "allowed" | "denied"
    pub verdict: String,
    /// "egress" | "ingress": the direction the verdict is about (the denying one if any).
    pub direction: String,
    pub policies: Vec<PolicyRef>,
    pub explanation: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suggested_fix: Option<String>,
    /// The cluster re-evaluated with `suggested_fix` applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fix_check: Option<FixCheck>,
}

/// What applying a suggested fix would do: let the flow through, and what else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixCheck {
    /// The flow (its destination port) is allowed with the fix applied.
    pub allows_flow: bool,
    /// Every other connection (pod pair or address, port) the fix newly allows; empty when
    /// it is as narrow as it should be.
    pub newly_allowed: Vec<Admitted>,
    /// More were newly allowed than listed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
    /// The flow on the other ports the fix is for (e.g. an Oracle redirect port) that stay
    /// denied with it applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub still_denied: Vec<Admitted>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Admitted {
    /// `namespace/pod` or an address.
    pub from: String,
    pub to: String,
    pub port: u16,
    /// TCP, UDP or SCTP.
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refuse {
    pub code: Option<u32>,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Oracle {
    /// CONNECT | ACCEPT | REFUSE | REDIRECT | RESEND | DATA
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packet: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<Listener>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<HostPort>,
    /// Every port this listener redirected clients to on `redirect.host` (ascending), when it
    /// used more than one: dynamic ports (a Windows database without USE_SHARED_SOCKET,
    /// shared-server dispatchers without fixed ports). The suggested fix covers them with one
    /// `port` + `endPort` range.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redirect_ports: Vec<u16>,
    /// With `redirect_ports`: what to change on the Oracle side so the ports stop moving.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refuse: Option<Refuse>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_sections_write_the_same_json_as_their_value() {
        let ep = Endpoint {
            ip: Some("10.0.0.7".parse().unwrap()),
            namespace: Some("db".into()),
            pod: Some("oracle-0".into()),
            labels: [("app".to_string(), "ora\"cle\n".to_string())].into(),
            ..Endpoint::default()
        };
        let plain = serde_json::to_string(&ep).unwrap();
        let shared = Shared::new(ep.clone());
        let copy = shared.clone();
        // First write fills the cache, later writes (and clones) reuse it.
        assert_eq!(serde_json::to_string(&shared).unwrap(), plain);
        assert_eq!(serde_json::to_string(&copy).unwrap(), plain);
        assert_eq!(
            serde_json::to_value(&copy).unwrap(),
            serde_json::to_value(&ep).unwrap()
        );
        let back: Shared<Endpoint> = serde_json::from_str(&plain).unwrap();
        assert_eq!(*back, ep);
        assert!(back == shared);
    }

    #[test]
    fn tcp_flag_names() {
        assert_eq!(crate::decode::TcpFlags(0x02).to_string(), "SYN");
        assert_eq!(crate::decode::TcpFlags(0x12).to_string(), "SYN|ACK");
        assert_eq!(crate::decode::TcpFlags(0x14).to_string(), "ACK|RST");
        assert_eq!(crate::decode::TcpFlags(0x11).to_string(), "ACK|FIN");
        assert_eq!(crate::decode::TcpFlags(0).to_string(), "");
        let t: Tcp = serde_json::from_str(r#"{"flags":"SYN|ACK"}"#).unwrap();
        assert!(t.flags.is_syn_ack());
        assert_eq!(serde_json::to_string(&t).unwrap(), r#"{"flags":"SYN|ACK"}"#);
    }

    #[test]
    fn absent_sections_are_left_out() {
        let e = Event::new(Kind::Lost, "2026-01-01T00:00:00.000000Z".into(), "n1");
        let v = serde_json::to_value(&e).unwrap();
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["count", "kind", "node", "schema", "time"]);
    }
}
