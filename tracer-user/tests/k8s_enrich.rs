//! Identity by address and time, event enrichment, node-local and hostNetwork traffic, and
//! suggested fixes that really let the flow through.
mod netpol_world;

use std::{net::IpAddr, path::Path, time::Duration};

use droptrace::{
    enrich::k8s::{
        Cluster, DEFAULT_IP_HISTORY, EnrichOptions, Object, ObjectKind, ObjectRef, enrich,
        evaluate_flow,
        snapshot::{Mode, Snapshot},
    },
    enrich::model::{Labels, ObjectKey, Protocol, now},
    enrich::policy::fix::stable_selector,
    event::{Conntrack, Event, Family, Flow, Kind, Tcp, Tuple},
};
use k8s_openapi::jiff::Timestamp;
use netpol_world::{allowed, apply_json, pod_ip, query, world};
use serde_json::json;

/// x/a may open no connection.
const A_NO_EGRESS: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-no-egress, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn fixture_cluster() -> Cluster {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/k8s/cluster.json");
    Snapshot::read(&path, Mode::Strict)
        .unwrap()
        .into_cluster(now(), DEFAULT_IP_HISTORY)
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn pod_object(name: &str, uid: &str, ip: &str, created: &str) -> Object {
    Object::try_from(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "db", "uid": uid, "creationTimestamp": created,
                     "labels": {"app": name}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"podIP": ip},
    }))
    .unwrap()
}

fn drop_event(time: &str, src: &str, sport: u16, dst: &str, dport: u16, flags: &str) -> Event {
    let mut e = Event::new(Kind::Drop, time.into(), "worker-1");
    e.flow = Some(Flow {
        proto: "tcp".into(),
        family: Family::Ipv4,
        src_ip: ip(src),
        src_port: sport,
        dst_ip: ip(dst),
        dst_port: dport,
        community_id: None,
    });
    e.tcp = Some(Tcp {
        flags: flags.into(),
    });
    e
}

#[test]
fn address_reused_after_delete_is_attributed_by_time() {
    let mut c = Cluster::new(Duration::from_secs(600));
    c.apply(
        &pod_object("old", "uid-old", "10.1.0.5", "2026-01-01T10:00:00Z"),
        ts("2026-01-01T10:00:01Z"),
    )
    .unwrap();
    c.delete(
        &ObjectRef {
            kind: ObjectKind::Pod,
            key: ObjectKey::new("db", "old"),
        },
        ts("2026-01-01T10:05:00Z"),
    );
    c.apply(
        &pod_object("new", "uid-new", "10.1.0.5", "2026-01-01T10:06:00Z"),
        ts("2026-01-01T10:06:01Z"),
    )
    .unwrap();
    let name_at = |c: &Cluster, t: &str| {
        c.pod_at(ip("10.1.0.5"), Some(ts(t)))
            .map(|p| p.name.clone())
    };
    let at = |t: &str| name_at(&c, t);
    assert_eq!(at("2026-01-01T10:04:59Z").as_deref(), Some("old"));
    assert_eq!(at("2026-01-01T10:06:30Z").as_deref(), Some("new"));
    // Nobody had it between the delete and the new pod.
    assert_eq!(at("2026-01-01T10:05:30Z"), None);
    // Within the clock-skew grace after the delete, the old pod still answers.
    assert_eq!(at("2026-01-01T10:05:02Z").as_deref(), Some("old"));
    assert_eq!(c.pod_at(ip("10.1.0.5"), None).unwrap().name, "new");
    assert_eq!(c.pod_by_uid("uid-old"), None);

    // Past the history window the old pod is forgotten.
    c.apply(
        &pod_object("other", "uid-o", "10.1.0.9", "2026-01-01T10:20:00Z"),
        ts("2026-01-01T10:20:00Z"),
    )
    .unwrap();
    assert_eq!(name_at(&c, "2026-01-01T10:04:59Z"), None);
    assert_eq!(name_at(&c, "2026-01-01T10:19:00Z").as_deref(), Some("new"));
}

#[test]
fn pod_recreated_under_the_same_name_is_attributed_by_time() {
    // A StatefulSet replaces oracle-0 (new uid, same name, same address) without our seeing
    // the delete, as between two snapshots.
    let mut c = Cluster::default();
    c.apply(
        &pod_object("oracle-0", "uid-1", "10.1.0.7", "2026-01-01T09:00:00Z"),
        ts("2026-01-01T09:00:00Z"),
    )
    .unwrap();
    c.apply(
        &pod_object("oracle-0", "uid-2", "10.1.0.7", "2026-01-01T09:30:00Z"),
        ts("2026-01-01T09:31:00Z"),
    )
    .unwrap();
    let uid = |t: &str| {
        c.pod_at(ip("10.1.0.7"), Some(ts(t)))
            .and_then(|p| p.uid.clone())
    };
    assert_eq!(uid("2026-01-01T09:29:00Z").as_deref(), Some("uid-1"));
    assert_eq!(uid("2026-01-01T09:30:30Z").as_deref(), Some("uid-2"));
    assert_eq!(c.pod_by_uid("uid-1"), None);
    assert_eq!(c.pod_by_uid("uid-2").unwrap().name, "oracle-0");
}

#[test]
fn pods_seen_out_of_order_still_attribute_by_creation() {
    // A completed job pod and the running pod that got its address, newest listed first
    // (observed within the history window of the job's end).
    let mut c = Cluster::default();
    let t = ts("2026-01-01T11:05:00Z");
    c.apply(
        &pod_object("web", "uid-web", "10.1.0.8", "2026-01-01T11:00:00Z"),
        t,
    )
    .unwrap();
    c.apply(
        &pod_object("job", "uid-job", "10.1.0.8", "2026-01-01T10:00:00Z"),
        t,
    )
    .unwrap();
    assert_eq!(c.pod_at(ip("10.1.0.8"), None).unwrap().name, "web");
    let at = |s: &str| c.pod_at(ip("10.1.0.8"), Some(ts(s))).unwrap().name.clone();
    assert_eq!(at("2026-01-01T10:30:00Z"), "job");
    assert_eq!(at("2026-01-01T11:30:00Z"), "web");
}

#[test]
fn enrich_fills_source_destination_and_denying_policy() {
    let c = fixture_cluster();
    let mut e = drop_event(
        &droptrace::clock::now_rfc3339(),
        "10.244.1.15",
        40312,
        "10.244.2.7",
        1521,
        "SYN",
    );
    enrich(&c, &mut e, &EnrichOptions::default());
    let src = e.source.as_ref().unwrap();
    assert_eq!(src.namespace.as_deref(), Some("app"));
    assert_eq!(src.pod.as_deref(), Some("client-7d9f8b6c5d-x2k4p"));
    assert_eq!(
        src.pod_uid.as_deref(),
        Some("5f0c6f7e-2a41-4d3b-9c8e-1b2a3c4d5e6f")
    );
    assert_eq!(
        src.workload
            .as_ref()
            .map(|w| (w.kind.as_str(), w.name.as_str())),
        Some(("Deployment", "client"))
    );
    assert_eq!(src.node.as_deref(), Some("worker-1"));
    assert_eq!(src.labels["app"], "client");
    let dst = e.destination.as_ref().unwrap();
    assert_eq!(dst.pod.as_deref(), Some("oracle-0"));
    assert_eq!(dst.service.as_deref(), Some("oracle"));
    assert_eq!(dst.workload.as_ref().unwrap().kind, "StatefulSet");

    let p = e.policy.as_ref().unwrap();
    assert_eq!(p.verdict, "denied");
    assert_eq!(p.direction, "egress");
    assert_eq!(p.policies.len(), 1);
    assert_eq!(
        (
            p.policies[0].namespace.as_str(),
            p.policies[0].name.as_str()
        ),
        ("app", "default-deny-egress")
    );
    assert_eq!(p.policies[0].rule, None);
    assert_eq!(
        p.explanation,
        "no egress rule of app/default-deny-egress allows TCP/1521 to db/oracle-0 from app/client-7d9f8b6c5d-x2k4p; \
         closest: app/default-deny-egress egress rule 1 matches db/oracle-0 but not TCP/1521"
    );
    assert_eq!(
        p.suggested_fix.as_deref(),
        Some(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-egress-client-to-oracle-tcp-1521
  namespace: app
spec:
  podSelector:
    matchLabels:
      app: client
  policyTypes:
  - Egress
  egress:
  - to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: db
      podSelector:
        matchLabels:
          app: oracle
    ports:
    - protocol: TCP
      port: 1521
"
        )
    );
    // The ingress side (db/allow-app-to-oracle, named port "listener") would let it in.
    let q = query(ip("10.244.1.15"), ip("10.244.2.7"), Protocol::Tcp, 1521);
    let r = evaluate_flow(&c, &q, &[]);
    assert!(r.verdict.ingress.allowed);
    assert_eq!(r.verdict.ingress.policies[0].name, "allow-app-to-oracle");
    assert_eq!(r.verdict.ingress.policies[0].rule, Some(0));
}

#[test]
fn service_address_is_judged_against_its_backends() {
    let c = fixture_cluster();
    let mut e = drop_event(
        "2026-11-25T12:00:00.000000Z",
        "10.244.1.15",
        40312,
        "10.96.12.34",
        1521,
        "SYN",
    );
    enrich(&c, &mut e, &EnrichOptions::default());
    let dst = e.destination.as_ref().unwrap();
    assert_eq!(dst.ip, Some(ip("10.96.12.34")));
    assert_eq!(dst.service.as_deref(), Some("oracle"));
    assert_eq!(dst.pod.as_deref(), Some("oracle-0"));
    let p = e.policy.unwrap();
    assert_eq!(
        (p.verdict.as_str(), p.direction.as_str()),
        ("denied", "egress")
    );
}

#[test]
fn egress_allowed_by_a_rule_ingress_denied() {
    let c = fixture_cluster();
    // The job pod's egress rule 1 admits namespace db on 1522; db admits only app=client.
    let q = query(ip("10.244.2.31"), ip("10.244.2.7"), Protocol::Tcp, 1522);
    let r = evaluate_flow(&c, &q, &[]);
    assert!(r.verdict.egress.allowed);
    assert_eq!(r.verdict.egress.policies[0].name, "default-deny-egress");
    assert_eq!(r.verdict.egress.policies[0].rule, Some(1));
    assert!(!r.verdict.ingress.allowed);
    assert_eq!(r.policy.direction, "ingress");
    assert_eq!(
        r.policy.explanation,
        "no ingress rule of db/allow-app-to-oracle, db/default-deny allows TCP/1522 to db/oracle-0 from \
         app/nightly-export-29010240-7xk2q"
    );
}

#[test]
fn syn_ack_reply_is_judged_as_the_connection_it_answers() {
    // x/a may open nothing; y/b opened a connection to x/a:80 and x/a's SYN|ACK was dropped.
    let c = world(A_NO_EGRESS);
    let xa = pod_ip("x/a").to_string();
    let yb = pod_ip("y/b").to_string();
    let t = "2026-11-25T12:00:00.000000Z";
    let mut reply = drop_event(t, &xa, 80, &yb, 40000, "SYN|ACK");
    enrich(&c, &mut reply, &EnrichOptions::default());
    assert_eq!(reply.policy.as_ref().unwrap().verdict, "allowed");
    // The packet's own direction stays in source/destination.
    assert_eq!(reply.source.as_ref().unwrap().pod.as_deref(), Some("a"));

    let mut syn = drop_event(t, &xa, 40000, &yb, 80, "SYN");
    enrich(&c, &mut syn, &EnrichOptions::default());
    let p = syn.policy.unwrap();
    assert_eq!(
        (p.verdict.as_str(), p.direction.as_str()),
        ("denied", "egress")
    );

    // With conntrack, its original tuple says who opened the connection.
    let mut data = drop_event(t, &xa, 80, &yb, 40000, "ACK|PSH");
    let tuple = |s: &str, sp, d: &str, dp| Tuple {
        src_ip: ip(s),
        src_port: sp,
        dst_ip: ip(d),
        dst_port: dp,
        community_id: None,
    };
    data.conntrack = Some(Box::new(Conntrack {
        state: "ESTABLISHED".into(),
        status: vec!["SEEN_REPLY".into()],
        original: tuple(&yb, 40000, &xa, 80),
        reply: tuple(&xa, 80, &yb, 40000),
        nat: "none".into(),
        mark: 0,
        zone: 0,
    }));
    enrich(&c, &mut data, &EnrichOptions::default());
    assert_eq!(data.policy.unwrap().verdict, "allowed");
}

#[test]
fn enrich_leaves_other_kinds_and_unknown_addresses_alone() {
    let c = fixture_cluster();
    let mut tns = Event::new(Kind::Tns, "2026-11-25T12:00:00.000000Z".into(), "n");
    enrich(&c, &mut tns, &EnrichOptions::default());
    assert!(tns.source.is_none() && tns.policy.is_none());
    let mut e = drop_event(
        "2026-11-25T12:00:00.000000Z",
        "203.0.113.9",
        5000,
        "198.51.100.1",
        1521,
        "SYN",
    );
    enrich(&c, &mut e, &EnrichOptions::default());
    assert_eq!(e.source.as_ref().unwrap().ip, Some(ip("203.0.113.9")));
    assert_eq!(e.source.as_ref().unwrap().pod, None);
    assert!(e.policy.is_none(), "no pod involved, no policy verdict");
    // A node address is the node, host network.
    let mut e = drop_event(
        "2026-11-25T12:00:00.000000Z",
        "192.168.10.11",
        5000,
        "10.244.2.7",
        1521,
        "SYN",
    );
    enrich(&c, &mut e, &EnrichOptions::default());
    let s = e.source.unwrap();
    assert_eq!(
        (s.node.as_deref(), s.host_network, s.pod.clone()),
        (Some("worker-1"), true, None)
    );
    let p = e.policy.unwrap();
    assert_eq!(p.verdict, "denied");
    assert_eq!(p.direction, "ingress");
}

const DENY_X_INGRESS_EXCEPT_X: &str = "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-only, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
  ingress:
  - from:
    - podSelector: {}
";

fn with_host_network_pod(c: &mut Cluster) {
    // x/h: hostNetwork on n1, its address is n1's.
    apply_json(
        c,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "h", "namespace": "x", "uid": "00000000-0000-4000-8000-0000000000aa",
                         "labels": {"pod": "h"}},
            "spec": {"nodeName": "n1", "hostNetwork": true, "containers": [{"name": "c"}]},
            "status": {"podIP": "192.168.0.1", "hostIP": "192.168.0.1"},
        }),
    );
}

#[test]
fn traffic_from_the_pods_own_node_is_always_allowed() {
    let mut c = world(DENY_X_INGRESS_EXCEPT_X);
    with_host_network_pod(&mut c);
    let n1 = ip("192.168.0.1");
    let n2 = ip("192.168.0.2");
    // x/a runs on n1, x/b on n2.
    assert!(allowed(&c, n1, pod_ip("x/a"), Protocol::Tcp, 80));
    assert!(!allowed(&c, n1, pod_ip("x/b"), Protocol::Tcp, 80));
    assert!(allowed(&c, n2, pod_ip("x/b"), Protocol::Tcp, 80));
    // Egress to the own node too, even with every egress denied.
    assert!(allowed(&c, pod_ip("x/a"), n1, Protocol::Tcp, 10250));
    assert!(!allowed(&c, pod_ip("x/a"), n2, Protocol::Tcp, 10250));
    let q = query(n1, pod_ip("x/a"), Protocol::Tcp, 80);
    let r = evaluate_flow(&c, &q, &[]);
    assert_eq!(
        r.verdict.ingress.explanation,
        "192.168.0.1 is the node of x/a: always allowed"
    );
}

#[test]
fn host_network_pods_are_outside_selectors() {
    let mut c = world(DENY_X_INGRESS_EXCEPT_X);
    with_host_network_pod(&mut c);
    // `podSelector: {}` in x does not select x/h: its traffic is node traffic.
    let h = ip("192.168.0.1");
    assert!(!allowed(&c, h, pod_ip("x/b"), Protocol::Tcp, 80));
    // Nor is x/h isolated itself, although a policy of x selects every pod.
    assert!(allowed(&c, pod_ip("y/a"), h, Protocol::Tcp, 80));
    // An ipBlock does match it.
    apply_json(
        &mut c,
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "from-nodes", "namespace": "x"},
            "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "192.168.0.0/24"}}]}]},
        }),
    );
    assert!(allowed(&c, h, pod_ip("x/b"), Protocol::Tcp, 80));
}

#[test]
fn suggested_fix_parses_and_flips_the_verdict() {
    let mut c = fixture_cluster();
    let q = query(ip("10.244.1.15"), ip("10.244.2.7"), Protocol::Tcp, 1521);
    let fix = evaluate_flow(&c, &q, &[1522]).policy.suggested_fix.unwrap();
    assert!(fix.contains("port: 1522"));
    for o in Snapshot::parse(&fix, Mode::Strict).unwrap().objects {
        c.apply(&o, now()).unwrap();
    }
    let r = evaluate_flow(&c, &q, &[]);
    assert!(r.verdict.allowed(), "{:?}", r.policy);
    assert_eq!(r.policy.verdict, "allowed");
    assert_eq!(r.policy.suggested_fix, None);
    assert_eq!(
        r.verdict.egress.policies[0].name,
        "allow-egress-client-to-oracle-tcp-1521"
    );
}

#[test]
fn both_directions_denied_gives_two_policies_that_together_allow() {
    // y/a may not send anywhere, x/a admits nobody from y.
    let mut c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: y-no-egress, namespace: y}
spec:
  podSelector: {}
  policyTypes: [Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: x-deny, namespace: x}
spec:
  podSelector: {}
",
    );
    let q = query(pod_ip("y/a"), pod_ip("x/a"), Protocol::Udp, 81);
    let r = evaluate_flow(&c, &q, &[]);
    assert_eq!(r.policy.verdict, "denied");
    assert_eq!(r.policy.direction, "egress");
    let names: Vec<&str> = r.policy.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["y-no-egress", "x-deny"]);
    let fix = r.policy.suggested_fix.unwrap();
    let objects = Snapshot::parse(&fix, Mode::Strict).unwrap().objects;
    assert_eq!(objects.len(), 2);
    // One of them is not enough.
    let mut half = c.clone();
    half.apply(&objects[0], now()).unwrap();
    assert!(!evaluate_flow(&half, &q, &[]).verdict.allowed());
    for o in &objects {
        c.apply(o, now()).unwrap();
    }
    assert!(evaluate_flow(&c, &q, &[]).verdict.allowed());
    // Exactly this flow: another port or another pod stays denied.
    assert!(!allowed(
        &c,
        pod_ip("y/a"),
        pod_ip("x/a"),
        Protocol::Udp,
        80
    ));
    assert!(!allowed(
        &c,
        pod_ip("y/a"),
        pod_ip("x/a"),
        Protocol::Tcp,
        81
    ));
    assert!(!allowed(
        &c,
        pod_ip("y/b"),
        pod_ip("x/a"),
        Protocol::Udp,
        81
    ));
    assert!(!allowed(
        &c,
        pod_ip("y/a"),
        pod_ip("x/b"),
        Protocol::Udp,
        81
    ));
}

#[test]
fn fix_to_an_outside_address_uses_an_ip_block() {
    let c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: no-egress, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Egress]
",
    );
    let q = query(pod_ip("x/b"), ip("203.0.113.20"), Protocol::Tcp, 1521);
    let fix = evaluate_flow(&c, &q, &[]).policy.suggested_fix.unwrap();
    assert!(
        fix.contains("name: allow-egress-b-to-203-0-113-20-tcp-1521"),
        "{fix}"
    );
    assert!(
        fix.contains("- ipBlock:\n        cidr: 203.0.113.20/32"),
        "{fix}"
    );
}

#[test]
fn stable_selector_prefers_workload_labels() {
    let l = |pairs: &[(&str, &str)]| -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert_eq!(
        stable_selector(&l(&[
            ("app.kubernetes.io/name", "db"),
            ("app", "legacy"),
            ("pod-template-hash", "x")
        ])),
        l(&[("app.kubernetes.io/name", "db")])
    );
    assert_eq!(
        stable_selector(&l(&[("app", "web"), ("version", "2")])),
        l(&[("app", "web")])
    );
    assert_eq!(
        stable_selector(&l(&[
            ("tier", "db"),
            ("pod-template-hash", "5c9d"),
            ("controller-revision-hash", "oracle-5c"),
            ("statefulset.kubernetes.io/pod-name", "oracle-0"),
        ])),
        l(&[("tier", "db")])
    );
}

#[test]
fn fix_does_not_isolate_pods_that_were_not_isolated() {
    // x/a and x/b share app=web; only x/a is isolated for egress. A fix selecting app=web
    // would cut x/b off from everything else, so it selects x/a's workload labels instead.
    let mut c = world(A_NO_EGRESS);
    apply_json(
        &mut c,
        netpol_world::pod_json("x/a", json!({"pod": "a", "app": "web"})),
    );
    apply_json(
        &mut c,
        netpol_world::pod_json("x/b", json!({"pod": "b", "app": "web"})),
    );
    let q = query(pod_ip("x/a"), pod_ip("y/b"), Protocol::Tcp, 80);
    let fix = evaluate_flow(&c, &q, &[]).policy.suggested_fix.unwrap();
    assert!(
        fix.contains("  podSelector:\n    matchLabels:\n      app: web\n      pod: a\n"),
        "{fix}"
    );
    assert!(!fix.contains("Caution"), "{fix}");
    for o in Snapshot::parse(&fix, Mode::Strict).unwrap().objects {
        c.apply(&o, now()).unwrap();
    }
    assert!(allowed(&c, pod_ip("x/a"), pod_ip("y/b"), Protocol::Tcp, 80));
    // x/b keeps all its egress.
    assert!(allowed(&c, pod_ip("x/b"), pod_ip("z/c"), Protocol::Udp, 81));
}

#[test]
fn fix_that_must_isolate_more_pods_says_so() {
    // x/a is isolated as the pod without a `pod` label; x/b has x/a's labels and more, so any
    // selector of x/a's labels also selects x/b, which nothing isolates today.
    let mut c = world(
        "
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: unlabelled-no-egress, namespace: x}
spec:
  podSelector:
    matchExpressions: [{key: pod, operator: DoesNotExist}]
  policyTypes: [Egress]
",
    );
    apply_json(&mut c, netpol_world::pod_json("x/a", json!({"app": "web"})));
    apply_json(
        &mut c,
        netpol_world::pod_json("x/b", json!({"app": "web", "pod": "b"})),
    );
    let q = query(pod_ip("x/a"), pod_ip("y/b"), Protocol::Tcp, 80);
    let fix = evaluate_flow(&c, &q, &[]).policy.suggested_fix.unwrap();
    assert!(
        fix.starts_with(
            "# Caution: this also selects 1 pod(s) of x that no policy isolates for egress today; \
             they would lose their other egress traffic.\napiVersion: networking.k8s.io/v1\n"
        ),
        "{fix}"
    );
}
