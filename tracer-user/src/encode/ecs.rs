//! droptrace.v1 -> Elastic Common Schema (ECS 8.x). Standard fields where ECS has them;
//! everything else (peer pod identity, kernel drop location, conntrack, ...) under the
//! vendor field set `droptrace.*`, which keeps the full droptrace.v1 sections.
use std::borrow::Cow;

use super::{Sections, community_id, direction, json::Obj, subject, write_message};
use crate::event::{Endpoint, Event, Family, Kind};

pub(super) const ECS_VERSION: &str = "8.17.0";

/// One ECS line into `buf` (cleared first), members in sorted key order and the
/// droptrace.v1 sections last under `droptrace`.
pub(super) fn write(e: &Event, buf: &mut Vec<u8>) {
    buf.clear();
    let (kind, category, types, outcome, action, reason) = classify(e);
    let flow = e.flow.as_ref();
    let subj = subject(e).map(|(_, ep)| ep);
    let mut o = Obj::open(buf);
    o.val("@timestamp", &e.time);
    if let Some(id) = e.process.as_ref().and_then(|p| p.container_id.as_ref()) {
        o.obj("container", |c| c.val("id", id));
    }
    // A storm's folded end stands for many addresses: left out, not written as 0.0.0.0.
    if let Some(f) = flow.filter(|f| !(f.dst_ip.is_unspecified() && f.dst_port == 0)) {
        o.obj("destination", |d| {
            d.val("ip", &f.dst_ip);
            d.val("port", &f.dst_port);
        });
    }
    o.obj("ecs", |x| x.lit("version", ECS_VERSION));
    o.obj("event", |x| {
        x.val("action", action.as_ref());
        x.lits("category", &category);
        x.lit_parts("dataset", &["droptrace.", e.kind.as_str()]);
        x.lit("kind", kind);
        x.lit("module", "droptrace");
        x.lit("outcome", outcome);
        x.lit("provider", "droptrace");
        x.opt("reason", reason);
        x.lits("type", types);
    });
    o.obj("host", |h| h.val("name", &e.node));
    if let Some(ep) = subj {
        o.obj("kubernetes", |k| kubernetes(ep, k));
    }
    super::MESSAGE.with_borrow_mut(|m| {
        write_message(e, m);
        o.val("message", m.as_str());
    });
    if let Some(f) = flow {
        o.obj("network", |n| {
            n.opt("community_id", community_id(f));
            n.opt("direction", direction(e));
            n.lit("iana_number", "6");
            if e.kind == Kind::Tns {
                n.lit("protocol", "tns");
            }
            n.lit("transport", "tcp");
            n.lit(
                "type",
                match f.family {
                    Family::Ipv4 => "ipv4",
                    Family::Ipv6 => "ipv6",
                },
            );
        });
    }
    o.obj("observer", |x| {
        x.val("hostname", &e.node);
        x.lit("product", "droptrace");
        x.lit("type", "sensor");
        x.lit("vendor", "droptrace");
    });
    if let Some(ep) = subj {
        o.obj("orchestrator", |x| {
            x.opt("namespace", ep.namespace.as_ref());
            x.obj("resource", |r| {
                r.opt("name", ep.pod.as_ref());
                r.lit("type", "pod");
            });
            x.lit("type", "kubernetes");
        });
    }
    if let Some(p) = e.process.as_ref() {
        o.obj("process", |x| {
            x.val("name", &p.comm);
            x.val("pid", &p.tgid);
            x.obj("thread", |t| t.val("id", &p.pid));
        });
    }
    if let Some(p) = e.policy.as_ref() {
        o.obj("rule", |x| {
            x.val("category", &p.verdict);
            x.val("description", &p.explanation);
            x.val("name", &super::policy_names(&p.policies));
            x.lit("ruleset", "kubernetes-networkpolicy");
        });
    }
    if let Some(f) = flow.filter(|f| !(f.src_ip.is_unspecified() && f.src_port == 0)) {
        o.obj("source", |s| {
            s.val("ip", &f.src_ip);
            s.val("port", &f.src_port);
        });
    }
    o.val("droptrace", &Sections::of(e, false));
    o.close();
}

type Class<'a> = (
    &'static str,
    [&'static str; 1],
    &'static [&'static str],
    &'static str,
    Cow<'static, str>,
    Option<&'a str>,
);

/// event.kind, category, type, outcome, action, reason (borrowed: nothing is allocated but
/// the actions made from the event's own words).
fn classify(e: &Event) -> Class<'_> {
    match e.kind {
        Kind::Drop => (
            "event",
            ["network"],
            &["connection", "denied"],
            "failure",
            Cow::Borrowed("packet_dropped"),
            e.drop.as_ref().map(|d| d.reason.as_str()),
        ),
        Kind::Stall => {
            let outcome = e
                .attempt
                .as_ref()
                .map_or("in_progress", |a| a.outcome.as_str());
            let (types, result): (&'static [&'static str], _) = match outcome {
                "established_late" => (&["connection", "start"], "success"),
                "in_progress" => (&["connection", "info"], "unknown"),
                "refused" | "refused_by_listener" => (&["connection", "denied"], "failure"),
                _ => (&["connection", "end"], "failure"),
            };
            (
                "event",
                ["network"],
                types,
                result,
                Cow::Owned(format!("connection_{outcome}")),
                e.diagnosis.as_deref(),
            )
        }
        Kind::Tns => {
            let o = e.oracle.as_ref();
            let packet = o.and_then(|o| o.packet.as_deref()).unwrap_or("unknown");
            let (types, result): (&'static [&'static str], _) = match packet {
                "REFUSE" => (&["connection", "protocol", "denied"], "failure"),
                "ACCEPT" => (&["connection", "protocol", "allowed"], "success"),
                _ => (&["connection", "protocol"], "unknown"),
            };
            let reason = o.and_then(|o| o.refuse.as_ref()).map(|r| r.text.as_str());
            (
                "event",
                ["network"],
                types,
                result,
                Cow::Owned(format!("tns_{}", packet.to_ascii_lowercase())),
                reason,
            )
        }
        Kind::Storm => (
            "event",
            ["network"],
            &["connection", "denied"],
            "failure",
            Cow::Borrowed("drop_storm"),
            e.diagnosis.as_deref(),
        ),
        Kind::Connect => (
            "event",
            ["network"],
            &["connection", "start", "allowed"],
            "success",
            Cow::Borrowed("connection_established"),
            None,
        ),
        // --raw per-signal records: context for an incident, not outcomes themselves.
        Kind::TcpState | Kind::Retransmit | Kind::Conntrack => (
            "event",
            ["network"],
            &["connection", "info"],
            "unknown",
            Cow::Borrowed(e.kind.as_str()),
            None,
        ),
        // Loss is a count about the pipeline, not a network event: ECS's `metric` kind.
        Kind::Lost => (
            "metric",
            ["host"],
            &["info"],
            "failure",
            Cow::Borrowed("events_lost"),
            e.lost.as_ref().map(|l| l.reason.as_str()),
        ),
    }
}

/// Beats' (non-ECS) kubernetes.* fields for the subject pod, what Elastic dashboards use.
fn kubernetes(ep: &Endpoint, k: &mut Obj) {
    if !ep.labels.is_empty() {
        k.val("labels", &ep.labels);
    }
    k.opt("namespace", ep.namespace.as_ref());
    k.obj("node", |n| n.opt("name", ep.node.as_ref()));
    k.obj("pod", |p| {
        p.opt("name", ep.pod.as_ref());
        p.opt("uid", ep.pod_uid.as_ref());
    });
}
