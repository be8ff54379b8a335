//! droptrace.v1 -> OCSF Network Activity (class_uid 4001). OCSF has no pod or namespace
//! attribute, so Kubernetes identity and the droptrace-specific sections go to `unmapped`.
use super::{Sections, community_id, direction, json::Obj, rfc3339_millis, write_message};
use crate::event::{Event, Family, Kind};

pub(super) const OCSF_VERSION: &str = "1.9.0";
const CLASS_UID: u32 = 4001;

/// One OCSF line into `buf` (cleared first), members in sorted key order and the
/// droptrace.v1 sections last under `unmapped.droptrace`.
pub(super) fn write(e: &Event, buf: &mut Vec<u8>) {
    buf.clear();
    let c = classify(e);
    let flow = e.flow.as_ref();
    let denied = e.kind == Kind::Drop || e.policy.as_ref().is_some_and(|p| p.verdict == "denied");
    let proc_container = e.process.as_ref().and_then(|p| p.container_id.as_ref());
    let direction_id = match direction(e) {
        Some("ingress") => 1,
        Some("egress") => 2,
        _ => 0,
    };
    let mut o = Obj::open(buf);
    if denied {
        o.lit("action", "Denied");
        o.num("action_id", 2);
    }
    o.num("activity_id", c.activity_id.into());
    o.lit("activity_name", c.activity_name);
    if let Some(p) = e.process.as_ref() {
        o.obj("actor", |a| {
            a.obj("process", |x| {
                if let Some(id) = proc_container {
                    x.obj("container", |c| c.val("uid", id));
                }
                x.val("name", &p.comm);
                x.val("pid", &p.tgid);
                x.val("tid", &p.pid);
            });
        });
    }
    o.lit("category_name", "Network Activity");
    o.num("category_uid", 4);
    o.lit("class_name", "Network Activity");
    o.num("class_uid", CLASS_UID.into());
    if let Some(f) = flow {
        o.obj("connection_info", |x| {
            x.opt("community_uid", community_id(f));
            x.lit("direction", direction_name(direction_id));
            x.num("direction_id", direction_id.into());
            x.lit("protocol_name", "tcp");
            x.num("protocol_num", 6);
            x.num(
                "protocol_ver_id",
                match f.family {
                    Family::Ipv4 => 4,
                    Family::Ipv6 => 6,
                },
            );
            if let Some(t) = e.tcp.as_ref() {
                x.num("tcp_flags", i64::from(t.flags.0));
            }
        });
    }
    o.val("count", &e.count);
    o.obj("device", |d| {
        d.val("hostname", &e.node);
        d.lit("type", "Server");
        d.num("type_id", 1);
    });
    if denied {
        let drop = e.kind == Kind::Drop;
        o.lit("disposition", if drop { "Dropped" } else { "Blocked" });
        o.num("disposition_id", if drop { 6 } else { 2 });
    }
    if let Some(f) = flow {
        o.obj("dst_endpoint", |d| {
            d.val("ip", &f.dst_ip);
            d.val("port", &f.dst_port);
        });
    }
    super::MESSAGE.with_borrow_mut(|m| {
        write_message(e, m);
        o.val("message", m.as_str());
    });
    o.obj("metadata", |m| {
        m.val("event_code", &e.kind);
        m.val("log_name", &e.kind);
        m.obj("product", |p| {
            p.lit("name", "droptrace");
            p.lit("vendor_name", "droptrace");
        });
        let profiles: &[&str] = if denied {
            &["host", "security_control"]
        } else {
            &["host"]
        };
        m.lits("profiles", profiles);
        m.lit("version", OCSF_VERSION);
    });
    if let Some(p) = e.policy.as_ref() {
        o.obj("policy", |x| {
            x.val("desc", &p.explanation);
            x.val("name", &super::policy_names(&p.policies));
        });
    }
    o.lit("severity", severity_name(c.severity_id));
    o.num("severity_id", c.severity_id.into());
    match flow {
        // A storm's folded source stands for many addresses: left out.
        Some(f) if f.src_ip.is_unspecified() && f.src_port == 0 => {}
        Some(f) => o.obj("src_endpoint", |s| {
            s.val("ip", &f.src_ip);
            s.val("port", &f.src_port);
        }),
        // Lost events have no flow: the node that lost them is the only endpoint (the
        // class requires at least one).
        None => o.obj("src_endpoint", |s| s.val("hostname", &e.node)),
    }
    o.lit("status", status_name(c.status_id));
    o.opt("status_detail", c.status_detail);
    o.num("status_id", c.status_id.into());
    o.num("time", rfc3339_millis(&e.time).unwrap_or(0));
    o.lit_parts("type_name", &["Network Activity: ", c.activity_name]);
    o.num("type_uid", (CLASS_UID * 100 + c.activity_id).into());
    o.obj("unmapped", |u| u.val("droptrace", &Sections::of(e, true)));
    o.close();
}

struct Class<'a> {
    activity_id: u32,
    activity_name: &'static str,
    severity_id: u32,
    status_id: u32,
    status_detail: Option<&'a String>,
}

fn classify(e: &Event) -> Class<'_> {
    fn class<'a>(
        activity_id: u32,
        activity_name: &'static str,
        severity_id: u32,
        status_id: u32,
        status_detail: Option<&'a String>,
    ) -> Class<'a> {
        Class {
            activity_id,
            activity_name,
            severity_id,
            status_id,
            status_detail,
        }
    }
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
