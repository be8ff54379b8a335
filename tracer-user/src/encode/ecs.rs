//! droptrace.v1 -> Elastic Common Schema (ECS 8.x). Standard fields where ECS has them;
//! everything else (peer pod identity, kernel drop location, conntrack, ...) under the
//! vendor field set `droptrace.*`, which keeps the full droptrace.v1 sections.
use serde_json::{Value, json};

use super::{community_id, direction, message, prune, subject};
use crate::event::{Endpoint, Event, Family, Kind};

pub(super) const ECS_VERSION: &str = "8.17.0";

pub(super) fn map(e: &Event) -> Value {
    let (kind, category, types, outcome, action, reason) = classify(e);
    let flow = e.flow.as_ref();
    let subj = subject(e).map(|(_, ep)| ep);
    let mut v = json!({
        "@timestamp": e.time,
        "ecs": {"version": ECS_VERSION},
        "message": message(e),
        "event": {
            "kind": kind,
            "category": category,
            "type": types,
            "outcome": outcome,
            "action": action,
            "reason": reason,
            "module": "droptrace",
            "dataset": format!("droptrace.{}", e.kind.as_str()),
            "provider": "droptrace",
        },
        "host": {"name": e.node},
        "observer": {"hostname": e.node, "type": "sensor", "product": "droptrace", "vendor": "droptrace"},
        // A storm's folded end stands for many addresses: left out, not written as 0.0.0.0.
        "source": flow.filter(|f| !(f.src_ip.is_unspecified() && f.src_port == 0))
            .map(|f| json!({"ip": f.src_ip, "port": f.src_port})),
        "destination": flow.filter(|f| !(f.dst_ip.is_unspecified() && f.dst_port == 0))
            .map(|f| json!({"ip": f.dst_ip, "port": f.dst_port})),
        "network": flow.map(|f| json!({
            "transport": "tcp",
            "iana_number": "6",
            "type": match f.family { Family::Ipv4 => "ipv4", Family::Ipv6 => "ipv6" },
            "direction": direction(e),
            "community_id": community_id(f),
            "protocol": (e.kind == Kind::Tns).then_some("tns"),
        })),
        "process": e.process.as_ref().map(|p| json!({
            "pid": p.tgid,
            "name": p.comm,
            "thread": {"id": p.pid},
        })),
        "container": e.process.as_ref().and_then(|p| p.container_id.as_ref()).map(|id| json!({"id": id})),
        "orchestrator": subj.map(|ep| json!({
            "type": "kubernetes",
            "namespace": ep.namespace,
            "resource": {"type": "pod", "name": ep.pod},
        })),
        "kubernetes": subj.map(kubernetes),
        "rule": e.policy.as_ref().map(|p| json!({
            "ruleset": "kubernetes-networkpolicy",
            "name": p.policies.iter().map(|r| format!("{}/{}", r.namespace, r.name)).collect::<Vec<_>>().join(","),
            "category": p.verdict,
            "description": p.explanation,
        })),
    });
    prune(&mut v);
    v
}

type Class = (
    &'static str,
    [&'static str; 1],
    Vec<&'static str>,
    &'static str,
    String,
    Option<String>,
);

/// event.kind, category, type, outcome, action, reason.
fn classify(e: &Event) -> Class {
    match e.kind {
        Kind::Drop => (
            "event",
            ["network"],
            vec!["connection", "denied"],
            "failure",
            "packet_dropped".to_string(),
            e.drop.as_ref().map(|d| d.reason.clone()),
        ),
        Kind::Stall => {
            let outcome = e
                .attempt
                .as_ref()
                .map_or("in_progress", |a| a.outcome.as_str());
            let (types, result) = match outcome {
                "established_late" => (vec!["connection", "start"], "success"),
                "in_progress" => (vec!["connection", "info"], "unknown"),
                "refused" | "refused_by_listener" => (vec!["connection", "denied"], "failure"),
                _ => (vec!["connection", "end"], "failure"),
            };
            (
                "event",
                ["network"],
                types,
                result,
                format!("connection_{outcome}"),
                e.diagnosis.clone(),
            )
        }
        Kind::Tns => {
            let o = e.oracle.as_ref();
            let packet = o.and_then(|o| o.packet.as_deref()).unwrap_or("unknown");
            let (types, result) = match packet {
                "REFUSE" => (vec!["connection", "protocol", "denied"], "failure"),
                "ACCEPT" => (vec!["connection", "protocol", "allowed"], "success"),
                _ => (vec!["connection", "protocol"], "unknown"),
            };
            let reason = o.and_then(|o| o.refuse.as_ref()).map(|r| r.text.clone());
            (
                "event",
                ["network"],
                types,
                result,
                format!("tns_{}", packet.to_ascii_lowercase()),
                reason,
            )
        }
        Kind::Storm => (
            "event",
            ["network"],
            vec!["connection", "denied"],
            "failure",
            "drop_storm".to_string(),
            e.diagnosis.clone(),
        ),
        Kind::Connect => (
            "event",
            ["network"],
            vec!["connection", "start", "allowed"],
            "success",
            "connection_established".to_string(),
            None,
        ),
        // --raw per-signal records: context for an incident, not outcomes themselves.
        Kind::TcpState | Kind::Retransmit | Kind::Conntrack => (
            "event",
            ["network"],
            vec!["connection", "info"],
            "unknown",
            e.kind.as_str().to_string(),
            None,
        ),
        // Loss is a count about the pipeline, not a network event: ECS's `metric` kind.
        Kind::Lost => (
            "metric",
            ["host"],
            vec!["info"],
            "failure",
            "events_lost".to_string(),
            e.lost.as_ref().map(|l| l.reason.clone()),
        ),
    }
}

/// Beats' (non-ECS) kubernetes.* fields for the subject pod, what Elastic dashboards use.
fn kubernetes(ep: &Endpoint) -> Value {
    json!({
        "namespace": ep.namespace,
        "pod": {"name": ep.pod, "uid": ep.pod_uid},
        "labels": (!ep.labels.is_empty()).then_some(&ep.labels),
        "node": {"name": ep.node},
    })
}
