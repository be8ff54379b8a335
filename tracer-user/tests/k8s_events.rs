//! `--k8s-events` end to end: `droptrace replay` of stall incidents writes events.k8s.io/v1
//! Events through the real kube client to the fake API server, which stores them: their
//! content, one Event per (pod, destination, reason) with series counts, the destination pod
//! for ingress denials, retries, the per-node rate limit and its loss accounting.
mod fake_api;
mod output_common;

use droptrace::event::{Event, PolicyRef, Shared};
use fake_api::FakeApi;
use output_common::{droptrace, ndjson, samples, tmpdir};
use serde_json::Value;

const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/";

fn sample(name: &str) -> Event {
    samples()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, e)| e)
        .unwrap()
}

/// The enriched stall sample (shop/checkout-7d9f -> data/oracle-0:1521, egress denied by
/// shop/default-deny) at second `s`, on destination port `port`.
fn stall(s: u32, port: u16) -> Event {
    let mut e = sample("stall");
    e.time = format!("2026-11-25T10:00:{s:02}.250000Z");
    if let Some(f) = e.flow.as_mut() {
        f.dst_port = port;
    }
    e
}

/// Runs `droptrace replay --k8s-events` against the fake API; (exit code, stdout, stderr).
async fn replay(api: &FakeApi, events: &[Event]) -> (i32, String, String) {
    let dir = tmpdir();
    let input = dir.path().join("in.ndjson");
    std::fs::write(&input, ndjson(events)).unwrap();
    let kubeconfig = api.write_kubeconfig(dir.path());
    let out = tokio::task::spawn_blocking(move || {
        droptrace()
            .arg("replay")
            .arg("--input")
            .arg(&input)
            .args(["--node-name", "node-a", "--k8s-events", "--kubeconfig"])
            .arg(&kubeconfig)
            .args(["--flush-timeout", "20s"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn regarding(ev: &Value) -> String {
    format!(
        "{}/{}",
        ev["regarding"]["namespace"].as_str().unwrap(),
        ev["regarding"]["name"].as_str().unwrap()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn stall_incidents_become_deduplicated_events_on_the_pods() {
    let api = FakeApi::start().await;
    // The first two writes fail (500, which the kube client does not retry itself): retried
    // by the writer, nothing lost.
    api.fail_next_writes(&[500, 500]);
    let mut ingress = stall(20, 1522);
    let mut p = (*ingress.policy.clone().unwrap()).clone();
    p.direction = "ingress".into();
    p.policies = vec![PolicyRef {
        namespace: "data".into(),
        name: "oracle-ingress".into(),
        rule: None,
    }];
    ingress.policy = Some(Shared::new(p));
    let mut plain = stall(30, 1523);
    plain.policy = None;
    let events = vec![
        stall(5, 1521),
        stall(10, 1521),
        ingress,
        plain,
        // No pods known: no Event.
        sample("stall-established-late"),
        stall(40, 1521),
        // Not incidents.
        sample("drop"),
        sample("tns-refuse"),
    ];
    let (code, _out, err) = replay(&api, &events).await;
    assert_eq!(code, 0, "{err}");

    let stored = api.objects(EVENTS);
    let got: Vec<(String, String, String)> = stored
        .iter()
        .map(|e| {
            (
                regarding(e),
                e["reason"].as_str().unwrap().to_string(),
                e["note"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    println!(
        "recorded Events:\n{}",
        serde_json::to_string_pretty(&stored).unwrap()
    );
    assert_eq!(stored.len(), 4, "{got:#?}");
    let find = |pod: &str, dport: &str| {
        stored
            .iter()
            .find(|e| regarding(e) == pod && e["note"].as_str().unwrap().contains(dport))
            .unwrap_or_else(|| panic!("no Event on {pod} about {dport}: {got:#?}"))
    };

    // Egress denial, three times: one Event, series count 3.
    let e = find("shop/checkout-7d9f", "data/oracle-0:1521");
    assert_eq!(e["apiVersion"], "events.k8s.io/v1");
    assert_eq!(e["kind"], "Event");
    assert_eq!(e["metadata"]["namespace"], "shop");
    assert_eq!(e["reason"], "NetworkPolicyDenied");
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["action"], "Connect");
    assert_eq!(e["reportingController"], "droptrace");
    assert_eq!(e["reportingInstance"], "node-a");
    assert_eq!(e["eventTime"], "2026-11-25T10:00:05.250000Z");
    assert_eq!(e["regarding"]["kind"], "Pod");
    assert_eq!(e["regarding"]["apiVersion"], "v1");
    assert_eq!(
        e["regarding"]["uid"],
        "0b6f3c1e-7a9d-4e0f-9c1a-2d3e4f5a6b7c"
    );
    let note = e["note"].as_str().unwrap();
    assert!(
        note.contains("Denied by NetworkPolicy shop/default-deny (egress)"),
        "{note}"
    );
    assert!(note.contains("SYNs dropped by netfilter"), "{note}");
    assert!(
        note.contains("droptrace explain --from shop/checkout-7d9f --to data/oracle-0 --port 1521"),
        "{note}"
    );
    assert_eq!(e["series"]["count"], 3, "{e}");
    assert_eq!(
        e["series"]["lastObservedTime"],
        "2026-11-25T10:00:40.250000Z"
    );
    assert!(
        e.get("related").is_none(),
        "egress denial: no destination Event"
    );

    // Ingress denial: the client and the destination pod, each naming the other.
    let c = find("shop/checkout-7d9f", "data/oracle-0:1522");
    let s = find("data/oracle-0", "data/oracle-0:1522");
    assert_eq!(c["reason"], "NetworkPolicyDenied");
    assert_eq!(s["reason"], "NetworkPolicyDenied");
    assert_eq!(s["metadata"]["namespace"], "data");
    assert_eq!(regarding(&json_ref(&c["related"])), "data/oracle-0");
    assert_eq!(regarding(&json_ref(&s["related"])), "shop/checkout-7d9f");
    let note = s["note"].as_str().unwrap();
    assert!(
        note.contains("connection from shop/checkout-7d9f to this pod"),
        "{note}"
    );
    assert!(note.contains("data/oracle-ingress (ingress)"), "{note}");
    assert!(c.get("series").is_none(), "seen once: no series");

    // No policy involved: ConnectStalled.
    let p = find("shop/checkout-7d9f", "data/oracle-0:1523");
    assert_eq!(p["reason"], "ConnectStalled");

    // Writes: 2 refused (500), then 4 creates and series patches of the one repeated Event
    // (occurrences that arrive while a write is pending are counted in the next one).
    let writes = api.writes(EVENTS);
    let posts = writes.iter().filter(|w| w.method == "POST").count();
    let patches: Vec<u64> = writes
        .iter()
        .filter(|w| w.method == "PATCH")
        .inspect(|w| {
            assert_eq!(
                w.content_type.as_deref(),
                Some("application/merge-patch+json")
            );
            assert!(w.path.ends_with(e["metadata"]["name"].as_str().unwrap()));
        })
        .map(|w| {
            w.body.as_ref().unwrap()["series"]["count"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(posts, 4 + 2, "{writes:#?}");
    assert!(
        !patches.is_empty() && patches.len() <= 2 && patches.windows(2).all(|w| w[0] < w[1]),
        "{patches:?}"
    );
    assert_eq!(patches.last(), Some(&3));
    assert!(
        writes
            .iter()
            .all(|w| w.authorization.as_deref() == Some("Bearer test-token"))
    );
    assert!(
        err.contains("k8s-events: 6 sent, 2 errors, 0 discarded"),
        "6 Event occurrences (the ingress denial is on two pods): {err}"
    );
}

fn json_ref(v: &Value) -> Value {
    serde_json::json!({"regarding": v})
}

/// A node with a storm of distinct failing flows writes at most the burst, and says how many
/// Events it did not write (a `lost` record from sink k8s-events).
#[tokio::test(flavor = "multi_thread")]
async fn event_writes_are_rate_limited_per_node_and_losses_reported() {
    let api = FakeApi::start().await;
    let events: Vec<Event> = (0..40).map(|i| stall(i % 60, 2000 + i as u16)).collect();
    let start = std::time::Instant::now();
    let (code, out, err) = replay(&api, &events).await;
    assert_eq!(code, 0, "{err}");
    let elapsed = start.elapsed();
    let created = api.objects(EVENTS).len() as u64;
    let burst = u64::from(droptrace::output::k8s_events::BURST);
    let refill = elapsed.as_secs() / droptrace::output::k8s_events::REFILL_EVERY.as_secs() + 1;
    assert!(
        (burst..=burst + refill).contains(&created),
        "{created} Events written in {elapsed:?}"
    );
    let lost: u64 = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "lost")
        .inspect(|v| {
            assert_eq!(v["lost"]["source"], "sink");
            assert_eq!(v["lost"]["sink"], "k8s-events");
            assert_eq!(v["lost"]["reason"], "rate_limited");
        })
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert_eq!(created + lost, 40, "written + reported lost = incidents");
    assert!(
        err.contains(&format!(
            "k8s-events: {created} sent, 0 errors, {lost} discarded"
        )),
        "{err}"
    );
}

#[test]
fn k8s_events_needs_an_api() {
    let out = droptrace()
        .args(["replay", "--input", "/dev/null", "--k8s-events"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("--k8s-events needs --k8s-api or --kubeconfig"),
        "{err}"
    );
}
