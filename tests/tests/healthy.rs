//! Silence on a healthy workload: complete Oracle Net sessions (python-oracledb's CONNECT,
//! the listener's ACCEPT, DATA round trips, a clean close) produce nothing in the default
//! stream, while droptrace still sees and counts every one of them.
use std::{net::SocketAddr, time::Duration};

use droptrace_tests::{
    netns::{AppDb, Family},
    tns_listener::{Behavior, FakeListener},
    tns_session,
    tracer::{Droptrace, str_at},
};

const SESSIONS: usize = 200;

/// `kind N` out of the summary's "held back (...)" list.
fn held_back(summary: &str, kind: &str) -> u64 {
    let list = summary
        .split(" held back (")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .unwrap_or("");
    list.split(", ")
        .find_map(|item| item.strip_prefix(&format!("{kind} ")))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

#[test]
fn healthy_sessions_stay_silent() {
    let topo = AppDb::new(Family::V4);
    let listener_addr = SocketAddr::new(topo.db_ip, 1521);
    let listener =
        FakeListener::from_listener(topo.db.tcp_listener(listener_addr), Behavior::Session)
            .unwrap();
    let tracer = Droptrace::start(&[]);

    let done = tns_session::run_sessions(&topo.app, listener_addr, SESSIONS, 5).unwrap();
    assert_eq!(done, SESSIONS);
    let seen = listener.wait_for_connects(SESSIONS, Duration::from_secs(10));
    assert_eq!(seen.connects.len(), SESSIONS, "{:?}", seen.errors);
    assert!(seen.errors.is_empty(), "{:?}", seen.errors);
    // Past --stall-after, so anything stalled would have been reported.
    std::thread::sleep(Duration::from_secs(4));
    let fin = tracer.stop();

    let ours: Vec<_> = fin
        .events
        .iter()
        .filter(|v| {
            let ip = topo.db_ip.to_string();
            str_at(v, "flow.dst_ip") == ip || str_at(v, "flow.src_ip") == ip
        })
        .collect();
    let summary = fin
        .stderr
        .lines()
        .find(|l| l.starts_with("droptrace: "))
        .unwrap_or_default()
        .to_string();
    println!("{summary}");
    assert!(ours.is_empty(), "the default stream is empty: {ours:#?}");
    // Not because nothing was seen: every session's connect and handshake was counted.
    assert!(
        held_back(&summary, "connect") >= SESSIONS as u64,
        "connects counted: {summary}"
    );
    assert!(
        held_back(&summary, "tns") >= 2 * SESSIONS as u64,
        "CONNECT and ACCEPT counted: {summary}"
    );
}
