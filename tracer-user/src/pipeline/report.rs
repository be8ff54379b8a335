//! Decoded signals and correlated incidents as droptrace.v1 events.
use std::net::SocketAddr;

use crate::{
    clock::Clock,
    correlate::{Connected, DropTally, Incident, Outcome, storm::StormIncident},
    decode::{CtSignal, CtSnapshot, DropSignal, FlowKey, Owner, RetransmitSignal, StateSignal},
    event::{self, Event, Kind},
};

pub fn flow(k: &FlowKey) -> event::Flow {
    // A folded storm record has no one flow: no Community ID.
    let community_id = if k.is_folded() {
        None
    } else {
        crate::encode::community_id::tcp(k.src.ip(), k.src.port(), k.dst.ip(), k.dst.port())
    };
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
        community_id,
    }
}

fn tuple(k: &FlowKey) -> event::Tuple {
    let (s, d): (SocketAddr, SocketAddr) = (k.src, k.dst);
    event::Tuple {
        src_ip: s.ip(),
        src_port: s.port(),
        dst_ip: d.ip(),
        dst_port: d.port(),
        community_id: crate::encode::community_id::tcp(s.ip(), s.port(), d.ip(), d.port()),
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
    e.tcp = Some(event::Tcp { flags: d.tcp_flags });
    e.drop = Some(event::Drop {
        reason: d.reason.clone(),
        reason_code: d.reason_code,
        class: d.class,
        location: d.location.clone(),
        storm: None,
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
        side: None,
        storm: i.storm,
    });
    e.drops = Some(i.drops.iter().map(drop_summary).collect());
    e.conntrack = i.ct.as_ref().map(|c| Box::new(conntrack(c)));
    e.oracle = i.oracle.clone().map(Box::new);
    e.diagnosis = Some(i.diagnosis.clone());
    e
}

fn drop_summary(t: &DropTally) -> event::DropSummary {
    event::DropSummary {
        reason: t.reason.clone(),
        class: t.class,
        location: t.location.clone(),
        netns: t.netns,
        count: t.count,
    }
}

/// A storm: the destination as the flow's `dst`, its source unspecified.
pub fn storm_event(s: &StormIncident, clock: &Clock, node: &str) -> Event {
    let mut e = Event::new(Kind::Storm, clock.rfc3339(s.at_ns), node);
    let any = match s.server.ip() {
        std::net::IpAddr::V4(_) => std::net::IpAddr::from([0u8; 4]),
        std::net::IpAddr::V6(_) => std::net::IpAddr::from([0u8; 16]),
    };
    e.flow = Some(flow(&FlowKey {
        src: SocketAddr::new(any, 0),
        dst: s.server,
    }));
    e.storm = Some(Box::new(event::Storm {
        id: s.id,
        started: clock.rfc3339(s.started_ns),
        duration_ms: s.at_ns.saturating_sub(s.started_ns) / 1_000_000,
        outcome: s.outcome.as_str().to_string(),
        drops: s.total,
        peak_per_sec: s.peak_per_sec,
        sources: event::StormSources {
            distinct: s.distinct_sources,
            more: s.other_sources,
            estimated: s.estimated,
            top: s
                .top
                .iter()
                .map(|t| event::StormSource {
                    ip: t.ip,
                    drops: t.drops,
                })
                .collect(),
        },
    }));
    e.drops = Some(s.drops.iter().map(drop_summary).collect());
    e.diagnosis = Some(s.diagnosis.clone());
    e
}

/// A connect that succeeded (`--emit connects`), client view.
pub fn connect_event(c: &Connected, clock: &Clock, node: &str) -> Event {
    let mut e = Event::new(Kind::Connect, clock.rfc3339(c.at_ns), node);
    e.flow = Some(flow(&c.flow));
    e.process = c.owner.as_ref().map(process);
    e.netns = (c.netns != 0).then_some(c.netns);
    e.attempt = Some(event::Attempt {
        id: c.id,
        started: clock.rfc3339(c.started_ns),
        syn_retransmits: c.syn_retransmits,
        duration_ms: c.at_ns.saturating_sub(c.started_ns) / 1_000_000,
        outcome: "established".to_string(),
        data_retransmits: 0,
        side: Some(c.side.as_str().to_string()),
        storm: None,
    });
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
