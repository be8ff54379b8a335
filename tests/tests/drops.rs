//! A silently dropped Oracle connect, caught by droptrace as a `drop` event with the exact
//! tuple, reason and code location: the foundation scenario.
use std::time::Duration;

use droptrace_tests::{
    kernel,
    netns::{AppDb, Family},
    oracle_client,
    tracer::{Droptrace, at, str_at},
};
use serde_json::Value;

const SERVICE: &str = "ORCLPDB1";

fn is_drop_to(v: &Value, topo: &AppDb, port: u16) -> bool {
    str_at(v, "kind") == "drop"
        && str_at(v, "flow.dst_ip") == topo.db_ip.to_string()
        && at(v, "flow.dst_port") == port
        && str_at(v, "flow.src_ip") == topo.app_ip.to_string()
}

/// The client hangs until tcp_connect_timeout and sees nothing but "timed out".
fn assert_silent_timeout(out: &oracle_client::Outcome) {
    assert!(!out.connected, "connect must not succeed");
    assert!(out.error.contains("DPY-6005"), "{out:?}");
    assert!(out.error.contains("timed out"), "{out:?}");
    assert!(out.elapsed >= Duration::from_millis(2900), "{out:?}");
}

fn check_drop_event(v: &Value, topo: &AppDb, reason: &'static str) {
    assert_eq!(str_at(v, "schema"), "droptrace.v1");
    assert_eq!(str_at(v, "flow.proto"), "tcp");
    let family = match topo.family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    assert_eq!(str_at(v, "flow.family"), family);
    assert!(at(v, "flow.src_port").as_u64().unwrap() >= 1024, "{v}");
    assert_eq!(str_at(v, "tcp.flags"), "SYN");
    // Before 5.17 the kernel gives no reason: UNAVAILABLE, no code, class from the location.
    assert_eq!(str_at(v, "drop.reason"), kernel::reason(reason), "{v}");
    assert_eq!(
        at(v, "drop.reason_code").as_u64().is_some(),
        kernel::has_drop_reasons(),
        "{v}"
    );
    assert_eq!(str_at(v, "drop.class"), "network", "{v}");
    assert_eq!(at(v, "netns"), topo.db.inode(), "{v}");
    assert_eq!(at(v, "ifindex"), topo.db.ifindex(&topo.db_dev), "{v}");
    assert_eq!(at(v, "count"), 1);
    assert!(str_at(v, "time").ends_with('Z'));
}

#[test]
fn sqlplus_stall_netfilter_drop() {
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(1521);
    let tracer = Droptrace::start(&[]);

    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, SERVICE, 3.0);
    assert_silent_timeout(&out);

    let ev = tracer
        .wait_for(Duration::from_secs(5), |v| is_drop_to(v, &topo, 1521))
        .expect("a drop event for the blocked connect");
    println!("drop: {ev}");
    check_drop_event(&ev, &topo, "NETFILTER_DROP");
    let location = str_at(&ev, "drop.location");
    assert!(
        kernel::NETFILTER_FUNCTIONS
            .iter()
            .any(|f| location.starts_with(&format!("{f}+0x"))),
        "location {location} is not a netfilter function"
    );
    let fin = tracer.stop();
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    // Every SYN the firewall dropped is in the stream (initial + retransmits).
    let drops = fin
        .events
        .iter()
        .filter(|v| is_drop_to(v, &topo, 1521))
        .count() as u64;
    assert_eq!(drops, topo.iptables_drop_count(1521));
    assert!(
        fin.stderr.contains(kernel::reason("NETFILTER_DROP")),
        "summary: {}",
        fin.stderr
    );
}

#[test]
fn sqlplus_stall_tc_ingress_drop() {
    let topo = AppDb::new(Family::V4);
    topo.tc_drop_ingress(1521);
    let tracer = Droptrace::start(&[]);

    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, SERVICE, 3.0);
    assert_silent_timeout(&out);

    let ev = tracer
        .wait_for(Duration::from_secs(5), |v| is_drop_to(v, &topo, 1521))
        .expect("a drop event for the connect dropped by tc");
    check_drop_event(&ev, &topo, "TC_INGRESS");
    assert_eq!(tracer.stop().code, Some(0));
}

#[test]
fn sqlplus_stall_netfilter_drop_ipv6() {
    let topo = AppDb::new(Family::V6);
    topo.iptables_drop_ingress(1521);
    let tracer = Droptrace::start(&[]);

    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, SERVICE, 3.0);
    assert_silent_timeout(&out);

    let ev = tracer
        .wait_for(Duration::from_secs(5), |v| is_drop_to(v, &topo, 1521))
        .expect("a drop event for the blocked IPv6 connect");
    check_drop_event(&ev, &topo, "NETFILTER_DROP");
    assert_eq!(tracer.stop().code, Some(0));
}

#[test]
fn unwatched_port_is_silent_unless_all_tcp() {
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(5432);

    let default_ports = Droptrace::start(&[]);
    let all_tcp = Droptrace::start(&["--all-tcp"]);
    let out = oracle_client::connect(&topo.app, topo.db_ip, 5432, SERVICE, 2.0);
    assert!(!out.connected);

    let seen = all_tcp
        .wait_for(Duration::from_secs(5), |v| is_drop_to(v, &topo, 5432))
        .expect("--all-tcp reports the drop on an unwatched port");
    assert!(kernel::is_netfilter_drop(at(&seen, "drop")), "{seen}");

    let fin = default_ports.stop();
    assert!(
        !fin.events.iter().any(|v| is_drop_to(v, &topo, 5432)),
        "port 5432 is not watched by default"
    );
    all_tcp.stop();
}

#[test]
fn watched_ports_follow_the_ports_flag() {
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(5432);
    let tracer = Droptrace::start(&["--ports", "5432"]);
    let _ = oracle_client::connect(&topo.app, topo.db_ip, 5432, SERVICE, 1.5);
    tracer
        .wait_for(Duration::from_secs(5), |v| is_drop_to(v, &topo, 5432))
        .expect("--ports 5432 watches 5432");
    tracer.stop();
}
