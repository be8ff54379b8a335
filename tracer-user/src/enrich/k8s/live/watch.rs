//! One watcher task per kind: kube-runtime's watcher turned into [`Update`]s, objects typed
//! leniently (an undecodable object is a counted skip, not a stopped watch), retries with
//! jittered backoff.
use std::{
    borrow::Cow,
    collections::HashSet,
    fmt::Debug,
    hash::{BuildHasher, RandomState},
    pin::pin,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{Api, Client, Resource, runtime::watcher};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::{sync::mpsc, task::JoinHandle};

use crate::enrich::k8s::{
    cluster::{Object, ObjectKind, ObjectRef},
    snapshot::{Skipped, one_line, path_error},
};
use crate::enrich::model::{self, ObjectKey};

use super::*;

pub(super) fn spawn<K>(
    client: &Client,
    kind: ObjectKind,
    tx: &mpsc::Sender<Update>,
    opts: &LiveOptions,
) -> JoinHandle<()>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Object: From<K>,
{
    let api: Api<Lenient<K>> = Api::all(client.clone());
    let backoff = Backoff::new(opts.backoff_min, opts.backoff_max);
    tokio::spawn(feed(api, kind, tx.clone(), backoff))
}

/// One kind's watcher, until the source is dropped.
async fn feed<K>(
    api: Api<Lenient<K>>,
    kind: ObjectKind,
    tx: mpsc::Sender<Update>,
    mut backoff: Backoff,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    Object: From<K>,
{
    // resourceVersion=0 lists come from the API server's watch cache, not etcd: what
    // client-go informers do, and what keeps an agent per node cheap for the server. kube
    // leaves resourceVersion=0 out of paged lists, so no pages (the cache ignores them).
    let config = watcher::Config {
        page_size: None,
        ..watcher::Config::default().any_semantic()
    };
    let mut state = KindFeed::new(kind);
    let mut out = Vec::new();
    loop {
        let mut stream = pin!(watcher(api.clone(), config.clone()));
        let mut restart = false;
        while let Some(item) = stream.next().await {
            let at = model::now();
            let failed = match item {
                Ok(event) => {
                    backoff.reset();
                    state.on_event(event, &mut out);
                    false
                }
                Err(e) => {
                    let (change, gone) = watch_error(kind, &e);
                    restart = gone;
                    out.push(change);
                    true
                }
            };
            for change in out.drain(..) {
                if tx.send(Update { at, change }).await.is_err() {
                    return;
                }
            }
            if failed {
                tokio::time::sleep(backoff.next_delay()).await;
            }
            if restart {
                break;
            }
        }
        if !restart {
            // kube's watcher never ends; should it, do not spin.
            tokio::time::sleep(backoff.next_delay()).await;
        }
        // A new watcher starts with a fresh list.
    }
}

/// What a watcher error means here, and whether the watcher must start over: kube-runtime
/// lists again after a 410 in the watch stream, but a 410 answer to the watch request itself
/// would make it retry the same expired resourceVersion forever.
fn watch_error(kind: ObjectKind, e: &watcher::Error) -> (Change, bool) {
    let api = |s: &kube::core::Status| {
        let what = if s.message.is_empty() {
            &s.reason
        } else {
            &s.message
        };
        one_line(&format!("{what} ({})", s.code))
    };
    let (what, restart) = match e {
        watcher::Error::WatchFailed(kube::Error::SerdeError(se)) => {
            return (undecodable(kind, &se.to_string()), false);
        }
        // kube reads a line that is no event as a Status if it can: code 0 says it was no
        // Status either.
        watcher::Error::WatchFailed(kube::Error::Api(s)) if s.code == 0 => {
            return (undecodable(kind, "neither an event nor a Status"), false);
        }
        watcher::Error::InitialListFailed(kube::Error::Api(s)) => {
            (format!("list: {}", api(s)), false)
        }
        watcher::Error::WatchStartFailed(kube::Error::Api(s)) => {
            (format!("watch: {}", api(s)), s.code == 410)
        }
        watcher::Error::WatchError(s) => (format!("watch: {}", api(s)), false),
        watcher::Error::InitialListFailed(e) => (format!("list: {}", chain(e)), false),
        watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
            (format!("watch: {}", chain(e)), false)
        }
        watcher::Error::NoResourceVersion => (chain(e), false),
    };
    if matches!(e, watcher::Error::WatchError(s) if s.code == 410) || restart {
        // An expired resourceVersion is routine: the watcher lists again.
        tracing::debug!("{} {what}; listing again", kind.as_str());
    } else {
        tracing::warn!("Kubernetes API {} {what}; retrying", kind.as_str());
    }
    (Change::Error(kind, what), restart)
}

fn undecodable(kind: ObjectKind, why: &str) -> Change {
    Change::Skip(Skipped {
        position: format!("{} watch", kind.as_str()),
        object: None,
        reason: one_line(&format!("undecodable watch event: {why}")),
    })
}

/// Turns one kind's watcher events into cluster changes, remembering which objects the
/// cluster holds so that a relist deletes those that went away while the watch was down.
#[derive(Debug)]
struct KindFeed {
    kind: ObjectKind,
    known: HashSet<ObjectKey>,
    /// Keys seen since the relist began.
    listing: Option<HashSet<ObjectKey>>,
}

impl KindFeed {
    fn new(kind: ObjectKind) -> Self {
        Self {
            kind,
            known: HashSet::new(),
            listing: None,
        }
    }

    fn on_event<K>(&mut self, event: watcher::Event<Lenient<K>>, out: &mut Vec<Change>)
    where
        K: Resource<DynamicType = ()>,
        Object: From<K>,
    {
        match event {
            watcher::Event::Init => self.listing = Some(HashSet::new()),
            watcher::Event::InitApply(o) => {
                let r = ObjectRef::from_meta(self.kind, o.meta());
                match o {
                    Lenient::Ok(k) => {
                        self.listing.get_or_insert_default().insert(r.key);
                        out.push(Change::Apply(k.into()));
                    }
                    Lenient::Bad { reason, .. } => {
                        // Like a bad update: the previous version, if any, stays.
                        if self.known.contains(&r.key) {
                            self.listing.get_or_insert_default().insert(r.key.clone());
                        }
                        out.push(Change::Skip(bad(&r, reason)));
                    }
                }
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                for key in self.known.difference(&listed) {
                    out.push(Change::Delete(ObjectRef {
                        kind: self.kind,
                        key: key.clone(),
                    }));
                }
                self.known = listed;
                out.push(Change::Synced(self.kind));
            }
            watcher::Event::Apply(o) => {
                let r = ObjectRef::from_meta(self.kind, o.meta());
                match o {
                    Lenient::Ok(k) => {
                        self.known.insert(r.key);
                        out.push(Change::Apply(k.into()));
                    }
                    Lenient::Bad { reason, .. } => out.push(Change::Skip(bad(&r, reason))),
                }
            }
            watcher::Event::Delete(o) => {
                let r = ObjectRef::from_meta(self.kind, o.meta());
                self.known.remove(&r.key);
                out.push(Change::Delete(r));
            }
        }
    }
}

fn bad(r: &ObjectRef, reason: String) -> Skipped {
    let named = !r.key.name.is_empty();
    Skipped {
        position: if named {
            String::new()
        } else {
            format!("{} watch", r.kind.as_str())
        },
        object: named.then(|| r.to_string()),
        reason: one_line(&reason),
    }
}

/// An API object as the watcher hands it over: typed, or why it would not type. kube's
/// typed lists fail whole on one malformed item; this keeps the others (and the watch).
#[derive(Debug, Clone)]
enum Lenient<K> {
    Ok(K),
    Bad {
        meta: Box<ObjectMeta>,
        reason: String,
    },
}

impl<K: Resource<DynamicType = ()>> Resource for Lenient<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn api_version(dt: &()) -> Cow<'_, str> {
        K::api_version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        match self {
            Lenient::Ok(k) => k.meta(),
            Lenient::Bad { meta, .. } => meta,
        }
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        match self {
            Lenient::Ok(k) => k.meta_mut(),
            Lenient::Bad { meta, .. } => meta,
        }
    }
}

impl<'de, K: DeserializeOwned> Deserialize<'de> for Lenient<K> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Not JSON at all is still an error: the watch line is broken, not the object.
        let mut value = Value::deserialize(d)?;
        slim(&mut value);
        match serde_path_to_error::deserialize::<_, K>(&value) {
            Ok(k) => Ok(Lenient::Ok(k)),
            Err(e) => Ok(Lenient::Bad {
                meta: Box::new(meta_of(&value)),
                reason: path_error(e),
            }),
        }
    }
}

/// Drop what the model never reads and can be large: managedFields, and annotations
/// (kubectl's last-applied-configuration repeats the whole object).
fn slim(value: &mut Value) {
    if let Some(Value::Object(meta)) = value.get_mut("metadata") {
        meta.remove("managedFields");
        meta.remove("annotations");
    }
}

/// The metadata of an object that did not type, as far as it goes: enough to name it,
/// delete it, and keep the watch's resourceVersion moving.
fn meta_of(value: &Value) -> ObjectMeta {
    let meta = value.get("metadata").unwrap_or(&Value::Null);
    ObjectMeta::deserialize(meta).unwrap_or_else(|_| {
        let s = |k: &str| meta.get(k).and_then(Value::as_str).map(str::to_string);
        ObjectMeta {
            name: s("name"),
            namespace: s("namespace"),
            uid: s("uid"),
            resource_version: s("resourceVersion"),
            ..ObjectMeta::default()
        }
    })
}

/// Retry delays after watch errors; reset by any event that arrives.
#[derive(Debug, Clone)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    jitter: RandomState,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        let max = max.max(min);
        Self {
            min,
            max,
            next: min,
            jitter: RandomState::new(),
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The current delay jittered into [d/2, d]; the next one doubles.
    fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = d.saturating_mul(2).min(self.max);
        let fraction = (self.jitter.hash_one(Instant::now()) % 1001) as f64 / 2000.0;
        d / 2 + d.mul_f64(fraction)
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use k8s_openapi::api::core::v1 as core;

    use super::*;
    use crate::enrich::k8s::cluster::Cluster;

    fn pod_json(name: &str, ip: &str) -> Value {
        serde_json::json!({
            "metadata": {"name": name, "namespace": "app", "resourceVersion": "7",
                "managedFields": [{"manager": "kubectl"}],
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}"}},
            "spec": {"containers": [{"name": "c"}]},
            "status": {"podIP": ip}
        })
    }

    fn lenient(v: Value) -> Lenient<core::Pod> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn lenient_types_good_objects_and_slims_them() {
        let Lenient::Ok(p) = lenient(pod_json("a", "10.0.0.1")) else {
            panic!("typed");
        };
        assert!(p.metadata.managed_fields.is_none());
        assert!(p.metadata.annotations.is_none());
        assert_eq!(p.metadata.resource_version.as_deref(), Some("7"));
    }

    #[test]
    fn lenient_keeps_name_and_version_of_bad_objects() {
        let mut v = pod_json("a", "10.0.0.1");
        v["spec"]["containers"][0]["ports"] = serde_json::json!([{"containerPort": "http"}]);
        let Lenient::Bad { meta, reason } = lenient(v) else {
            panic!("bad");
        };
        assert_eq!(meta.name.as_deref(), Some("a"));
        assert_eq!(meta.resource_version.as_deref(), Some("7"));
        assert!(
            reason.starts_with("spec.containers[0].ports[0].containerPort"),
            "{reason}"
        );

        // Metadata that does not type either: the strings still name the object.
        let v = serde_json::json!({"metadata": {"name": "b", "namespace": "x",
            "resourceVersion": "9", "labels": "nope"}, "spec": 1});
        let Lenient::Bad { meta, .. } = lenient(v) else {
            panic!("bad");
        };
        assert_eq!(
            (
                meta.name.as_deref(),
                meta.namespace.as_deref(),
                meta.resource_version.as_deref()
            ),
            (Some("b"), Some("x"), Some("9"))
        );
        assert!(serde_json::from_str::<Lenient<core::Pod>>("[1,").is_err());
    }

    type E = watcher::Event<Lenient<core::Pod>>;

    fn event(name: &str, ip: &str) -> Lenient<core::Pod> {
        lenient(pod_json(name, ip))
    }

    fn kinds(out: &mut Vec<Change>) -> Vec<String> {
        out.drain(..)
            .map(|c| match c {
                Change::Apply(o) => format!("apply {}", o.object_ref()),
                Change::Delete(r) => format!("delete {r}"),
                Change::Synced(k) => format!("synced {}", k.as_str()),
                Change::Skip(s) => format!("skip {s}"),
                Change::Error(_, e) => format!("error {e}"),
            })
            .collect()
    }

    #[test]
    fn relist_deletes_what_vanished_and_keeps_bad_versions() {
        let mut f = KindFeed::new(ObjectKind::Pod);
        let mut out = Vec::new();
        f.on_event(E::Init, &mut out);
        f.on_event(E::InitApply(event("a", "10.0.0.1")), &mut out);
        f.on_event(E::InitApply(event("b", "10.0.0.2")), &mut out);
        f.on_event(E::InitDone, &mut out);
        assert_eq!(
            kinds(&mut out),
            ["apply Pod app/a", "apply Pod app/b", "synced Pod"]
        );
        f.on_event(E::Apply(event("c", "10.0.0.3")), &mut out);
        f.on_event(E::Delete(event("a", "10.0.0.1")), &mut out);
        assert_eq!(kinds(&mut out), ["apply Pod app/c", "delete Pod app/a"]);

        // Relist: b comes back malformed (stays as it was), c is gone.
        let mut bad_b = pod_json("b", "10.0.0.2");
        bad_b["spec"] = Value::from(3);
        f.on_event(E::Init, &mut out);
        f.on_event(E::InitApply(lenient(bad_b)), &mut out);
        f.on_event(E::InitApply(event("d", "10.0.0.4")), &mut out);
        f.on_event(E::InitDone, &mut out);
        let got = kinds(&mut out);
        assert!(got[0].starts_with("skip (Pod app/b): spec:"), "{got:?}");
        assert_eq!(
            got[1..],
            ["apply Pod app/d", "delete Pod app/c", "synced Pod"]
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let d: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
        let ms = |x: u64| Duration::from_millis(x);
        for (got, full) in d.iter().zip([100, 200, 350, 350]) {
            assert!(
                *got >= ms(full) / 2 && *got <= ms(full),
                "{got:?} vs {full}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= ms(100));
    }

    #[test]
    fn pod_addresses_parse_and_lookup() {
        let mut c = Cluster::default();
        let Lenient::Ok(p) = event("a", "10.0.0.1") else {
            panic!()
        };
        c.apply(&p.into(), model::now()).unwrap();
        let got = pod_addresses(&c, "app/a").unwrap();
        assert_eq!(got.ips, ["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(!got.host_network);
        assert_eq!(
            pod_addresses(&c, "app/zz").unwrap_err().to_string(),
            "no pod app/zz in the cluster"
        );
        assert_eq!(
            pod_addresses(&c, "a").unwrap_err().to_string(),
            "\"a\" is not NAMESPACE/NAME"
        );
    }
}
