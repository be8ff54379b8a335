//! Snapshot files: kubectl List output, typed lists, YAML manifests, bad input, reloads.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use droptrace::{
    enrich::k8s::{
        DEFAULT_IP_HISTORY, SnapshotWatcher,
        snapshot::{Mode, Snapshot},
    },
    enrich::model::{ObjectKey, now},
    event::Workload,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/k8s")
        .join(name)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A file of its own under the temp dir, for tests that need a path.
fn temp_file(text: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!("droptrace-k8s-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("snap-{}.yaml", N.fetch_add(1, Ordering::Relaxed)));
    std::fs::write(&path, text).unwrap();
    path
}

fn strict_error(text: &str) -> String {
    Snapshot::parse(text, Mode::Strict).unwrap_err()
}

#[test]
fn kubectl_list_loads_every_kind() {
    let snap = Snapshot::read(&fixture("cluster.json"), Mode::Strict).unwrap();
    assert_eq!(snap.objects.len(), 13);
    let c = snap.into_cluster(now(), DEFAULT_IP_HISTORY);
    assert_eq!(c.pod_count(), 4);
    assert_eq!(c.policies().len(), 3);

    let client = c
        .pod(&ObjectKey::new("app", "client-7d9f8b6c5d-x2k4p"))
        .unwrap();
    assert_eq!(client.ips, [ip("10.244.1.15")]);
    assert_eq!(client.node.as_deref(), Some("worker-1"));
    assert_eq!(
        client.uid.as_deref(),
        Some("5f0c6f7e-2a41-4d3b-9c8e-1b2a3c4d5e6f")
    );
    assert_eq!(
        client.workload,
        Some(Workload {
            kind: "Deployment".into(),
            name: "client".into()
        })
    );
    let oracle = c.pod_at(ip("10.244.2.7"), None).unwrap();
    assert_eq!(
        (oracle.namespace.as_str(), oracle.name.as_str()),
        ("db", "oracle-0")
    );
    assert_eq!(oracle.workload.as_ref().unwrap().kind, "StatefulSet");
    assert_eq!(oracle.ports[0].name.as_deref(), Some("listener"));
    let job = c
        .pod(&ObjectKey::new("app", "nightly-export-29010240-7xk2q"))
        .unwrap();
    assert_eq!(job.workload.as_ref().unwrap().kind, "Job");
    assert_eq!(job.phase.as_deref(), Some("Succeeded"));

    // hostNetwork pods hold their node's address: it names the node, never the pod.
    assert_eq!(c.pod_at(ip("192.168.10.11"), None), None);
    assert_eq!(c.node_of_ip(ip("192.168.10.11")), Some("worker-1"));
    assert_eq!(c.node_ips("worker-2"), [ip("192.168.10.12")]);
    assert!(
        c.pod_by_uid("c1d2e3f4-a5b6-4c7d-8e9f-0a1b2c3d4e5f")
            .unwrap()
            .host_network
    );

    let svc = c.service_at_ip(ip("10.96.12.34")).unwrap();
    assert_eq!(svc.name, "oracle");
    assert_eq!(
        c.services_of(oracle).into_iter().collect::<Vec<_>>(),
        ["oracle"]
    );
    // targetPort "listener" resolves on the pod.
    let backends = c.backends(svc, 1521, droptrace::enrich::model::Protocol::Tcp);
    assert_eq!(backends.len(), 1);
    assert_eq!(
        (backends[0].0.name.as_str(), backends[0].1),
        ("oracle-0", 1521)
    );
    assert_eq!(
        c.namespace_labels("app")
            .unwrap()
            .get("team")
            .map(String::as_str),
        Some("payments")
    );
}

#[test]
fn typed_pod_list_items_take_kind_from_the_list() {
    let c = Snapshot::read(&fixture("podlist.json"), Mode::Strict)
        .unwrap()
        .into_cluster(now(), DEFAULT_IP_HISTORY);
    let p = c.pod_at(ip("fd00:10:244:1::28"), None).unwrap();
    assert_eq!(p.name, "batch-5b7c9d8f6-abcde");
    assert_eq!(p.ips.len(), 2);
    assert_eq!(p.workload.as_ref().unwrap().name, "batch");
    // Namespaces without a Namespace object still carry the automatic name label.
    assert_eq!(
        c.namespace_labels("jobs")
            .unwrap()
            .get("kubernetes.io/metadata.name")
            .map(String::as_str),
        Some("jobs")
    );
}

#[test]
fn yaml_manifests_multi_document() {
    let snap = Snapshot::read(&fixture("manifests.yaml"), Mode::Strict).unwrap();
    assert_eq!(snap.objects.len(), 3);
    let c = snap.into_cluster(now(), DEFAULT_IP_HISTORY);
    let p = c.policies().get(&ObjectKey::new("shop", "web")).unwrap();
    // No policyTypes in raw YAML: Ingress, and Egress because egress rules exist.
    assert!(p.ingress.is_some() && p.egress.is_some());
    let web = c.pod_at(ip("10.244.3.9"), None).unwrap();
    assert_eq!(
        web.ports[0].protocol,
        droptrace::enrich::model::Protocol::Tcp
    );
    assert_eq!(web.labels["app.kubernetes.io/version"], "1.4");
}

#[test]
fn single_object_json() {
    let snap = Snapshot::parse(
        r#"{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"solo"}}"#,
        Mode::Strict,
    )
    .unwrap();
    assert_eq!(snap.objects.len(), 1);
}

#[test]
fn unknown_kind_names_position_and_object() {
    let e = strict_error(
        r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"app"}},
            {"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web","namespace":"app"}}]}"#,
    );
    assert_eq!(
        e,
        "items[1] (Deployment app/web): unknown kind \"Deployment\" (expected Pod, Service, \
         EndpointSlice, Namespace, NetworkPolicy, Node or a List of them)"
    );
}

#[test]
fn malformed_object_names_the_field() {
    let e = strict_error(
        r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Pod",
            "metadata":{"name":"x","namespace":"app"},
            "spec":{"containers":[{"name":"c","ports":[{"containerPort":"http"}]}]}}]}"#,
    );
    assert_eq!(
        e,
        "items[0] (Pod app/x): spec.containers[0].ports[0].containerPort: invalid type: string \"http\", expected i32"
    );
    let e = strict_error(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nstatus: {podIP: 10.0.0.300}\n",
    );
    assert_eq!(
        e,
        "document 1 (Pod x): status.podIP: \"10.0.0.300\" is not an IP address"
    );
    let e = strict_error("apiVersion: v1\nkind: Pod\nmetadata: {namespace: a}\n");
    assert_eq!(e, "document 1 (Pod): metadata.name: missing");
    let e = strict_error("- just\n- a list\n");
    assert_eq!(
        e,
        "document 1, items[0]: expected an object (Pod, Service, EndpointSlice, Namespace, \
         NetworkPolicy, Node or a List of them), found a string"
    );
}

#[test]
fn invalid_label_selector_is_an_error_at_load() {
    let e = strict_error(
        "
apiVersion: v1
kind: Namespace
metadata: {name: db}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: bad, namespace: db}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector:
        matchExpressions:
        - {key: app, operator: Equals, values: [client]}
",
    );
    assert_eq!(
        e,
        "document 2 (NetworkPolicy db/bad): spec.ingress[0].from[0].podSelector.matchExpressions[0].operator: \
         unknown operator \"Equals\" (In, NotIn, Exists, DoesNotExist)"
    );
}

#[test]
fn invalid_policies_are_errors_at_load() {
    let policy = |spec: &str| {
        strict_error(&format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p, namespace: n}}\nspec:\n{spec}"
        ))
    };
    assert_eq!(
        policy("  podSelector: {}\n  ingress:\n  - ports:\n    - {port: 80, endPort: 70}\n"),
        "document 1 (NetworkPolicy n/p): spec.ingress[0].ports[0].endPort: 70 must be a port at or above port 80"
    );
    assert_eq!(
        policy("  podSelector: {}\n  ingress:\n  - ports:\n    - {protocol: ICMP}\n"),
        "document 1 (NetworkPolicy n/p): spec.ingress[0].ports[0].protocol: unsupported protocol \"ICMP\" (TCP, UDP or SCTP)"
    );
    assert_eq!(
        policy(
            "  podSelector: {}\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0/8, except: [192.168.0.0/16]}\n"
        ),
        "document 1 (NetworkPolicy n/p): spec.egress[0].to[0].ipBlock.except[0]: 192.168.0.0/16 is outside the cidr 10.0.0.0/8"
    );
    assert_eq!(
        policy("  podSelector: {}\n  egress:\n  - to:\n    - ipBlock: {cidr: 10.0.0.0}\n"),
        "document 1 (NetworkPolicy n/p): spec.egress[0].to[0].ipBlock.cidr: \"10.0.0.0\" is not a CIDR block (like 10.0.0.0/8)"
    );
    assert_eq!(
        policy("  podSelector: {}\n  policyTypes: [Inbound]\n"),
        "document 1 (NetworkPolicy n/p): spec.policyTypes[0]: unknown policy type \"Inbound\" (Ingress, Egress)"
    );
    assert_eq!(
        policy("  podSelector: {}\n  ingress:\n  - from:\n    - {}\n"),
        "document 1 (NetworkPolicy n/p): spec.ingress[0].from[0]: a peer needs podSelector, namespaceSelector or ipBlock"
    );
    assert_eq!(
        policy("  podSelector: {matchLabels: {app: 'a b'}}\n"),
        "document 1 (NetworkPolicy n/p): spec.podSelector.matchLabels.app: invalid label value \"a b\": \
         only alphanumerics, '-', '_' and '.' are allowed"
    );
}

#[test]
fn old_api_version_is_refused() {
    let e = strict_error(
        "apiVersion: extensions/v1beta1\nkind: NetworkPolicy\nmetadata: {name: old, namespace: n}\nspec: {podSelector: {}}\n",
    );
    assert_eq!(
        e,
        "document 1 (NetworkPolicy n/old): unsupported apiVersion \"extensions/v1beta1\" for NetworkPolicy (expected networking.k8s.io/v1)"
    );
}

#[test]
fn file_errors_start_with_the_file_name() {
    let path = temp_file("{\"apiVersion\": \"v1\", \"kind\": \"List\", \"items\": [\n");
    let e = Snapshot::read(&path, Mode::Strict).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: not valid JSON: EOF while parsing a list at line 2 column 0",
            path.display()
        )
    );
    let missing = Path::new("/nonexistent/snap.json");
    assert_eq!(
        Snapshot::read(missing, Mode::Strict)
            .unwrap_err()
            .to_string(),
        "/nonexistent/snap.json: No such file or directory (os error 2)"
    );
    let path = temp_file("a: [\nb: c\n");
    let e = Snapshot::read(&path, Mode::Strict).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: document 1: not valid YAML: ", path.display())),
        "{e}"
    );
    assert!(!e.contains('\n'));
}

#[test]
fn tolerant_mode_skips_bad_objects_and_says_why() {
    let snap = Snapshot::parse(
        r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"Namespace","metadata":{"name":"app"}},
            {"apiVersion":"apps/v1","kind":"Deployment","metadata":{"name":"web","namespace":"app"}},
            {"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"p","namespace":"app"},
             "spec":{"podSelector":{"matchExpressions":[{"key":"a","operator":"In"}]}}},
            {"apiVersion":"v1","kind":"Pod","metadata":{"name":"ok","namespace":"app"}}]}"#,
        Mode::Tolerant,
    )
    .unwrap();
    assert_eq!(snap.objects.len(), 2);
    let skipped: Vec<String> = snap.skipped.iter().map(ToString::to_string).collect();
    assert_eq!(
        skipped,
        [
            "items[1] (Deployment app/web): unknown kind \"Deployment\" (expected Pod, Service, EndpointSlice, \
             Namespace, NetworkPolicy, Node or a List of them)",
            "items[2] (NetworkPolicy app/p): spec.podSelector.matchExpressions[0].values: operator In needs at least one value",
        ]
    );
}

#[test]
fn watcher_reloads_on_change_and_keeps_history_of_removed_pods() {
    let pod = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: app, uid: {name}-uid}}\nstatus: {{podIP: {ip}}}\n---\n"
        )
    };
    let path = temp_file(&pod("one", "10.1.0.1"));
    let t0 = now();
    let (mut watcher, mut cluster) =
        SnapshotWatcher::start(&path, t0, Duration::from_secs(600)).unwrap();
    assert_eq!(cluster.pod_at(ip("10.1.0.1"), None).unwrap().name, "one");
    // Nothing changed: nothing to do.
    assert!(watcher.poll(&mut cluster, t0).unwrap().is_none());

    // The same content written again (new mtime) is not a reload either.
    std::fs::write(&path, pod("one", "10.1.0.1")).unwrap();
    assert!(watcher.poll(&mut cluster, t0).unwrap().is_none());

    // Replace pod one by two, add a bad object: reload, skip it, remember one.
    let t1 = t0.checked_add(Duration::from_secs(60)).unwrap();
    std::fs::write(
        &path,
        pod("two", "10.1.0.2") + "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n",
    )
    .unwrap();
    let reload = watcher.poll(&mut cluster, t1).unwrap().unwrap();
    assert_eq!(reload.objects, 1);
    assert_eq!(reload.skipped.len(), 1);
    assert!(
        reload.skipped[0]
            .to_string()
            .starts_with("document 2 (ConfigMap cm): unknown kind")
    );
    assert_eq!(cluster.pod(&ObjectKey::new("app", "one")), None);
    assert_eq!(cluster.pod_at(ip("10.1.0.2"), None).unwrap().name, "two");
    // A late event from before the reload still finds pod one.
    let before = t1.checked_sub(Duration::from_secs(1)).unwrap();
    assert_eq!(
        cluster.pod_at(ip("10.1.0.1"), Some(before)).unwrap().name,
        "one"
    );

    // A broken file keeps the cluster as it was.
    std::fs::write(&path, "{ broken").unwrap();
    assert!(watcher.poll(&mut cluster, t1).is_err());
    assert_eq!(cluster.pod_at(ip("10.1.0.2"), None).unwrap().name, "two");
}

#[test]
fn strict_start_refuses_a_bad_file() {
    let path = temp_file("apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: n}\n");
    let e = SnapshotWatcher::start(&path, now(), DEFAULT_IP_HISTORY).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "{}: document 1 (Secret n/s): unknown kind \"Secret\" (expected Pod, Service, EndpointSlice, \
             Namespace, NetworkPolicy, Node or a List of them)",
            path.display()
        )
    );
}

#[test]
fn garbage_is_an_error_never_a_panic() {
    let deep_json = "[".repeat(5000);
    let deep_yaml = "- ".repeat(5000) + "x";
    let inputs = [
        "",
        "   \n",
        "---\n---\n",
        "null",
        "42",
        "\"a string\"",
        "[1, 2]",
        "{\"kind\": 7}",
        "{\"kind\": \"List\", \"items\": 7}",
        "kind: List\nitems: [null, 3, {kind: Pod}, {kind: Pod, apiVersion: v1, metadata: 5}]",
        "\u{0}\u{1}\u{2}binary",
        "{{{{",
        "a: &a [*a, *a]\nb: *a\n",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, ports: [{containerPort: 99999}]}]}\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: nope}\n",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: e}\naddressType: IPv4\nendpoints: [{addresses: [x]}]\n",
        "apiVersion: v1\nkind: Node\nmetadata: {name: n}\nstatus: {addresses: [{type: InternalIP, address: bad}]}\n",
        &deep_json,
        &deep_yaml,
    ];
    for text in inputs {
        for mode in [Mode::Strict, Mode::Tolerant] {
            if let Err(e) = Snapshot::parse(text, mode) {
                assert!(!e.contains('\n'), "{e}");
            }
        }
    }
    assert_eq!(
        strict_error(inputs[13]),
        "document 1 (Pod p): spec.containers[0].ports[0].containerPort: 99999 is not a port (1-65535)"
    );
    assert_eq!(
        strict_error(inputs[16]),
        "document 1 (Node n): status.addresses[0].address: \"bad\" is not an IP address"
    );
}

#[test]
fn endpoint_slice_addresses_name_pods_we_have_no_object_for() {
    let c = Snapshot::parse(
        "
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: oracle-x1
  namespace: db
  labels: {kubernetes.io/service-name: oracle}
addressType: IPv4
endpoints:
- addresses: [10.244.9.9]
  targetRef: {kind: Pod, name: oracle-1, namespace: db}
",
        Mode::Strict,
    )
    .unwrap()
    .into_cluster(now(), DEFAULT_IP_HISTORY);
    let e = droptrace::enrich::k8s::enrich::endpoint(&c, ip("10.244.9.9"), None);
    assert_eq!(e.namespace.as_deref(), Some("db"));
    assert_eq!(e.pod.as_deref(), Some("oracle-1"));
    assert_eq!(e.service.as_deref(), Some("oracle"));
}
