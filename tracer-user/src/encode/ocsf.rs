//! droptrace.v1 -> OCSF Network Activity (class_uid 4001). OCSF has no pod or namespace
//! attribute, so Kubernetes identity and the droptrace-specific sections go to `unmapped`.
use serde_json::{Value, json};

use super::{community_id, direction, message, prune, rfc3339_millis};
use crate::event::{Event, Family, Kind};

pub(super) const OCSF_VERSION: &str = "1.9.0";
const CLASS_UID: u32 = 4001;

pub(super) fn map(e: &Event) -> Value {
    let c = classify(e);
    let flow = e.flow.as_ref();
    let denied = e.kind == Kind::Drop || e.policy.as_ref().is_some_and(|p| p.verdict == "denied");
    let proc_container = e.process.as_ref().and_then(|p| p.container_id.as_ref());
    let direction_id = match direction(e) {
        Some("ingress") => 1,
        Some("egress") => 2,
        _ => 0,
    };
    let mut v = json!({
        "class_uid": CLASS_UID,
        "class_name": "Network Activity",
        "category_uid": 4,
        "category_name": "Network Activity",
        "activity_id": c.activity_id,
        "activity_name": c.activity_name,
        "type_uid": CLASS_UID * 100 + c.activity_id,
        "type_name": format!("Network Activity: {}", c.activity_name),
        "time": rfc3339_millis(&e.time).unwrap_or(0),
        "severity_id": c.severity_id,
        "severity": severity_name(c.severity_id),
        "status_id": c.status_id,
        "status": status_name(c.status_id),
        "status_detail": c.status_detail,
        "message": message(e),
        "count": e.count,
        "metadata": {
            "version": OCSF_VERSION,
            "product": {"name": "droptrace", "vendor_name": "droptrace"},
            "log_name": e.kind,
            "event_code": e.kind,
            "profiles": if denied { vec!["host", "security_control"] } else { vec!["host"] },
        },
        "device": {"hostname": e.node, "type_id": 1, "type": "Server"},
        "src_endpoint": match flow {
            // A storm's folded source stands for many addresses: left out.
            Some(f) if f.src_ip.is_unspecified() && f.src_port == 0 => Value::Null,
            Some(f) => json!({"ip": f.src_ip, "port": f.src_port}),
            // Lost events have no flow: the node that lost them is the only endpoint (the
            // class requires at least one).
            None => json!({"hostname": e.node}),
        },
        "dst_endpoint": flow.map(|f| json!({"ip": f.dst_ip, "port": f.dst_port})),
        "connection_info": flow.map(|f| json!({
            "protocol_num": 6,
            "protocol_name": "tcp",
            "protocol_ver_id": match f.family { Family::Ipv4 => 4, Family::Ipv6 => 6 },
            "direction_id": direction_id,
            "direction": direction_name(direction_id),
            "community_uid": community_id(f),
            "tcp_flags": e.tcp.as_ref().map(|t| u32::from(t.flags.0)),
        })),
        "actor": e.process.as_ref().map(|p| json!({
            "process": {
                "pid": p.tgid,
                "tid": p.pid,
                "name": p.comm,
                "container": proc_container.map(|id| json!({"uid": id})),
            },
        })),
        "action_id": denied.then_some(2),
        "action": denied.then_some("Denied"),
        "disposition_id": denied.then_some(if e.kind == Kind::Drop { 6 } else { 2 }),
        "disposition": denied.then_some(if e.kind == Kind::Drop { "Dropped" } else { "Blocked" }),
        "policy": e.policy.as_ref().map(|p| json!({
            "name": p.policies.iter().map(|r| format!("{}/{}", r.namespace, r.name)).collect::<Vec<_>>().join(","),
            "desc": p.explanation,
        })),
    });
    prune(&mut v);
    v
}

struct Class {
    activity_id: u32,
    activity_name: &'static str,
    severity_id: u32,
    status_id: u32,
    status_detail: Option<String>,
}

fn classify(e: &Event) -> Class {
    let class =
        |activity_id, activity_name, severity_id, status_id, detail: Option<&String>| Class {
            activity_id,
            activity_name,
            severity_id,
            status_id,
            status_detail: detail.cloned(),
        };
    match e.kind {
        // A dropped packet is traffic that never arrived; the disposition says "Dropped".
        Kind::Drop => class(6, "Traffic", 3, 2, e.drop.as_ref().map(|d| &d.reason)),
        Kind::Stall => {
            let outcome = e
                .attempt
                .as_ref()
                .map_or("in_progress", |a| a.outcome.as_str());
            let d = e.diagnosis.as_ref();
            match outcome {
                "refused" | "refused_by_listener" => class(5, "Refuse", 3, 2, d),
                "established_late" => class(1, "Open", 2, 1, d),
                "data_stalled" => class(6, "Traffic", 3, 2, d),
                "in_progress" => class(99, "Other", 1, 0, d),
                _ => class(4, "Fail", 3, 2, d),
            }
        }
        // Many sources' traffic dropped: Traffic, like a drop, with the summary as detail.
        Kind::Storm => class(6, "Traffic", 4, 2, e.diagnosis.as_ref()),
        Kind::Connect => class(1, "Open", 1, 1, None),
        // --raw per-signal records: informational context, activity Other.
        Kind::TcpState | Kind::Retransmit | Kind::Conntrack => class(99, "Other", 1, 0, None),
        Kind::Tns => {
            let o = e.oracle.as_ref();
            let refuse = o.and_then(|o| o.refuse.as_ref()).map(|r| &r.text);
            match o.and_then(|o| o.packet.as_deref()) {
                Some("REFUSE") => class(5, "Refuse", 2, 2, refuse),
                // The client's request: whether it opens is for the ACCEPT to say.
                Some("CONNECT") => class(1, "Open", 1, 0, None),
                Some("ACCEPT") => class(1, "Open", 1, 1, None),
                _ => class(6, "Traffic", 1, 0, None),
            }
        }
        // Telemetry loss: kept in 4001 (one class for the whole stream) as activity Other.
        Kind::Lost => class(99, "Other", 4, 2, e.lost.as_ref().map(|l| &l.reason)),
    }
}

fn severity_name(id: u32) -> &'static str {
    match id {
        1 => "Informational",
        2 => "Low",
        3 => "Medium",
        4 => "High",
        _ => "Unknown",
    }
}

fn status_name(id: u32) -> &'static str {
    match id {
        1 => "Success",
        2 => "Failure",
        _ => "Unknown",
    }
}

fn direction_name(id: u32) -> &'static str {
    match id {
        1 => "Inbound",
        2 => "Outbound",
        _ => "Unknown",
    }
}
