//! The pipeline fed raw kernel records and ticks, as the run loop feeds it, without a kernel.
use std::collections::HashMap;

use tracer_common::{
    AF_INET, CtInfo, DropEvent, EventHeader, Flow, IPPROTO_TCP, StateEvent, StormSample, kind,
};

use super::*;
use crate::{
    collect::conntrack::CtNames,
    decode::{FlowKey, testing::key},
    kernel::kallsyms::Kallsyms,
};

const MS: u64 = 1_000_000;
const S: u64 = 1_000_000_000;
const NETFILTER_DROP: u32 = 12;
const QUEUE_PURGE: u32 = 104;
const PACKET_SOCK_ERROR: u32 = 76;
const NFT_DO_CHAIN: u64 = 0xffffffff81f81c50 + 0x46f;
const SK_STREAM_KILL_QUEUES: u64 = 0xffffffff81a00000 + 0x5d;
const SYN: u8 = 0x02;
const ACK_FIN: u8 = 0x11;

fn symbols() -> Symbols {
    Symbols {
        kallsyms: Kallsyms::parse(
            "ffffffff81a00000 T sk_stream_kill_queues\nffffffff81f81c50 T nft_do_chain\n",
        ),
        drop_reasons: HashMap::from([
            (2, "NOT_SPECIFIED".to_string()),
            (NETFILTER_DROP, "NETFILTER_DROP".to_string()),
            (QUEUE_PURGE, "QUEUE_PURGE".to_string()),
            (PACKET_SOCK_ERROR, "PACKET_SOCK_ERROR".to_string()),
        ]),
        tcp_states: [
            (1, "ESTABLISHED"),
            (2, "SYN_SENT"),
            (3, "SYN_RECV"),
            (4, "FIN_WAIT1"),
            (7, "CLOSE"),
            (10, "LISTEN"),
        ]
        .into_iter()
        .map(|(v, n)| (v, n.to_string()))
        .collect(),
        ct: CtNames::from_parts(&[(2, "NEW"), (3, "ESTABLISHED")], &[(5, "DNAT")]),
        ..Symbols::default()
    }
}

struct NoHost;

impl Host for NoHost {
    fn process_identity(&self, _: u32) -> (Option<String>, Option<String>) {
        (None, None)
    }
}

fn pipeline(emit: Emit) -> Pipeline {
    let mut cfg = Config::new("node-a", &[1521]);
    cfg.emit = emit;
    Pipeline::new(cfg, Clock::new(), symbols(), Box::new(NoHost))
}

fn bytes<T: Copy>(rec: &T) -> Vec<u8> {
    // SAFETY: T is a repr(C) plain-data record; its bytes are what the ring buffer carries.
    unsafe { std::slice::from_raw_parts((rec as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
}

fn flow(k: FlowKey) -> Flow {
    let mut f = Flow {
        sport: k.src.port(),
        dport: k.dst.port(),
        family: AF_INET,
        proto: IPPROTO_TCP,
        ..Flow::default()
    };
    if let (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) = (k.src.ip(), k.dst.ip()) {
        f.saddr[..4].copy_from_slice(&s.octets());
        f.daddr[..4].copy_from_slice(&d.octets());
    }
    f
}

fn header(kind: u8, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind,
        ts_ns,
        ..EventHeader::default()
    }
}

fn state(ts_ns: u64, sk: u64, local_first: FlowKey, old: u32, new: u32, err: i32) -> Vec<u8> {
    bytes(&StateEvent {
        hdr: header(kind::STATE, ts_ns),
        sk,
        flow: flow(local_first),
        oldstate: old,
        newstate: new,
        sk_err: err,
        netns: 4026532001,
        has_owner: 1,
        owner: python(),
        ..StateEvent::default()
    })
}

/// The connecting process the state and retransmit records name.
fn python() -> tracer_common::Owner {
    tracer_common::Owner {
        pid: 4242,
        tgid: 4242,
        cgroup_id: 9,
        comm: *b"python\0\0\0\0\0\0\0\0\0\0",
    }
}

/// The kernel's folded record of a storm of new flows toward `server` (source unspecified).
fn folded_drop(ts_ns: u64, server: &str, reason: u32) -> DropEvent {
    drop_rec(ts_ns, key("0.0.0.0:0", server), SYN, reason, NFT_DO_CHAIN)
}

fn drop_rec(ts_ns: u64, f: FlowKey, flags: u8, reason: u32, location: u64) -> DropEvent {
    DropEvent {
        hdr: header(kind::DROP, ts_ns),
        location,
        flow: flow(f),
        reason,
        len: 60,
        netns: 4026532002,
        ifindex: 2,
        tcp_flags: flags,
        count: 1,
        ..DropEvent::default()
    }
}

/// A conntrack entry of a Service DNAT: original client -> service, reply pod -> client.
fn dnat(original: FlowKey, pod: std::net::SocketAddr) -> CtInfo {
    let o = flow(original);
    let r = flow(FlowKey {
        src: pod,
        dst: original.src,
    });
    CtInfo {
        present: 1,
        ctinfo: 2,
        family: AF_INET,
        protonum: IPPROTO_TCP,
        status: 1 << 5,
        original: tracer_common::CtTuple {
            saddr: o.saddr,
            daddr: o.daddr,
            sport: o.sport,
            dport: o.dport,
            _pad: 0,
        },
        reply: tracer_common::CtTuple {
            saddr: r.saddr,
            daddr: r.daddr,
            sport: r.sport,
            dport: r.dport,
            _pad: 0,
        },
        ..CtInfo::default()
    }
}

fn streamed(p: &mut Pipeline) -> Vec<Event> {
    p.drain().filter(|o| o.stream).map(|o| o.event).collect()
}

fn of_kind(events: &[Event], kind: Kind) -> Vec<&Event> {
    events.iter().filter(|e| e.kind == kind).collect()
}

fn entry(rec: &DropEvent, repeats: u64, last_ns: u64) -> AggEntry {
    AggEntry {
        key: drops::agg_key(rec),
        repeats,
        last_ns,
        netns: rec.netns,
        ifindex: rec.ifindex,
        tcp_flags: rec.tcp_flags,
        redirected: rec.redirected != 0,
    }
}

#[test]
fn service_dnat_first_drop_and_aggregated_repeats_are_one_attempt_with_count_3() {
    let mut p = pipeline(Emit::default());
    let to_service = key("10.202.1.1:40000", "10.204.1.10:1521");
    let pod: std::net::SocketAddr = "10.203.1.2:1521".parse().unwrap();
    let to_pod = FlowKey {
        src: to_service.src,
        dst: pod,
    };
    p.record(&state(0, 1, to_service, 7, 2, 0));
    // The first SYN dropped on the router after DNAT: the packet names the pod, its
    // conntrack entry the service.
    let mut first = drop_rec(MS, to_pod, SYN, NETFILTER_DROP, NFT_DO_CHAIN);
    first.ct = dnat(to_service, pod);
    p.record(&bytes(&first));
    // The two retransmits are counted in the kernel only; their records come from a flush
    // of the aggregation map, without a conntrack entry of their own.
    p.repeats(2 * S, &[entry(&first, 2, 2 * S)]);
    p.record(&state(3 * S, 1, to_service, 2, 7, 110));
    p.tick(3 * S + 300 * MS);

    let out = streamed(&mut p);
    let drops = of_kind(&out, Kind::Drop);
    assert_eq!(drops.len(), 2, "{out:#?}");
    assert_eq!(drops.iter().map(|e| e.count).sum::<u64>(), 3);
    assert!(
        drops.iter().all(|e| e.conntrack.is_some()),
        "repeats carry the first record's conntrack entry: {drops:#?}"
    );
    let stalls = of_kind(&out, Kind::Stall);
    assert_eq!(
        stalls.len(),
        1,
        "one incident, none toward the pod: {stalls:#?}"
    );
    let s = stalls[0];
    let f = s.flow.as_ref().unwrap();
    assert_eq!(f.dst_ip.to_string(), "10.204.1.10");
    assert_eq!(s.attempt.as_ref().unwrap().outcome, "timeout");
    let tallies = s.drops.as_ref().unwrap();
    assert_eq!(tallies.len(), 1);
    assert_eq!(tallies[0].count, 3);
    let ct = s.conntrack.as_ref().unwrap();
    assert_eq!(ct.nat, "dnat");
    // The join key across nodes: the reply tuple's ID is the pod-side flow's ID.
    assert_eq!(
        ct.reply.community_id,
        drops[0].flow.as_ref().unwrap().community_id
    );
    assert!(
        s.diagnosis
            .as_deref()
            .unwrap()
            .starts_with("SYN to 10.204.1.10:1521 (DNAT to 10.203.1.2:1521) dropped 3 times"),
        "{:?}",
        s.diagnosis
    );
}

#[test]
fn queue_purge_at_close_is_not_in_the_default_stream_but_is_counted() {
    let mut p = pipeline(Emit::default());
    let c = key("10.201.1.1:40000", "10.201.1.2:1521");
    p.record(&state(0, 1, c, 7, 2, 0));
    p.record(&state(MS, 2, c.reversed(), 10, 3, 0));
    p.record(&state(MS, 1, c, 2, 1, 0));
    p.record(&state(MS, 2, c.reversed(), 3, 1, 0));
    // The server closes with data unread: its queue is purged, a FIN freed with a reason.
    let mut purge = drop_rec(
        50 * MS,
        c.reversed(),
        ACK_FIN,
        QUEUE_PURGE,
        SK_STREAM_KILL_QUEUES,
    );
    purge.ifindex = 0;
    p.record(&bytes(&purge));
    p.record(&state(60 * MS, 1, c, 1, 4, 0));
    p.record(&state(70 * MS, 1, c, 4, 7, 0));
    p.tick(10 * S);

    let all: Vec<Output> = p.drain().collect();
    let stream: Vec<&Output> = all.iter().filter(|o| o.stream).collect();
    assert!(
        stream.is_empty(),
        "a healthy session is silent: {stream:#?}"
    );
    let purged = all
        .iter()
        .find(|o| o.event.kind == Kind::Drop)
        .expect("the purge is still an event, held back");
    assert_eq!(
        purged.event.drop.as_ref().unwrap().class,
        DropClass::Local,
        "{purged:#?}"
    );
    assert_eq!(p.summary().drops_by_class[&DropClass::Local], 1);
    assert_eq!(p.summary().held_back["drop"], 1);
}

#[test]
fn a_session_seen_from_both_ends_is_one_connect_record_with_emit_connects() {
    let mut p = pipeline(Emit::parse("connects").unwrap());
    let c = key("10.201.1.1:40000", "10.201.1.2:1521");
    p.record(&state(0, 1, c, 7, 2, 0));
    p.record(&state(MS, 2, c.reversed(), 10, 3, 0));
    p.record(&state(2 * MS, 1, c, 2, 1, 0));
    p.record(&state(2 * MS, 2, c.reversed(), 3, 1, 0));
    let out = streamed(&mut p);
    let connects = of_kind(&out, Kind::Connect);
    assert_eq!(connects.len(), 1, "{out:#?}");
    let a = connects[0].attempt.as_ref().unwrap();
    assert_eq!(a.side.as_deref(), Some("client"));
    assert_eq!(a.outcome, "established");
    assert_eq!(connects[0].flow.as_ref().unwrap().dst_port, 1521);
    assert_eq!(out.len(), 1, "nothing else: {out:#?}");
}

/// What the kernel sends for a random-source SYN flood: the first new flows of each second
/// as records of their own, then one folded aggregate (source unspecified) whose repeats are
/// counted in the map, with a sampled real source every 256 folded drops.
#[test]
fn random_source_flood_is_one_storm_with_exact_counts() {
    let mut p = pipeline(Emit::default());
    let server = "10.201.7.2:1521";
    let mut total = 0;
    for i in 0..300u32 {
        let src = format!(
            "198.{}.{}.{}:{}",
            18 + i / 65536,
            (i / 256) % 256,
            i % 256,
            1024 + i
        );
        let rec = drop_rec(
            u64::from(i) * MS,
            key(&src, server),
            SYN,
            NETFILTER_DROP,
            NFT_DO_CHAIN,
        );
        p.record(&bytes(&rec));
        total += 1;
    }
    let folded = folded_drop(400 * MS, server, NETFILTER_DROP);
    p.record(&bytes(&folded));
    total += 1;
    for i in 0..10u8 {
        let sample = StormSample {
            hdr: header(kind::STORM_SAMPLE, 500 * MS),
            folded: folded.flow,
            flow: flow(key(&format!("203.0.113.{}:999", i % 3), server)),
        };
        p.record(&bytes(&sample));
    }
    p.repeats(S, &[entry(&folded, 100_000, S)]);
    total += 100_000;
    p.tick(S + 200 * MS);
    p.tick(5 * S);

    let out = streamed(&mut p);
    assert!(
        of_kind(&out, Kind::Stall).is_empty(),
        "no stall per spoofed source"
    );
    let drops = of_kind(&out, Kind::Drop);
    assert!(drops.len() <= 40, "{} drop records", drops.len());
    assert_eq!(drops.iter().map(|e| e.count).sum::<u64>(), total);
    let storms = of_kind(&out, Kind::Storm);
    assert_eq!(storms.len(), 2, "in progress, then ended: {storms:#?}");
    let (s0, s1) = (
        storms[0].storm.as_ref().unwrap(),
        storms[1].storm.as_ref().unwrap(),
    );
    assert_eq!(s0.id, s1.id);
    assert_eq!(
        (s0.outcome.as_str(), s1.outcome.as_str()),
        ("in_progress", "ended")
    );
    assert_eq!(s1.drops, total, "every drop toward the destination");
    assert!(s1.sources.distinct >= 300, "{:?}", s1.sources);
    assert_eq!(s1.sources.top[0].ip.to_string(), "203.0.113.0");
    assert!(
        drops
            .iter()
            .filter(|e| e.flow.as_ref().unwrap().src_ip.is_unspecified())
            .all(|e| e.drop.as_ref().unwrap().storm == Some(s1.id))
    );
    assert_eq!(storms[1].flow.as_ref().unwrap().dst_port, 1521);
    assert_eq!(p.tracked(), (0, 0), "nothing left behind");
}

#[test]
fn a_local_client_during_a_storm_is_still_its_own_incident() {
    let mut p = pipeline(Emit::default());
    let server = "10.201.7.2:1521";
    let folded = folded_drop(0, server, NETFILTER_DROP);
    p.record(&bytes(&folded));
    // sqlplus on this node connects into the flood; its SYNs are dropped too.
    let c = key("10.201.7.1:40000", server);
    p.record(&state(10 * MS, 1, c, 7, 2, 0));
    let own = drop_rec(11 * MS, c, SYN, NETFILTER_DROP, NFT_DO_CHAIN);
    p.record(&bytes(&own));
    p.record(&state(3 * S, 1, c, 2, 7, 110));
    p.tick(3 * S + 100 * MS);
    let out = streamed(&mut p);
    let stalls = of_kind(&out, Kind::Stall);
    assert_eq!(stalls.len(), 1, "{out:#?}");
    assert_eq!(stalls[0].drops.as_ref().unwrap()[0].count, 1);
    assert!(
        of_kind(&out, Kind::Drop)
            .iter()
            .any(|d| d.flow.as_ref().unwrap().src_port == 40000),
        "its own drop is its own record"
    );
}

/// Seen in CI: during a random-source flood a packet socket (a sniffer's ring) on the host
/// could not take its copy of one SYN (PACKET_SOCK_ERROR), and the kernel folded that copy
/// toward the flooded destination too. The SYN itself went on; the storm counts what the
/// network dropped, so its total stays the firewall's and the copy is a held-back local drop.
#[test]
fn a_sniffers_dropped_copy_is_not_part_of_the_storm() {
    let mut p = pipeline(Emit::default());
    let server = "10.201.7.2:1521";
    let folded = folded_drop(0, server, NETFILTER_DROP);
    p.record(&bytes(&folded));
    let copy = folded_drop(5 * MS, server, PACKET_SOCK_ERROR);
    p.record(&bytes(&copy));
    p.repeats(S, &[entry(&folded, 999, S)]);
    p.tick(5 * S);
    let out = streamed(&mut p);
    let storms = of_kind(&out, Kind::Storm);
    let ended = storms.last().and_then(|e| e.storm.as_ref()).unwrap();
    assert_eq!(ended.outcome, "ended", "{storms:#?}");
    assert_eq!(ended.drops, 1000, "the firewall's drops only: {storms:#?}");
    let reasons: Vec<&str> = storms
        .last()
        .unwrap()
        .drops
        .iter()
        .flatten()
        .map(|t| t.reason.as_str())
        .collect();
    assert_eq!(reasons, ["NETFILTER_DROP"]);
    let drops = of_kind(&out, Kind::Drop);
    assert_eq!(drops.iter().map(|e| e.count).sum::<u64>(), ended.drops);
    assert_eq!(p.summary().drops_by_class.get(&DropClass::Local), Some(&1));
}

#[test]
fn without_a_reason_field_drops_are_classed_by_location() {
    let mut p = pipeline(Emit::default());
    let c = key("10.201.1.1:40000", "10.201.1.2:1521");
    let rec = drop_rec(0, c, SYN, tracer_common::ABSENT, NFT_DO_CHAIN);
    p.record(&bytes(&rec));
    let out = streamed(&mut p);
    let d = out[0].drop.as_ref().unwrap();
    assert_eq!(d.reason, "UNAVAILABLE");
    assert_eq!(d.reason_code, None);
    assert_eq!(d.class, DropClass::Network);
}

#[test]
fn truncated_records_are_counted_not_decoded() {
    let mut p = pipeline(Emit::default());
    let rec = bytes(&drop_rec(0, key("10.0.0.1:1", "10.0.0.2:1521"), SYN, 12, 0));
    p.record(&rec[..rec.len() - 1]);
    p.record(&[kind::DROP]);
    p.record(&[99; 64]);
    assert_eq!(p.summary().undecodable, 3);
    assert!(streamed(&mut p).is_empty());
}

/// A captured TNS packet of `data`, sent by `from` to `to`.
fn tns(ts_ns: u64, from: FlowKey, seq: u32, data: &[u8]) -> Vec<u8> {
    let mut rec = tracer_common::TnsEvent {
        hdr: header(kind::TNS, ts_ns),
        flow: flow(from),
        seq,
        payload_len: data.len() as u32,
        captured: data.len().min(tracer_common::TNS_CAPTURE) as u32,
        direction: 1,
        data: [0; tracer_common::TNS_CAPTURE],
    };
    let n = rec.captured as usize;
    rec.data[..n].copy_from_slice(&data[..n]);
    bytes(&rec)
}

/// The dynamic-port scenario's cluster: the database admits the app namespace on the listener
/// port only.
const DYNAMIC_PORTS_SNAPSHOT: &str = include_str!("../../tests/fixtures/explain/snapshot.yaml");

/// A Windows database without USE_SHARED_SOCKET: its listener sends each session to a new
/// port, and the policy admits only the listener port. Each second leg stalls; the later
/// ones carry every port the listener used, the Oracle-side remedy, and a fix covering the
/// ports with one port + endPort range that fix_check proves.
#[test]
fn a_listener_handing_out_different_ports_gets_a_port_range_fix_and_the_oracle_remedy() {
    use crate::{
        decode::oracle::tns::build,
        enrich::identity::Identity,
        enrich::k8s::{
            DEFAULT_IP_HISTORY,
            snapshot::{Mode, Snapshot},
        },
    };
    let mut p = pipeline(Emit::default());
    let listener: std::net::SocketAddr = "10.203.1.2:1521".parse().unwrap();
    let connect = include_bytes!("../../tests/fixtures/tns/python-oracledb-26.1.0-connect.bin");
    let ports = [40311u16, 40123, 40200];
    let mut stalls = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let t0 = i as u64 * 30 * S;
        let src_port = 40000 + i as u16;
        let to_listener = key(&format!("10.202.1.1:{src_port}"), "10.203.1.2:1521");
        let seq = 1000 * (i as u32 + 1);
        p.record(&tns(t0, to_listener, seq, connect));
        let redirect = build::redirect_split(
            format!("(ADDRESS=(PROTOCOL=TCP)(HOST=10.203.1.2)(PORT={port}))\0(DESCRIPTION=)")
                .as_bytes(),
        );
        p.record(&tns(t0 + MS, to_listener.reversed(), seq + 7, &redirect));
        let leg = key(
            &format!("10.202.1.1:{}", src_port + 100),
            &format!("10.203.1.2:{port}"),
        );
        let sk = 10 + i as u64;
        p.record(&state(t0 + 2 * MS, sk, leg, 7, 2, 0));
        p.record(&bytes(&drop_rec(
            t0 + 3 * MS,
            leg,
            SYN,
            NETFILTER_DROP,
            NFT_DO_CHAIN,
        )));
        p.record(&state(t0 + 3 * S, sk, leg, 2, 7, 110));
        p.tick(t0 + 3 * S + 300 * MS);
        let out = streamed(&mut p);
        let s: Vec<Event> = of_kind(&out, Kind::Stall).into_iter().cloned().collect();
        assert_eq!(s.len(), 1, "{out:#?}");
        stalls.push(s[0].clone());
    }
    // The first leg: one port seen, nothing dynamic yet.
    let first = stalls[0].oracle.as_ref().unwrap();
    assert_eq!(first.redirect.as_ref().unwrap().port, 40311);
    assert!(first.redirect_ports.is_empty() && first.remedy.is_none());
    // Later legs: every port seen so far, ascending.
    let second = stalls[1].oracle.as_ref().unwrap();
    assert_eq!(second.redirect_ports, [40123, 40311]);
    let last = stalls[2].oracle.as_ref().unwrap();
    assert_eq!(last.redirect_ports, [40123, 40200, 40311]);
    assert_eq!(last.listener.as_ref().unwrap().port, listener.port());
    let remedy = last.remedy.as_deref().unwrap();
    assert!(
        remedy.starts_with(
            "listener 10.203.1.2:1521 redirected clients to 3 different ports on 10.203.1.2 \
             (40123, 40200, 40311)"
        ) && remedy.contains("USE_SHARED_SOCKET=TRUE")
            && remedy.contains("DISPATCHERS=\"(ADDRESS=(PROTOCOL=TCP)(PORT=40123))\""),
        "{remedy}"
    );

    // Enriched against the cluster: the fix covers the three ports with one range.
    let cluster = Snapshot::parse(DYNAMIC_PORTS_SNAPSHOT, Mode::Strict)
        .unwrap()
        .into_cluster(crate::enrich::model::now(), DEFAULT_IP_HISTORY);
    let mut id = Identity::from_cluster(cluster);
    let mut e = stalls[2].clone();
    id.enrich(&mut e);
    let policy = e.policy.as_ref().unwrap();
    assert_eq!(policy.verdict, "denied");
    assert_eq!(policy.direction, "ingress");
    let fix = policy.suggested_fix.as_deref().unwrap();
    assert!(
        fix.contains("redirected clients to ports 40123, 40200, 40311 (seen)"),
        "{fix}"
    );
    let doc: serde_yaml::Value = serde_yaml::from_str(fix).unwrap();
    assert_eq!(
        doc["metadata"]["name"].as_str(),
        Some("allow-ingress-client-to-oracle-0-tcp-40123-40311"),
        "one name for the fixes of every leg: {fix}"
    );
    let ports = &doc["spec"]["ingress"][0]["ports"];
    let ports: Vec<(Option<u64>, Option<u64>)> = ports
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| (p["port"].as_u64(), p["endPort"].as_u64()))
        .collect();
    assert_eq!(
        ports,
        [(Some(1521), None), (Some(40123), Some(40311))],
        "{fix}"
    );
    let check = policy.fix_check.as_ref().unwrap();
    assert!(check.allows_flow, "{check:?}");
    assert!(check.still_denied.is_empty(), "{check:?}");
    assert!(
        check.newly_allowed.is_empty(),
        "the range is for this pair only: {check:?}"
    );
}

fn retransmit_rec(
    ts_ns: u64,
    sk: u64,
    local_first: FlowKey,
    state: u32,
) -> tracer_common::RetransmitEvent {
    tracer_common::RetransmitEvent {
        hdr: header(kind::RETRANSMIT, ts_ns),
        sk,
        flow: flow(local_first),
        state,
        netns: 4026532001,
        ..tracer_common::RetransmitEvent::default()
    }
}

fn retransmit(ts_ns: u64, sk: u64, local_first: FlowKey, state: u32) -> Vec<u8> {
    bytes(&retransmit_rec(ts_ns, sk, local_first, state))
}

/// The one stall in `out`: a timeout after `retransmits` SYN retransmits, `drops` drops.
fn one_timeout(out: &[Event], retransmits: u32, drops: u64) -> &Event {
    let stalls = of_kind(out, Kind::Stall);
    assert_eq!(stalls.len(), 1, "{out:#?}");
    let s = stalls[0];
    let a = s.attempt.as_ref().unwrap();
    assert_eq!(a.outcome, "timeout");
    assert_eq!(a.syn_retransmits, retransmits);
    let tallies = s.drops.as_ref().unwrap();
    assert_eq!(
        tallies.iter().map(|t| t.count).sum::<u64>(),
        drops,
        "{s:#?}"
    );
    s
}

/// The seed scenario: sqlplus's SYN dropped by a firewall on this node, two SYN
/// retransmits dropped too (counted in the kernel), the kernel gives up with ETIMEDOUT.
#[test]
fn sqlplus_syn_dropped_with_its_retransmits_is_one_timeout_incident() {
    let mut p = pipeline(Emit::default());
    let c = key("10.201.1.1:40000", "10.201.1.2:1521");
    p.record(&state(0, 1, c, 7, 2, 0));
    let first = drop_rec(MS, c, SYN, NETFILTER_DROP, NFT_DO_CHAIN);
    p.record(&bytes(&first));
    p.record(&retransmit(S, 1, c, 2));
    p.record(&retransmit(3 * S, 1, c, 2));
    p.repeats(3 * S + MS, &[entry(&first, 2, 3 * S + MS)]);
    p.record(&state(7 * S, 1, c, 2, 7, 110));
    p.tick(7 * S + 300 * MS);

    let out = streamed(&mut p);
    let s = one_timeout(&out, 2, 3);
    assert_eq!(s.drops.as_ref().unwrap()[0].reason, "NETFILTER_DROP");
    let d = s.diagnosis.as_deref().unwrap();
    assert!(d.contains("dropped 3 times"), "{d}");
    // The drops are in the stream too, their counts the same 3.
    let drops = of_kind(&out, Kind::Drop);
    assert_eq!(drops.iter().map(|e| e.count).sum::<u64>(), 3);
    assert!(of_kind(&out, Kind::Lost).is_empty());
}

/// A connect that succeeds at once, does its work and closes, with no drop: nothing in the
/// stream.
#[test]
fn a_clean_connect_and_close_is_silent() {
    let mut p = pipeline(Emit::default());
    let c = key("10.201.1.1:40002", "10.201.1.2:1521");
    p.record(&state(0, 1, c, 7, 2, 0));
    p.record(&state(MS, 1, c, 2, 1, 0));
    p.record(&state(S, 1, c, 1, 4, 0));
    p.record(&state(S + MS, 1, c, 4, 7, 0));
    p.tick(20 * S);
    let all: Vec<Output> = p.drain().collect();
    assert!(all.iter().all(|o| !o.stream), "{all:#?}");
    // Held back (for --emit connects, signals): its connect record and state changes; no
    // incident, no drop.
    let kinds: Vec<Kind> = all.iter().map(|o| o.event.kind).collect();
    assert_eq!(kinds.iter().filter(|k| **k == Kind::Connect).count(), 1);
    assert!(
        kinds
            .iter()
            .all(|k| matches!(k, Kind::TcpState | Kind::Connect)),
        "{kinds:?}"
    );
}

#[test]
fn idle_key_that_repeats_before_its_removal_reports_only_the_new_drops() {
    let mut p = pipeline(Emit::default());
    let flow = key("10.202.1.1:40000", "10.203.1.2:1521");
    let first = drop_rec(MS, flow, SYN, NETFILTER_DROP, NFT_DO_CHAIN);
    p.record(&bytes(&first));
    p.repeats(S, &[entry(&first, 2, S)]);
    // Idle since: the pipeline asks for the key's removal, with the 2 repeats it reported.
    p.repeats(10 * S, &[entry(&first, 2, S)]);
    let forget: Vec<Action> = p.drain_actions().collect();
    assert_eq!(
        forget,
        vec![Action::ForgetAggKey(drops::agg_key(&first), 2)],
        "{forget:?}"
    );
    // The run loop found a third drop counted since that read and kept the key: the next
    // flush reports that one drop, not all three again.
    p.repeats(11 * S, &[entry(&first, 3, 10 * S + MS)]);
    // This time it is removed: the key's next drop is a first record again.
    p.repeats(20 * S, &[entry(&first, 3, 10 * S + MS)]);
    p.agg_key_forgotten(&drops::agg_key(&first));
    let again = drop_rec(21 * S, flow, SYN, NETFILTER_DROP, NFT_DO_CHAIN);
    p.record(&bytes(&again));
    p.repeats(22 * S, &[entry(&again, 1, 22 * S)]);

    let out = streamed(&mut p);
    let counts: Vec<u64> = of_kind(&out, Kind::Drop).iter().map(|e| e.count).collect();
    assert_eq!(counts, vec![1, 2, 1, 1, 1], "{out:#?}");
}

/// A CONNECT to the listener and its REDIRECT to `target` (the split form real listeners
/// send), as the cgroup_skb programs copy them.
fn listener_redirects(p: &mut Pipeline, to_listener: FlowKey, target: &str) {
    let connect = include_bytes!("../../tests/fixtures/tns/python-oracledb-26.1.0-connect.bin");
    p.record(&tns(0, to_listener, 100, connect));
    let (host, port) = target.split_once(':').unwrap();
    let redirect = crate::decode::oracle::tns::build::redirect_split(
        format!("(ADDRESS=(PROTOCOL=TCP)(HOST={host})(PORT={port}))\0(DESCRIPTION=)").as_bytes(),
    );
    p.record(&tns(MS, to_listener.reversed(), 200, &redirect));
}

/// A SYN retransmit of a socket whose connect the kernel saw (OWNERS) but did not record.
fn owned_retransmit(ts_ns: u64, sk: u64, local_first: FlowKey) -> Vec<u8> {
    let mut r = retransmit_rec(ts_ns, sk, local_first, 2);
    (r.has_owner, r.owner) = (1, python());
    bytes(&r)
}

/// The REDIRECT race: sqlplus dials the redirect target at once, before droptrace has read the
/// REDIRECT and watched the target, so no SYN_SENT record; the kernel kept the first SYN's
/// drop because a watched listener had just redirected its sender. The first SYN, its two
/// retransmits (counted in the kernel) and the kernel's timeout are one incident of the
/// redirected leg, counting all 3 drops, followed from its first SYN.
#[test]
fn redirect_target_dialled_before_it_was_watched_counts_its_first_syn() {
    let mut p = pipeline(Emit::default());
    let to_listener = key("10.201.1.1:40000", "10.201.1.2:1521");
    listener_redirects(&mut p, to_listener, "10.201.1.2:40123");
    let actions: Vec<Action> = p.drain_actions().collect();
    assert!(
        matches!(actions[..], [Action::WatchHostPort(t, _)] if t.to_string() == "10.201.1.2:40123"),
        "{actions:?}"
    );
    let leg = key("10.201.1.1:40002", "10.201.1.2:40123");
    let mut first = drop_rec(2 * MS, leg, SYN, NETFILTER_DROP, NFT_DO_CHAIN);
    first.redirected = 1;
    p.record(&bytes(&first));
    // The target is watched from here: retransmits (naming the process the kernel
    // remembered at connect) and the socket's end are recorded.
    p.record(&owned_retransmit(S, 7, leg));
    p.record(&owned_retransmit(3 * S, 7, leg));
    p.repeats(3 * S + MS, &[entry(&first, 2, 3 * S + MS)]);
    p.record(&state(7 * S, 7, leg, 2, 7, 110));
    p.tick(7 * S + 300 * MS);

    let out = streamed(&mut p);
    let s = one_timeout(&out, 2, 3);
    let d = s.diagnosis.as_deref().unwrap();
    assert!(
        d.starts_with(
            "listener 10.201.1.2:1521 redirected sqlplus to 10.201.1.2:40123; that leg's SYN \
             to 10.201.1.2:40123 dropped 3 times"
        ),
        "{d}"
    );
    assert!(!d.contains(crate::correlate::FIRST_SYN_UNSEEN), "{d}");
    assert_eq!(
        s.process.as_ref().map(|p| p.comm.as_str()),
        Some("python"),
        "the owner the kernel remembered at connect: {s:#?}"
    );
    let drops = of_kind(&out, Kind::Drop);
    assert_eq!(drops.iter().map(|e| e.count).sum::<u64>(), 3);
    assert_eq!(p.summary().drops_by_reason.get("NETFILTER_DROP"), Some(&3));
}

/// A REDIRECTed client's SYNs the kernel kept that go elsewhere than the target (another
/// connect of the same host within seconds, to an unwatched port): not a watched flow, so no
/// drop, no incident, no count; the kernel's aggregation key is still forgotten when idle.
#[test]
fn a_redirected_clients_syn_to_an_unwatched_port_is_not_reported() {
    let mut p = pipeline(Emit::default());
    let to_listener = key("10.201.1.1:40000", "10.201.1.2:1521");
    listener_redirects(&mut p, to_listener, "10.201.1.2:40123");
    let elsewhere = key("10.201.1.1:40003", "10.201.1.9:8080");
    let mut first = drop_rec(2 * MS, elsewhere, SYN, NETFILTER_DROP, NFT_DO_CHAIN);
    first.redirected = 1;
    p.record(&bytes(&first));
    p.repeats(S, &[entry(&first, 2, S)]);
    p.tick(20 * S);
    p.repeats(20 * S, &[entry(&first, 2, S)]);
    p.tick(40 * S);

    let all: Vec<Output> = p.drain().collect();
    assert!(
        all.iter()
            .all(|o| !matches!(o.event.kind, Kind::Drop | Kind::Stall | Kind::Storm)),
        "{all:#?}"
    );
    assert!(p.summary().drops_by_reason.is_empty(), "{:?}", p.summary());
    let forget: Vec<Action> = p
        .drain_actions()
        .filter(|a| matches!(a, Action::ForgetAggKey(..)))
        .collect();
    assert_eq!(
        forget,
        [Action::ForgetAggKey(drops::agg_key(&first), 2)],
        "the kernel's key is released"
    );
}
