//! The live API source against a fake API server on loopback that speaks the real list and
//! watch wire format, through the real kube client (a kubeconfig naming the server).
mod fake_api;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use droptrace::enrich::k8s::{
    Cluster, KubeSource, LiveError, LiveOptions,
    live::{self, Connection},
};
use droptrace::enrich::model::{self, ObjectKey};
use fake_api::{FakeApi, NAMESPACES, NODES, PODS, SERVICES, path_of, status};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{Value, json};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn key(ns: &str, name: &str) -> ObjectKey {
    ObjectKey::new(ns, name)
}

fn temp_dir() -> PathBuf {
    std::env::temp_dir().join(format!("droptrace-k8s-live-{}", std::process::id()))
}

/// Quick retries: the tests provoke errors on purpose.
fn opts() -> LiveOptions {
    LiveOptions {
        sync_timeout: Duration::from_secs(20),
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(100),
        ..LiveOptions::default()
    }
}

/// A Timestamp as the API server writes them (whole seconds).
fn seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap()
}

/// What the API server stores and the model never reads: it must not get in the way.
fn noise() -> Value {
    json!({
        "managedFields": [{"manager": "kubectl-client-side-apply", "operation": "Update",
            "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}],
        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{\"big\":true}"},
    })
}

fn meta(ns: Option<&str>, name: &str, rv: u32, labels: Value) -> Value {
    let mut m = noise();
    m["name"] = name.into();
    m["resourceVersion"] = rv.to_string().into();
    m["uid"] = format!("uid-{name}-{rv}").into();
    m["labels"] = labels;
    if let Some(ns) = ns {
        m["namespace"] = ns.into();
    }
    m
}

struct PodSpec<'a> {
    name: &'a str,
    uid: &'a str,
    ip: &'a str,
    rv: u32,
    created: Timestamp,
}

fn pod(p: PodSpec<'_>) -> Value {
    let mut m = meta(Some("app"), p.name, p.rv, json!({"app": "db"}));
    m["uid"] = p.uid.into();
    m["creationTimestamp"] = seconds(p.created).to_string().into();
    json!({
        "kind": "Pod", "apiVersion": "v1", "metadata": m,
        "spec": {"nodeName": "n1", "containers": [{"name": "db", "image": "oracle:23",
            "ports": [{"name": "tns", "containerPort": 1521, "protocol": "TCP"}]}]},
        "status": {"phase": "Running", "podIP": p.ip, "podIPs": [{"ip": p.ip}],
            "hostIP": "192.168.0.1", "hostIPs": [{"ip": "192.168.0.1"}]},
    })
}

/// A running pod `app/<name>` holding `ip`, created an hour ago.
fn simple_pod(name: &str, ip: &str, rv: u32) -> Value {
    pod(PodSpec {
        name,
        uid: &format!("uid-{name}"),
        ip,
        rv,
        created: model::now() - SignedDuration::from_hours(1),
    })
}

fn namespace(name: &str, labels: Value) -> Value {
    json!({"kind": "Namespace", "apiVersion": "v1", "metadata": meta(None, name, 5, labels)})
}

fn service(name: &str, cluster_ip: &str, protocol: &str) -> Value {
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": meta(Some("app"), name, 6, json!({})),
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "selector": {"app": "db"},
            "ports": [{"name": "tns", "port": 1521, "targetPort": "tns", "protocol": protocol}]},
    })
}

fn node(name: &str, address: &str) -> Value {
    json!({
        "kind": "Node", "apiVersion": "v1", "metadata": meta(None, name, 7, json!({})),
        "status": {"addresses": [{"type": "InternalIP", "address": address},
            {"type": "Hostname", "address": name}]},
    })
}

fn bookmark(kind: &str, rv: &str) -> Value {
    json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": rv,
        "annotations": {"k8s.io/initial-events-end": "true"}}})
}

async fn connect(api: &FakeApi) -> Connection {
    live::connect(Some(&api.write_kubeconfig(&temp_dir())))
        .await
        .unwrap()
}

/// Apply updates as the daemon would until `done` holds (or fail after 10 s).
async fn until(
    src: &mut KubeSource,
    cluster: &mut Cluster,
    what: &str,
    done: impl Fn(&Cluster) -> bool,
) {
    let waited = tokio::time::timeout(Duration::from_secs(10), async {
        while !done(cluster) {
            src.changed().await;
            src.apply(cluster);
        }
    })
    .await;
    assert!(waited.is_ok(), "timed out waiting for {what}");
}

fn uid_at(cluster: &Cluster, addr: &str, at: Option<Timestamp>) -> Option<String> {
    cluster.pod_at(ip(addr), at).and_then(|p| p.uid.clone())
}

fn label(cluster: &Cluster, name: &str, k: &str) -> Option<String> {
    cluster
        .pod(&key("app", name))
        .and_then(|p| p.labels.get(k).cloned())
}

#[tokio::test]
async fn follows_lists_watches_bookmarks_and_relists_after_410() {
    let api = FakeApi::start().await;
    api.set_list(
        NAMESPACES,
        "100",
        vec![namespace("app", json!({"team": "dba"}))],
    );
    api.set_list(
        PODS,
        "100",
        vec![
            simple_pod("a", "10.1.0.1", 90),
            simple_pod("c", "10.1.0.3", 91),
        ],
    );
    api.set_list(
        SERVICES,
        "100",
        vec![service("oracle", "10.96.0.10", "TCP")],
    );
    api.set_list(NODES, "100", vec![node("n1", "192.168.0.1")]);
    let conn = connect(&api).await;
    let (mut src, mut cluster) = KubeSource::start(&conn, &opts()).await.unwrap();

    // Every kind was listed before start returned.
    assert!(src.is_synced());
    assert_eq!(cluster.pod_count(), 2);
    assert_eq!(
        cluster
            .service_at_ip(ip("10.96.0.10"))
            .map(|s| s.name.as_str()),
        Some("oracle")
    );
    assert_eq!(cluster.node_of_ip(ip("192.168.0.1")), Some("n1"));
    assert_eq!(
        cluster
            .namespace_labels("app")
            .and_then(|l| l.get("team"))
            .map(String::as_str),
        Some("dba")
    );
    // The real client path: token from the kubeconfig, list from the watch cache, then a
    // watch from the list's resourceVersion with bookmarks.
    let list = &api.requests(PODS)[0];
    assert!(!list.is_watch());
    assert_eq!(list.authorization.as_deref(), Some("Bearer test-token"));
    assert_eq!(list.q("resourceVersion"), Some("0"));
    let w1 = api.watch_request(PODS, 1).await;
    assert_eq!(w1.q("resourceVersion"), Some("100"));
    assert_eq!(w1.q("allowWatchBookmarks"), Some("true"));

    // ADDED, MODIFIED, DELETED, BOOKMARK.
    api.send(PODS, "ADDED", simple_pod("b", "10.1.0.2", 101));
    let mut a2 = simple_pod("a", "10.1.0.1", 102);
    a2["metadata"]["labels"]["version"] = "2".into();
    api.send(PODS, "MODIFIED", a2.clone());
    api.send(PODS, "DELETED", simple_pod("c", "10.1.0.3", 103));
    api.send(PODS, "BOOKMARK", bookmark("Pod", "150"));
    until(&mut src, &mut cluster, "watch events", |c| {
        c.pod(&key("app", "b")).is_some()
            && c.pod(&key("app", "c")).is_none()
            && label(c, "a", "version").as_deref() == Some("2")
    })
    .await;
    // The deleted pod's address stays attributed to it (it was the last holder).
    assert_eq!(uid_at(&cluster, "10.1.0.3", None).as_deref(), Some("uid-c"));

    // The server ends the watch: it resumes from the bookmark, without listing again.
    api.end_watch(PODS);
    let w2 = api.watch_request(PODS, 2).await;
    assert_eq!(w2.q("resourceVersion"), Some("150"));
    assert_eq!(api.lists(PODS), 1);

    // 410 Gone as an ERROR event: list again. Meanwhile b went away and d came.
    api.set_list(
        PODS,
        "300",
        vec![a2.clone(), simple_pod("d", "10.1.0.4", 290)],
    );
    api.send(PODS, "ERROR", status(410, "150"));
    until(&mut src, &mut cluster, "the relist after 410", |c| {
        c.pod(&key("app", "d")).is_some() && c.pod(&key("app", "b")).is_none()
    })
    .await;
    assert_eq!(api.lists(PODS), 2);
    assert_eq!(
        api.watch_request(PODS, 3).await.q("resourceVersion"),
        Some("300")
    );
    assert_eq!(label(&cluster, "a", "version").as_deref(), Some("2"));
    assert_eq!(uid_at(&cluster, "10.1.0.2", None).as_deref(), Some("uid-b"));

    // An HTTP 410 answer to the watch request itself: start over with a list too.
    api.set_list(PODS, "400", vec![a2]);
    api.fail_next_watch(PODS, 410);
    api.end_watch(PODS);
    until(&mut src, &mut cluster, "the relist after HTTP 410", |c| {
        c.pod(&key("app", "d")).is_none()
    })
    .await;
    assert_eq!(api.lists(PODS), 3);
    let w4 = api.watch_request(PODS, 4).await;
    assert_eq!(w4.q("resourceVersion"), Some("300"));
    assert_eq!(
        api.watch_request(PODS, 5).await.q("resourceVersion"),
        Some("400")
    );

    // Other kinds were not disturbed; the counts say what happened.
    assert_eq!(api.lists(SERVICES), 1);
    assert_eq!(cluster.pod_count(), 1);
    let n = src.counts();
    assert_eq!(n.relists, 2, "{n:?}");
    assert!(n.errors >= 2, "{n:?}");
    assert_eq!(n.skipped, 0, "{n:?}");
}

#[tokio::test]
async fn pod_recreated_with_the_same_ip_is_attributed_by_time() {
    let api = FakeApi::start().await;
    let created_old = seconds(model::now() - SignedDuration::from_hours(2));
    let spec = |uid, rv, created| PodSpec {
        name: "oracle-0",
        uid,
        ip: "10.1.0.7",
        rv,
        created,
    };
    api.set_list(PODS, "10", vec![pod(spec("uid-old", 9, created_old))]);
    let conn = connect(&api).await;
    let (mut src, mut cluster) = KubeSource::start(&conn, &opts()).await.unwrap();
    let _ = api.watch_request(PODS, 1).await;

    let before_delete = model::now();
    api.send(PODS, "DELETED", pod(spec("uid-old", 11, created_old)));
    until(&mut src, &mut cluster, "the delete", |c| c.pod_count() == 0).await;
    let after_delete = model::now();

    // The StatefulSet re-creates the pod, same name, same address, a new uid.
    let created_new = Timestamp::from_second(after_delete.as_second() + 2).unwrap();
    api.send(PODS, "ADDED", pod(spec("uid-new", 12, created_new)));
    until(&mut src, &mut cluster, "the re-create", |c| {
        c.pod(&key("app", "oracle-0"))
            .is_some_and(|p| p.uid.as_deref() == Some("uid-new"))
    })
    .await;

    let old = Some("uid-old".to_string());
    let new = Some("uid-new".to_string());
    assert_eq!(
        uid_at(
            &cluster,
            "10.1.0.7",
            Some(created_old + SignedDuration::from_mins(30))
        ),
        old
    );
    assert_eq!(uid_at(&cluster, "10.1.0.7", Some(before_delete)), old);
    assert_eq!(
        uid_at(
            &cluster,
            "10.1.0.7",
            Some(created_new + SignedDuration::from_secs(1))
        ),
        new
    );
    assert_eq!(uid_at(&cluster, "10.1.0.7", None), new);
}

#[tokio::test]
async fn objects_the_model_rejects_are_skipped_and_counted() {
    let api = FakeApi::start().await;
    let mut bad_ip = simple_pod("bad-ip", "10.1.0.9", 20);
    bad_ip["status"]["podIP"] = "not-an-ip".into();
    let mut bad_type = simple_pod("bad-type", "10.1.0.8", 21);
    bad_type["spec"]["containers"][0]["ports"][0]["containerPort"] = "tns".into();
    api.set_list(
        PODS,
        "30",
        vec![simple_pod("good", "10.1.0.1", 19), bad_ip, bad_type],
    );
    api.set_list(
        SERVICES,
        "30",
        vec![
            service("oracle", "10.96.0.10", "TCP"),
            service("weird", "10.96.0.11", "ICMP"),
        ],
    );
    let conn = connect(&api).await;
    let (mut src, mut cluster) = KubeSource::start(&conn, &opts()).await.unwrap();

    // One bad item does not fail its list: the others are in.
    assert_eq!(cluster.pod_count(), 1);
    assert!(cluster.service_at_ip(ip("10.96.0.10")).is_some());
    assert!(cluster.service_at_ip(ip("10.96.0.11")).is_none());
    let report = src.take_skipped();
    assert_eq!(report.count, 3, "{report:?}");
    let reasons: Vec<String> = report.reasons.iter().map(ToString::to_string).collect();
    let mut sorted = reasons.clone();
    sorted.sort();
    assert!(
        sorted[0].starts_with("(Pod app/bad-ip): status.podIP: \"not-an-ip\""),
        "{reasons:?}"
    );
    assert!(
        sorted[1].starts_with("(Pod app/bad-type): spec.containers[0].ports[0].containerPort"),
        "{reasons:?}"
    );
    assert!(
        sorted[2].starts_with("(Service app/weird): spec.ports[0].protocol"),
        "{reasons:?}"
    );
    assert!(reasons.iter().all(|r| !r.contains('\n')));
    let lost = report.lost().unwrap();
    assert_eq!(
        serde_json::to_value(&lost).unwrap(),
        json!({"source": "input", "reason": "k8s_object_skipped"})
    );
    let nothing = src.take_skipped();
    assert_eq!((nothing.count, nothing.lost()), (0, None));

    // In the watch: a line that is not JSON, an unknown event type, a bad update of a good
    // pod (its previous version stays), then a good pod: the watch goes on.
    let _ = api.watch_request(PODS, 1).await;
    api.send_raw(PODS, "this is not JSON");
    api.send_raw(PODS, r#"{"type":"RENAMED","object":{}}"#);
    let mut good_bad = simple_pod("good", "10.1.0.1", 31);
    good_bad["status"]["podIPs"] = json!([{"ip": "10.1.0.1"}, {"ip": "bogus"}]);
    api.send(PODS, "MODIFIED", good_bad);
    api.send(PODS, "ADDED", simple_pod("late", "10.1.0.5", 32));
    until(
        &mut src,
        &mut cluster,
        "the good pod after bad events",
        |c| c.pod(&key("app", "late")).is_some(),
    )
    .await;
    assert_eq!(
        cluster
            .pod(&key("app", "good"))
            .map(|p| p.ips.clone())
            .unwrap(),
        [ip("10.1.0.1")]
    );
    let report = src.take_skipped();
    assert_eq!(report.count, 3, "{report:?}");
    assert!(
        report.reasons[0]
            .to_string()
            .starts_with("Pod watch: undecodable watch event"),
        "{report:?}"
    );
    assert_eq!(api.lists(PODS), 1, "no relist for bad events");
}

#[tokio::test]
async fn caches_not_synced_in_time_is_a_clear_error() {
    let api = FakeApi::start().await;
    api.fail_lists(NODES, 403);
    let conn = connect(&api).await;
    let quick = LiveOptions {
        sync_timeout: Duration::from_millis(1500),
        ..opts()
    };
    let err = KubeSource::start(&conn, &quick).await.unwrap_err();
    let msg = err.to_string();
    assert!(!err.is_input());
    assert!(
        msg.starts_with(&format!(
            "Kubernetes API {}: caches not synced after 1s 500ms: Node: list: nodes is forbidden",
            api.url()
        )),
        "{msg}"
    );
    assert!(msg.ends_with("at the cluster scope (403)"), "{msg}");
    assert!(!msg.contains('\n'));

    // Without Nodes the rest syncs.
    let (_src, cluster) = KubeSource::start(
        &conn,
        &LiveOptions {
            nodes: false,
            ..quick
        },
    )
    .await
    .unwrap();
    assert_eq!(cluster.pod_count(), 0);
}

/// A kubeconfig like the fake API's with its server URL rewritten by `edit`.
fn edited_kubeconfig(api: &FakeApi, name: &str, edit: impl Fn(&str) -> String) -> PathBuf {
    let path = api.write_kubeconfig(&temp_dir().join(name));
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, edit(&text)).unwrap();
    path
}

/// The error of a start that cannot list anything within 700 ms.
async fn nothing_listed(kubeconfig: &Path) -> String {
    let conn = live::connect(Some(kubeconfig)).await.unwrap();
    let quick = LiveOptions {
        sync_timeout: Duration::from_millis(700),
        ..opts()
    };
    let msg = KubeSource::start(&conn, &quick)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains(
            "caches not synced after 700ms: Namespace, Pod, Service, EndpointSlice, \
             NetworkPolicy, Node: list: "
        ),
        "{msg}"
    );
    assert!(!msg.contains('\n'));
    msg
}

#[tokio::test]
async fn unreachable_server_is_a_clear_error() {
    // A port nothing listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let api = FakeApi::start().await;
    let path = edited_kubeconfig(&api, "unreachable", |t| {
        t.replace(&api.url(), &format!("http://127.0.0.1:{port}"))
    });
    let msg = nothing_listed(&path).await;
    assert!(msg.to_lowercase().contains("connection refused"), "{msg}");
}

fn kubeconfig_error(name: &str, text: Option<&str>) -> (String, String) {
    let path = temp_dir().join(name);
    if let Some(t) = text {
        std::fs::create_dir_all(temp_dir()).unwrap();
        std::fs::write(&path, t).unwrap();
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(live::connect(Some(&path))).unwrap_err();
    assert!(err.is_input());
    let msg = err.to_string();
    assert!(!msg.contains('\n'), "{msg}");
    let p = path.display().to_string();
    let rest = msg
        .strip_prefix(&format!("{p}: "))
        .unwrap_or_else(|| panic!("{msg} names {p}"));
    (p, rest.to_string())
}

#[test]
fn bad_kubeconfigs_are_one_line_errors_naming_the_file() {
    let (_, what) = kubeconfig_error("missing", None);
    assert_eq!(what, "No such file or directory (os error 2)");

    std::fs::create_dir_all(temp_dir().join("a-directory")).unwrap();
    let (_, what) = kubeconfig_error("a-directory", None);
    assert_eq!(what, "Is a directory (os error 21)");

    let (_, what) = kubeconfig_error("not-yaml", Some("clusters: [\n  - {name: x\n"));
    assert!(
        what.starts_with("failed to parse kubeconfig YAML"),
        "{what}"
    );

    let no_context = "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    \
                      server: http://127.0.0.1:1\nusers: []\ncontexts: []\n";
    let (_, what) = kubeconfig_error("no-context", Some(no_context));
    assert_eq!(
        what,
        "no current-context (choose one with `kubectl config use-context NAME`)"
    );

    let dangling = format!("{no_context}current-context: gone\n");
    let (_, what) = kubeconfig_error("dangling-context", Some(&dangling));
    assert!(what.starts_with("failed to load current context"), "{what}");
}

#[test]
fn outside_a_cluster_without_kubeconfig_says_what_to_do() {
    if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() {
        return; // Really in a cluster.
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let err = rt.block_on(live::connect(None)).unwrap_err();
    assert!(matches!(err, LiveError::InCluster(_)));
    let msg = err.to_string();
    assert!(
        msg.starts_with("Kubernetes API: no in-cluster service account ("),
        "{msg}"
    );
    assert!(msg.ends_with("; pass --kubeconfig PATH"), "{msg}");
}

/// (exit code, stdout, stderr) of the built binary (off the runtime's thread, so the fake
/// API keeps serving).
async fn droptrace(args: &[&str]) -> (i32, String, String) {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_droptrace"))
            .args(&args)
            .env_remove("DROPTRACE_LOG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .output()
            .expect("run droptrace")
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/k8s/cluster.json")
}

#[tokio::test]
async fn explain_reads_the_live_api_like_a_snapshot() {
    // Serve the snapshot fixture's objects from the API.
    let snapshot: Value = serde_json::from_slice(&std::fs::read(fixture()).unwrap()).unwrap();
    let api = FakeApi::start().await;
    let mut by_path: std::collections::BTreeMap<&str, Vec<Value>> = Default::default();
    for item in snapshot["items"].as_array().unwrap() {
        let path = path_of(item["kind"].as_str().unwrap()).unwrap();
        by_path.entry(path).or_default().push(item.clone());
    }
    for (path, items) in by_path {
        api.set_list(path, "42", items);
    }
    let kubeconfig = api.write_kubeconfig(&temp_dir());
    let kc = kubeconfig.to_str().unwrap();
    let f = fixture();
    let flow = [
        "--from",
        "app/client-7d9f8b6c5d-x2k4p",
        "--to",
        "db/oracle-0",
    ];
    let port = ["--port", "1521"];
    let from_file = droptrace(
        &[
            &["explain", "--k8s-snapshot", f.to_str().unwrap()],
            &flow[..],
            &port,
        ]
        .concat(),
    )
    .await;
    let from_api = droptrace(&[&["explain", "--kubeconfig", kc], &flow[..], &port].concat()).await;
    assert_eq!(from_api.0, 0, "{from_api:?}");
    assert_eq!(from_api, from_file);
    assert!(from_api.1.contains("verdict: denied"), "{}", from_api.1);
    assert_eq!(api.lists(NODES), 0, "explain does not need nodes");

    // Names are checked against the live cluster.
    let (code, _, err) = droptrace(&[
        "explain",
        "--kubeconfig",
        kc,
        "--from",
        "app/nope",
        "--to",
        "db/oracle-0",
        "--port",
        "1",
    ])
    .await;
    assert_eq!(
        (code, err),
        (
            2,
            format!("droptrace: {}: no pod app/nope in the cluster\n", api.url())
        )
    );
}

#[tokio::test]
async fn bad_kubeconfig_exits_2_with_one_line() {
    let missing = temp_dir().join("no-such-kubeconfig");
    let m = missing.to_str().unwrap();
    let expected = format!("droptrace: {m}: No such file or directory (os error 2)\n");
    let flow = ["--from", "a/b", "--to", "c/d", "--port", "1"];
    let (code, out, err) = droptrace(&[&["explain", "--kubeconfig", m], &flow[..]].concat()).await;
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (2, "", expected.as_str())
    );

    // `run` checks it before loading anything (as root; otherwise privileges come first).
    let (code, _, err) = droptrace(&["run", "--kubeconfig", m, "--duration", "1s"]).await;
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    if !err.contains("privilege") && !err.contains("CAP_") {
        assert_eq!(err, expected);
    }

    // A snapshot and the API at once is a usage error.
    let both = ["explain", "--k8s-snapshot", "x.json", "--k8s-api"];
    let (code, _, err) = droptrace(&[&both[..], &flow[..]].concat()).await;
    assert_eq!(code, 2);
    assert!(
        err.starts_with("droptrace: the argument '--k8s-snapshot <FILE>' cannot be used with"),
        "{err}"
    );
}

#[tokio::test]
async fn https_goes_through_rustls() {
    // The fake API speaks plain HTTP: the TLS handshake (ring provider) must fail cleanly.
    let api = FakeApi::start().await;
    let path = edited_kubeconfig(&api, "tls", |t| t.replace("http://", "https://"));
    let msg = nothing_listed(&path).await;
    assert!(msg.ends_with("tls handshake eof"), "{msg}");
}
