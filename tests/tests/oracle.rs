//! The failure droptrace exists for: the listener answers on 1521, REDIRECTs the client to
//! another port or host, and that second leg is dropped silently. A real python-oracledb thin
//! client against a fake Oracle listener in the "db" namespace.
use std::{net::SocketAddr, time::Duration};

use droptrace_tests::{
    kernel,
    netns::{AppDb, Family, Routed, sh},
    oracle_client,
    scenario::RedirectedLeg,
    tns_listener::{Behavior, FakeListener},
    tracer::{Droptrace, at, str_at},
};
use serde_json::Value;

const SERVICE: &str = "ORCLPDB1";

/// `tns` events of one packet type to `server` (tns flows are client -> server; other tests'
/// listeners run concurrently).
fn tns_events<'a>(events: &'a [Value], packet: &str, server: std::net::IpAddr) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|v| {
            str_at(v, "kind") == "tns"
                && str_at(v, "oracle.packet") == packet
                && str_at(v, "flow.dst_ip") == server.to_string()
        })
        .collect()
}

fn final_stall(t: &Droptrace, dst: SocketAddr) -> Value {
    t.wait_for(droptrace_tests::tracer::EVENT_WAIT, |v| {
        str_at(v, "kind") == "stall"
            && str_at(v, "flow.dst_ip") == dst.ip().to_string()
            && at(v, "flow.dst_port") == dst.port()
            && str_at(v, "attempt.outcome") != "in_progress"
    })
    .unwrap_or_else(|| panic!("no final stall to {dst}: {:#?}", t.events()))
}

/// The counts and whether the leg's first SYN left before droptrace watched the target (the
/// REDIRECT race): the attempt's start against the daemon's "learned" line.
fn race_line(stall: &Value, stderr: &str, counted: u64, rule: u64) -> String {
    let target = format!(
        "learned Oracle redirect target {}:{}",
        str_at(stall, "flow.dst_ip"),
        at(stall, "flow.dst_port")
    );
    let learned = stderr
        .lines()
        .find(|l| l.contains(&target))
        .unwrap_or("no learned line");
    format!(
        "counted {counted}, rule counter {rule}; first SYN at {}; {learned}",
        str_at(stall, "attempt.started")
    )
}

#[test]
fn sqlplus_stall_on_redirected_port() {
    let leg = RedirectedLeg::new(40123);
    let (topo, listener_addr, second) = (&leg.topo, leg.listener, leg.second);
    let tracer = Droptrace::start(&["--emit", "tns"]);

    leg.connect();

    let s = leg.final_stall(&tracer);
    let fin = tracer.stop();
    println!("stall: {s}");
    // The listener leg as seen on the wire.
    let connect = tns_events(&fin.events, "CONNECT", topo.db_ip);
    assert!(!connect.is_empty(), "CONNECT seen: {:#?}", fin.events);
    assert_eq!(str_at(connect[0], "oracle.service_name"), SERVICE);
    assert_eq!(str_at(connect[0], "oracle.program"), "sqlplus");
    let redirect = tns_events(&fin.events, "REDIRECT", topo.db_ip);
    assert_eq!(redirect.len(), 1, "{:#?}", fin.events);
    assert_eq!(
        str_at(redirect[0], "oracle.redirect.host"),
        topo.db_ip.to_string()
    );
    assert_eq!(at(redirect[0], "oracle.redirect.port"), second.port());
    assert!(
        fin.stderr
            .contains(&format!("learned Oracle redirect target {}", second))
    );
    // The second leg: one incident, linked to the listener, dropped on the redirect port.
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout");
    assert_eq!(str_at(&s, "oracle.listener.ip"), topo.db_ip.to_string());
    assert_eq!(at(&s, "oracle.listener.port"), 1521);
    assert_eq!(at(&s, "oracle.redirect.port"), second.port());
    assert_eq!(str_at(&s, "oracle.program"), "sqlplus");
    let drops = at(&s, "drops").as_array().unwrap();
    assert!(drops.iter().any(kernel::is_netfilter_drop), "{s}");
    assert!(str_at(&s, "process.comm").starts_with("python"), "{s}");
    // Every SYN the firewall dropped, the first included: the client dials the target as soon
    // as it reads the REDIRECT, often before droptrace has read it (always under emulation).
    let rule = topo.iptables_drop_count(second.port());
    let counted: u64 = drops
        .iter()
        .filter(|d| kernel::is_netfilter_drop(d))
        .map(|d| at(d, "count").as_u64().unwrap())
        .sum();
    println!("{}", race_line(&s, &fin.stderr, counted, rule));
    assert_eq!(counted, rule, "the stall counts what the rule dropped: {s}");
    let diag = str_at(&s, "diagnosis");
    assert!(!diag.contains("first SYN retransmit"), "{diag}");
    assert!(
        diag.starts_with(&format!(
            "listener {listener_addr} redirected sqlplus to {second}; that leg's SYN to {second} dropped"
        )) && diag.contains(&format!("by netfilter ({} at ", kernel::reason("NETFILTER_DROP"))),
        "{diag}"
    );
    // The redirect port was learned: its drops are in the stream though only 1521 is watched.
    let learned_drops: u64 = fin
        .events
        .iter()
        .filter(|v| {
            // This test's target only: another test's leg may use the same port.
            str_at(v, "kind") == "drop"
                && str_at(v, "flow.dst_ip") == second.ip().to_string()
                && at(v, "flow.dst_port") == second.port()
        })
        .map(|v| at(v, "count").as_u64().unwrap())
        .sum();
    assert_eq!(
        learned_drops, rule,
        "drops on the learned port, the first one included"
    );
    // No incident for the listener leg: it connected and was answered.
    assert!(
        !fin.events
            .iter()
            .any(|v| str_at(v, "kind") == "stall" && at(v, "flow.dst_port") == 1521),
        "the listener leg is not a stall"
    );
}

#[test]
fn redirect_to_other_host() {
    let topo = AppDb::new(Family::V4);
    // A second database address (RAC node VIP) on the db side.
    let vip = match topo.db_ip {
        std::net::IpAddr::V4(v4) => {
            let o = v4.octets();
            std::net::IpAddr::from([o[0], o[1], o[2], 77])
        }
        other => other,
    };
    topo.db.exec(&[
        "ip",
        "addr",
        "add",
        &format!("{vip}/24"),
        "dev",
        &topo.db_dev,
    ]);
    let listener_addr = SocketAddr::new(topo.db_ip, 1521);
    let node = SocketAddr::new(vip, 1521);
    let _scan = FakeListener::from_listener(
        topo.db.tcp_listener(listener_addr),
        Behavior::redirect(&vip.to_string(), 1521),
    )
    .unwrap();
    let _node_listener =
        FakeListener::from_listener(topo.db.tcp_listener(node), Behavior::AcceptAndHang).unwrap();
    sh(&[
        "ip",
        "netns",
        "exec",
        &topo.db.name,
        "iptables",
        "-A",
        "INPUT",
        "-d",
        &vip.to_string(),
        "-p",
        "tcp",
        "--dport",
        "1521",
        "-j",
        "DROP",
    ]);
    let tracer = Droptrace::start(&[]);

    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, SERVICE, 3.0);
    assert!(out.error.contains("timed out"), "{out:?}");

    let s = final_stall(&tracer, node);
    tracer.stop();
    println!("stall: {s}");
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout");
    assert_eq!(str_at(&s, "oracle.redirect.host"), vip.to_string());
    assert_eq!(str_at(&s, "oracle.listener.ip"), topo.db_ip.to_string());
    assert!(
        str_at(&s, "diagnosis").starts_with(&format!(
            "listener {listener_addr} redirected sqlplus to {node}; that leg's SYN to {node} dropped"
        )),
        "{s}"
    );
}

#[test]
fn listener_refuse_is_not_a_drop() {
    let topo = AppDb::new(Family::V4);
    let listener_addr = SocketAddr::new(topo.db_ip, 1521);
    let _listener = FakeListener::from_listener(
        topo.db.tcp_listener(listener_addr),
        Behavior::Refuse { err: 12514 },
    )
    .unwrap();
    let tracer = Droptrace::start(&["--emit", "tns"]);

    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, SERVICE, 3.0);
    assert!(out.error.contains("DPY-6001"), "{out:?}");

    let s = final_stall(&tracer, listener_addr);
    let fin = tracer.stop();
    println!("stall: {s}");
    assert_eq!(str_at(&s, "attempt.outcome"), "refused_by_listener");
    assert_eq!(at(&s, "oracle.refuse.code"), 12514);
    assert!(
        at(&s, "drops").as_array().is_none_or(|d| d.is_empty()),
        "{s}"
    );
    assert_eq!(
        str_at(&s, "diagnosis"),
        format!(
            "listener refused: ORA-12514 service {SERVICE} not registered (listener \
             {listener_addr}); a listener answer, not a network drop"
        )
    );
    assert!(
        !fin.events
            .iter()
            .any(|v| str_at(v, "kind") == "drop"
                && str_at(v, "flow.dst_ip") == topo.db_ip.to_string()),
        "nothing was dropped"
    );
    let refuse = tns_events(&fin.events, "REFUSE", topo.db_ip);
    assert_eq!(refuse.len(), 1);
}

#[test]
fn resend_then_connect() {
    let topo = AppDb::new(Family::V4);
    let listener_addr = SocketAddr::new(topo.db_ip, 1521);
    // RESEND first; the resent CONNECT is then refused (ORA-12505) so the client ends at once.
    let listener = FakeListener::from_listener(
        topo.db.tcp_listener(listener_addr),
        Behavior::ResendThen(Box::new(Behavior::Refuse { err: 12505 })),
    )
    .unwrap();
    let tracer = Droptrace::start(&["--emit", "tns"]);

    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, SERVICE, 3.0);
    assert!(out.error.contains("DPY-6003"), "{out:?}");
    let seen = listener.wait_for_connects(2, Duration::from_secs(2));
    assert_eq!(seen.connects.len(), 2, "the client resent its CONNECT");

    let s = final_stall(&tracer, listener_addr);
    std::thread::sleep(Duration::from_secs(4)); // past --stall-after: nothing else may appear
    let fin = tracer.stop();
    assert_eq!(
        tns_events(&fin.events, "RESEND", topo.db_ip).len(),
        1,
        "{:#?}",
        fin.events
    );
    assert_eq!(
        tns_events(&fin.events, "CONNECT", topo.db_ip).len(),
        2,
        "{:#?}",
        tns_events(&fin.events, "CONNECT", topo.db_ip)
    );
    assert_eq!(str_at(&s, "attempt.outcome"), "refused_by_listener");
    let stalls: Vec<_> = fin
        .events
        .iter()
        .filter(|v| {
            str_at(v, "kind") == "stall" && str_at(v, "flow.dst_ip") == topo.db_ip.to_string()
        })
        .collect();
    assert_eq!(stalls.len(), 1, "the RESEND is no stall: {stalls:#?}");
}

/// The default Kubernetes path for Oracle: the client dials a Service address, kube-proxy
/// DNATs it to the pod, and the listener there redirects the client to the pod's own dynamic
/// port, which the policy does not allow. One incident: the dropped leg, linked to the
/// listener leg as the client dialled it (the Service address).
#[test]
fn service_redirect_to_pod_port() {
    let topo = Routed::new();
    let pod_listener = SocketAddr::new(topo.db_ip, 1521);
    let second = SocketAddr::new(topo.db_ip, 40123);
    let _listener = FakeListener::from_listener(
        topo.db.tcp_listener(pod_listener),
        Behavior::redirect(&topo.db_ip.to_string(), second.port()),
    )
    .unwrap();
    let _dispatcher =
        FakeListener::from_listener(topo.db.tcp_listener(second), Behavior::AcceptAndHang).unwrap();
    topo.drop_forwarded(second.port());
    let tracer = Droptrace::start(&[]);

    let out = oracle_client::connect(&topo.app, topo.service_ip, 1521, SERVICE, 3.0);
    assert!(out.error.contains("timed out"), "client timed out: {out:?}");

    let s = final_stall(&tracer, second);
    let fin = tracer.stop();
    println!("stall: {s}");
    let svc = topo.service_ip.to_string();
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout");
    assert_eq!(str_at(&s, "oracle.listener.ip"), svc, "{s}");
    assert_eq!(at(&s, "oracle.listener.port"), 1521);
    assert_eq!(at(&s, "oracle.redirect.port"), second.port());
    assert_eq!(str_at(&s, "oracle.program"), "sqlplus");
    let forwarded = topo.forward_drop_count(second.port());
    let drops = at(&s, "drops").as_array().unwrap();
    assert_eq!(drops.len(), 1, "{s}");
    let counted = at(&drops[0], "count").as_u64().unwrap();
    // The first SYN included, also when the client dialled the target before droptrace had
    // read the REDIRECT (a loaded machine, emulation): the kernel kept it for the REDIRECTed
    // client.
    println!("{}", race_line(&s, &fin.stderr, counted, forwarded));
    assert_eq!(counted, forwarded, "{s}");
    assert!(
        !str_at(&s, "diagnosis").contains("first SYN retransmit"),
        "{s}"
    );
    assert!(
        str_at(&s, "diagnosis").starts_with(&format!(
            "listener {svc}:1521 redirected sqlplus to {second}; that leg's SYN to {second} dropped"
        )),
        "{s}"
    );
    let incidents: Vec<&Value> = fin
        .events
        .iter()
        .filter(|v| {
            matches!(str_at(v, "kind"), "stall" | "storm")
                && str_at(v, "flow.src_ip") == topo.app_ip.to_string()
        })
        .collect();
    let ids: std::collections::BTreeSet<u64> = incidents
        .iter()
        .filter_map(|v| at(v, "attempt.id").as_u64())
        .collect();
    assert_eq!(ids.len(), 1, "one incident: {incidents:#?}");
    assert!(
        !fin.events.iter().any(|v| str_at(v, "kind") == "tns"),
        "successful handshake packets are not in the default stream"
    );
}
