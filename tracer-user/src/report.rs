//! Decoded signals and correlated incidents as droptrace.v1 events.
use std::net::SocketAddr;

use crate::{
    clock::Clock,
    correlate::{Incident, Outcome},
    event::{self, Event, Kind},
    signal::{CtSignal, CtSnapshot, DropSignal, FlowKey, Owner, RetransmitSignal, StateSignal},
};

pub fn flow(k: &FlowKey) -> event::Flow {
    event::Flow {
        proto: "tcp".to_string(),
        family: if k.src.is_ipv6() {
            event::Family::Ipv6
        } else {
            event::Family::Ipv4
        },
        src_ip: k.src.ip(),
        src_port: k.src.port(),
        dst_ip: k.dst.ip(),
        dst_port: k.dst.port(),
        community_id: crate::encode::community_id::tcp(
            k.src.ip(),
            k.src.port(),
            k.dst.ip(),
            k.dst.port(),
        ),
    }
}

fn tuple(k: &FlowKey) -> event::Tuple {
    let (s, d): (SocketAddr, SocketAddr) = (k.src, k.dst);
    event::Tuple {
        src_ip: s.ip(),
        src_port: s.port(),
        dst_ip: d.ip(),
        dst_port: d.port(),
    }
}

pub fn conntrack(ct: &CtSnapshot) -> event::Conntrack {
    event::Conntrack {
        state: ct.state.clone(),
        status: ct.status.clone(),
        original: tuple(&ct.original),
        reply: tuple(&ct.reply),
        nat: ct.nat().to_string(),
        mark: ct.mark,
        zone: ct.zone,
    }
}

pub fn process(o: &Owner) -> event::Process {
    event::Process {
        pid: o.pid,
        tgid: o.tgid,
        comm: o.comm.clone(),
        cgroup_id: o.cgroup_id,
        container_id: o.container_id.clone(),
        pod_uid: o.pod_uid.clone(),
    }
}

pub fn drop_event(d: &DropSignal, clock: &Clock, node: &str) -> Event {
    let mut e = Event::new(Kind::Drop, clock.rfc3339(d.ts_ns), node);
    e.flow = Some(flow(&d.flow));
    e.tcp = Some(event::Tcp {
        flags: event::tcp_flags(d.tcp_flags),
    });
    e.drop = Some(event::Drop {
        reason: d.reason.clone(),
        reason_code: d.reason_code,
        location: d.location.clone(),
    });
    e.netns = Some(d.netns);
    e.ifindex = Some(d.ifindex);
    e.count = d.count;
    e.conntrack = d.ct.as_ref().map(|c| Box::new(conntrack(c)));
    e
}

pub fn state_event(s: &StateSignal, clock: &Clock, node: &str) -> Event {
    let mut e = Event::new(Kind::TcpState, clock.rfc3339(s.ts_ns), node);
    e.flow = Some(flow(&s.flow));
    e.tcp_state = Some(event::StateChange {
        old: s.old.name.clone(),
        new: s.new.name.clone(),
        error: s.sk_err,
    });
    e.netns = Some(s.netns);
    e.process = s.owner.as_ref().map(process);
    e
}

pub fn retransmit_event(r: &RetransmitSignal, clock: &Clock, node: &str) -> Event {
    let mut e = Event::new(Kind::Retransmit, clock.rfc3339(r.ts_ns), node);
    e.flow = Some(flow(&r.flow));
    e.retransmit = Some(event::Retransmit {
        state: r.state.name.clone(),
        snd_una: r.snd_una,
    });
    e.netns = Some(r.netns);
    e.process = r.owner.as_ref().map(process);
    e
}

pub fn conntrack_event(c: &CtSignal, clock: &Clock, node: &str) -> Event {
    let mut e = Event::new(Kind::Conntrack, clock.rfc3339(c.ts_ns), node);
    e.flow = Some(flow(&c.ct.original));
    e.conntrack = Some(Box::new(conntrack(&c.ct)));
    e.netns = Some(c.netns);
    e
}

pub fn stall_event(i: &Incident, clock: &Clock, node: &str) -> Event {
    let mut e = Event::new(Kind::Stall, clock.rfc3339(i.at_ns), node);
    e.flow = Some(flow(&i.flow));
    e.process = i.owner.as_ref().map(process);
    e.netns = (i.netns != 0).then_some(i.netns);
    e.attempt = Some(event::Attempt {
        id: i.id,
        started: clock.rfc3339(i.started_ns),
        syn_retransmits: i.syn_retransmits,
        duration_ms: i.at_ns.saturating_sub(i.started_ns) / 1_000_000,
        outcome: i.outcome.as_str().to_string(),
        data_retransmits: if i.outcome == Outcome::DataStalled {
            i.data_retransmits
        } else {
            0
        },
    });
    e.drops = Some(
        i.drops
            .iter()
            .map(|t| event::DropSummary {
                reason: t.reason.clone(),
                location: t.location.clone(),
                netns: t.netns,
                count: t.count,
            })
            .collect(),
    );
    e.conntrack = i.ct.as_ref().map(|c| Box::new(conntrack(c)));
    e.oracle = i.oracle.clone().map(Box::new);
    e.diagnosis = Some(i.diagnosis.clone());
    e
}

pub fn tns_event(
    flow: &FlowKey,
    oracle: event::Oracle,
    ts_ns: u64,
    clock: &Clock,
    node: &str,
) -> Event {
    let mut e = Event::new(Kind::Tns, clock.rfc3339(ts_ns), node);
    e.flow = Some(self::flow(flow));
    e.oracle = Some(Box::new(oracle));
    e
}
