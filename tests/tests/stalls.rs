//! One record per silent stall: connect() -> SYN retransmits -> drop -> the stalled process,
//! joined into a single `stall` incident with a one-sentence diagnosis.
use std::time::Duration;

use droptrace_tests::{
    kernel,
    netns::{AppDb, Family, Routed},
    oracle_client,
    scenario::{CuedClient, sink_server, tun_black_hole},
    tracer::{Droptrace, at, str_at},
};
use serde_json::Value;

fn stalls_to(events: &[Value], dst_ip: &str, dst_port: u16) -> Vec<Value> {
    events
        .iter()
        .filter(|v| {
            str_at(v, "kind") == "stall"
                && str_at(v, "flow.dst_ip") == dst_ip
                && at(v, "flow.dst_port") == dst_port
        })
        .cloned()
        .collect()
}

/// The final record of the single incident for that destination.
fn one_incident(events: &[Value], dst_ip: &str, dst_port: u16) -> Value {
    let stalls = stalls_to(events, dst_ip, dst_port);
    assert!(
        !stalls.is_empty(),
        "no stall for {dst_ip}:{dst_port}: {events:#?}"
    );
    let id = at(&stalls[0], "attempt.id").clone();
    assert!(
        stalls.iter().all(|s| at(s, "attempt.id") == &id),
        "more than one incident: {stalls:#?}"
    );
    let finals: Vec<_> = stalls
        .iter()
        .filter(|s| str_at(s, "attempt.outcome") != "in_progress")
        .collect();
    assert_eq!(finals.len(), 1, "exactly one final record: {stalls:#?}");
    finals[0].clone()
}

fn wait_final(t: &Droptrace, dst_ip: &str, dst_port: u16, timeout: Duration) -> Value {
    t.wait_for(timeout, |v| {
        str_at(v, "kind") == "stall"
            && str_at(v, "flow.dst_ip") == dst_ip
            && at(v, "flow.dst_port") == dst_port
            && str_at(v, "attempt.outcome") != "in_progress"
    })
    .unwrap_or_else(|| panic!("no final stall for {dst_ip}:{dst_port}: {:#?}", t.events()))
}

#[test]
fn sqlplus_stall_is_one_incident() {
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(1521);
    let tracer = Droptrace::start(&[]);

    let client = oracle_client::Connect::start(&topo.app, topo.db_ip, 1521, "ORCLPDB1", 3.0);
    let pid = client.pid();
    let out = client.wait();
    assert!(out.error.contains("timed out"), "{out:?}");

    let db = topo.db_ip.to_string();
    wait_final(&tracer, &db, 1521, Duration::from_secs(5));
    let fin = tracer.stop();
    let s = one_incident(&fin.events, &db, 1521);
    println!("stall: {s}");
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout");
    assert!(
        at(&s, "attempt.syn_retransmits").as_u64().unwrap() >= 1,
        "{s}"
    );
    assert!(
        at(&s, "attempt.duration_ms").as_u64().unwrap() >= 2900,
        "{s}"
    );
    assert_eq!(at(&s, "process.pid"), pid, "{s}");
    assert_eq!(at(&s, "process.tgid"), pid, "{s}");
    assert!(str_at(&s, "process.comm").starts_with("python"), "{s}");
    assert!(at(&s, "process.cgroup_id").as_u64().unwrap() > 0, "{s}");
    assert_eq!(str_at(&s, "flow.src_ip"), topo.app_ip.to_string());
    assert_eq!(at(&s, "netns"), topo.app.inode(), "client's namespace: {s}");
    let drops = at(&s, "drops").as_array().unwrap();
    assert_eq!(drops.len(), 1, "{s}");
    assert!(kernel::is_netfilter_drop(&drops[0]), "{s}");
    assert_eq!(at(&drops[0], "netns"), topo.db.inode());
    assert_eq!(
        at(&drops[0], "count").as_u64().unwrap(),
        topo.iptables_drop_count(1521)
    );
    let diag = str_at(&s, "diagnosis");
    assert!(
        diag.starts_with(&format!("SYN to {db}:1521 dropped "))
            && diag.contains(&format!(
                "by netfilter ({} at ",
                kernel::reason("NETFILTER_DROP")
            )),
        "{diag}"
    );
}

#[test]
fn service_ip_dnat() {
    let topo = Routed::new();
    topo.drop_forwarded(1521);
    let tracer = Droptrace::start(&[]);

    let out = oracle_client::connect(&topo.app, topo.service_ip, 1521, "ORCLPDB1", 3.0);
    assert!(out.error.contains("timed out"), "{out:?}");

    let svc = topo.service_ip.to_string();
    wait_final(&tracer, &svc, 1521, Duration::from_secs(5));
    let fin = tracer.stop();
    let s = one_incident(&fin.events, &svc, 1521);
    println!("stall: {s}");
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout");
    assert_eq!(str_at(&s, "conntrack.original.dst_ip"), svc, "{s}");
    assert_eq!(at(&s, "conntrack.original.dst_port"), 1521);
    assert_eq!(
        str_at(&s, "conntrack.reply.src_ip"),
        topo.db_ip.to_string(),
        "{s}"
    );
    assert_eq!(str_at(&s, "conntrack.nat"), "dnat");
    assert_eq!(str_at(&s, "conntrack.state"), "NEW");
    assert!(
        at(&s, "conntrack.status")
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b == "DNAT"),
        "{s}"
    );
    let drops = at(&s, "drops").as_array().unwrap();
    assert!(kernel::is_netfilter_drop(&drops[0]), "{s}");
    assert_eq!(at(&drops[0], "netns"), topo.router.inode());
    assert!(
        str_at(&s, "diagnosis").contains(&format!(
            "SYN to {svc}:1521 (DNAT to {}:1521) dropped",
            topo.db_ip
        )),
        "{s}"
    );
    // Every drop of the attempt joined it: the incident counts what the rule counted.
    let forwarded = topo.forward_drop_count(1521);
    assert!(forwarded >= 2, "SYN and retransmits dropped: {forwarded}");
    assert_eq!(at(&drops[0], "count").as_u64().unwrap(), forwarded, "{s}");
    let db = topo.db_ip.to_string();
    assert!(
        stalls_to(&fin.events, &db, 1521).is_empty(),
        "no second incident toward the pod address: {:#?}",
        stalls_to(&fin.events, &db, 1521)
    );
    // Every drop record carries the conntrack entry, the aggregated repeats too: packet to
    // the pod, original to the service, and the sum of their counts is the rule's.
    let raw: Vec<&Value> = fin
        .events
        .iter()
        .filter(|v| str_at(v, "kind") == "drop" && str_at(v, "flow.dst_ip") == db)
        .collect();
    assert!(!raw.is_empty(), "raw drops after DNAT");
    assert!(
        raw.iter()
            .all(|d| str_at(d, "conntrack.original.dst_ip") == svc),
        "{raw:#?}"
    );
    let sum: u64 = raw.iter().map(|d| at(d, "count").as_u64().unwrap()).sum();
    assert_eq!(sum, forwarded);
    // The join key across nodes: the stall's reply tuple is the pod-side flow.
    assert_eq!(
        str_at(&s, "conntrack.reply.community_id"),
        str_at(raw[0], "flow.community_id"),
        "{s}"
    );
    println!(
        "incident drops {} = FORWARD rule {forwarded}",
        at(&drops[0], "count")
    );
    println!("joined by community id:\nstall {s}\ndrop  {}", raw[0]);
}

#[test]
fn remote_drop() {
    let topo = AppDb::new(Family::V4);
    // Packets to 10.205.N.0/24 go into a TUN whose reader discards them: gone, with no drop
    // anywhere on this node (like a policy on another node).
    let n = topo
        .app_ip
        .to_string()
        .split('.')
        .nth(2)
        .unwrap()
        .to_string();
    let far = format!("10.205.{n}.9");
    let _hole = tun_black_hole(&topo.app, &format!("dth{n}"), &format!("10.205.{n}.0/24"));
    let tracer = Droptrace::start(&[]);

    let out = oracle_client::connect(&topo.app, far.parse().unwrap(), 1521, "ORCLPDB1", 3.0);
    assert!(out.error.contains("timed out"), "{out:?}");

    wait_final(&tracer, &far, 1521, Duration::from_secs(5));
    let fin = tracer.stop();
    let s = one_incident(&fin.events, &far, 1521);
    println!("stall: {s}");
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout");
    assert!(at(&s, "drops").as_array().unwrap().is_empty(), "{s}");
    assert!(
        str_at(&s, "diagnosis").starts_with("no drop seen on this node; SYN unanswered after"),
        "{s}"
    );
    assert!(
        !fin.events
            .iter()
            .any(|v| str_at(v, "kind") == "drop" && str_at(v, "flow.dst_ip") == far),
        "nothing was dropped on this node"
    );
}

#[test]
fn refused_is_not_silent() {
    let topo = AppDb::new(Family::V4);
    let tracer = Droptrace::start(&[]);
    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, "ORCLPDB1", 3.0);
    assert!(out.error.contains("Connection refused"), "{out:?}");
    assert!(out.elapsed < Duration::from_secs(2));

    let db = topo.db_ip.to_string();
    wait_final(&tracer, &db, 1521, Duration::from_secs(5));
    let fin = tracer.stop();
    let s = one_incident(&fin.events, &db, 1521);
    println!("stall: {s}");
    assert_eq!(str_at(&s, "attempt.outcome"), "refused");
    assert_eq!(at(&s, "attempt.syn_retransmits"), 0);
    let diag = str_at(&s, "diagnosis");
    assert!(diag.contains("the port is closed, not dropped"), "{diag}");
}

#[test]
fn established_then_blocked() {
    let topo = AppDb::new(Family::V4);
    let _server = sink_server(&topo.db, topo.db_ip, 1521);
    let tracer = Droptrace::start(&["--stall-after", "2s"]);

    let client = CuedClient::start(&topo.app, topo.db_ip, 1521, 8.0);
    // The flow is established; now every further packet to the server is dropped.
    topo.iptables_drop_ingress(1521);
    client.send();

    let db = topo.db_ip.to_string();
    let s = tracer
        .wait_for(Duration::from_secs(10), |v| {
            str_at(v, "kind") == "stall"
                && str_at(v, "attempt.outcome") == "data_stalled"
                && str_at(v, "flow.dst_ip") == db
        })
        .unwrap_or_else(|| panic!("no data_stalled: {:#?}", tracer.events()));
    println!("stall: {s}");
    assert_eq!(at(&s, "flow.src_port"), client.local_port);
    assert!(
        at(&s, "attempt.data_retransmits").as_u64().unwrap() >= 2,
        "{s}"
    );
    assert_eq!(at(&s, "process.pid"), client.proc.pid(), "{s}");
    let drops = at(&s, "drops").as_array().unwrap();
    assert!(drops.iter().any(kernel::is_netfilter_drop), "{s}");
    assert!(
        str_at(&s, "diagnosis").starts_with(&format!(
            "established flow to {db}:1521 stopped making progress"
        )),
        "{s}"
    );
    tracer.stop();
}

/// Where the kernel refuses the nf_ct_delete program (this one does: lockdown), droptrace
/// listens to ctnetlink DESTROY events of its own network namespace. Run in "app", it sees the
/// client's SYN_SENT entry go away unreplied; the attempt was reported already, so the removal
/// is a raw record and no second incident.
#[test]
fn unreplied_conntrack_removal_is_reported() {
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(1521);
    // Connection tracking in "app" (a rule that uses it), so the SYN leaves a SYN_SENT entry.
    topo.app.exec(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-p",
        "tcp",
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-j",
        "ACCEPT",
    ]);
    let tracer = Droptrace::start_with(&["ip", "netns", "exec", &topo.app.name], &["--raw"]);
    let out = oracle_client::connect(&topo.app, topo.db_ip, 1521, "ORCLPDB1", 3.0);
    assert!(out.error.contains("timed out"), "{out:?}");
    let db = topo.db_ip.to_string();
    wait_final(&tracer, &db, 1521, Duration::from_secs(5));

    // What the entry's expiry (120 s for SYN_SENT) does, now.
    let del = topo
        .app
        .exec(&["conntrack", "-D", "-p", "tcp", "--dport", "1521"]);
    assert!(
        String::from_utf8_lossy(&del.stderr).contains("1 flow entries"),
        "conntrack -D: {del:?}"
    );
    let ct = tracer
        .wait_for(Duration::from_secs(5), |v| {
            str_at(v, "kind") == "conntrack" && str_at(v, "conntrack.original.dst_ip") == db
        })
        .unwrap_or_else(|| panic!("no conntrack record: {:#?}", tracer.events()));
    println!("conntrack: {ct}");
    let fin = tracer.stop();
    assert!(
        fin.stderr.contains("ctnetlink DESTROY events") || fin.stderr.contains("nf_ct_delete"),
        "{}",
        fin.stderr
    );
    assert_eq!(str_at(&ct, "conntrack.state"), "UNREPLIED");
    assert_eq!(str_at(&ct, "conntrack.original.dst_ip"), db);
    assert_eq!(at(&ct, "conntrack.original.dst_port"), 1521);
    assert_eq!(str_at(&ct, "conntrack.reply.src_ip"), db);
    assert_eq!(at(&ct, "netns"), topo.app.inode(), "{ct}");
    let s = one_incident(&fin.events, &db, 1521);
    assert_eq!(str_at(&s, "attempt.outcome"), "timeout");
}
