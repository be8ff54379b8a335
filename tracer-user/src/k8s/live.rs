//! `--k8s-api`: the cluster model fed live from the Kubernetes API by kube-rs watchers on
//! Pods, Namespaces, Services, EndpointSlices, NetworkPolicies and Nodes.
//!
//! Each kind has a task running kube-runtime's [`watcher`] (list, then watch from the list's
//! resourceVersion with bookmarks; after `410 Gone` it lists again) that turns its events into
//! [`Update`]s on one bounded channel. The daemon owns the [`Cluster`] and applies the updates
//! from its own loop ([`KubeSource::changed`], then [`KubeSource::apply`]): the run loop is a
//! single-threaded runtime, so lookups take no lock and never see half an update, and a slow
//! daemon slows the watchers down (the channel is bounded) instead of growing memory.
//!
//! No reflector store is kept: the Cluster is the store, and a second copy of every object
//! would double the memory. managedFields and annotations (the model reads neither) are
//! dropped before objects are even typed.
//!
//! In the run loop:
//! ```no_run
//! # async fn run(args: droptrace::k8s::ApiArgs) -> Result<(), droptrace::k8s::LiveError> {
//! use droptrace::k8s::{KubeSource, LiveOptions};
//! let conn = args.connect().await?; // a bad kubeconfig: exit 2
//! let (mut kube, mut cluster) = KubeSource::start(&conn, &LiveOptions::default()).await?;
//! let mut every_second = tokio::time::interval(std::time::Duration::from_secs(1));
//! loop {
//!     tokio::select! {
//!         _ = kube.changed() => {
//!             kube.apply(&mut cluster);
//!         }
//!         _ = every_second.tick() => {
//!             let skipped = kube.take_skipped();
//!             if let Some(lost) = skipped.lost() {
//!                 // emit a `lost` event: count = skipped.count, lost = lost
//!             }
//!         }
//!     }
//! }
//! # }
//! ```
use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashSet},
    fmt::Debug,
    hash::{BuildHasher, RandomState},
    net::IpAddr,
    path::{Path, PathBuf},
    pin::pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery, networking::v1 as networking},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    jiff::Timestamp,
};
use kube::{
    Api, Client, Config, Resource,
    config::{KubeConfigOptions, Kubeconfig, KubeconfigError},
    runtime::watcher,
};
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    cluster::{Cluster, DEFAULT_IP_HISTORY, Object, ObjectKind, ObjectRef},
    model::{self, ObjectKey, Pod},
    snapshot::{Skipped, one_line, path_error},
};
use crate::event::{Lost, LostSource};

/// Updates in flight between the watchers and the daemon; beyond it the watchers wait.
const CHANNEL_CAPACITY: usize = 1024;
/// Updates [`KubeSource::apply`] takes in one call, so a relist of a large cluster does not
/// hold the run loop for long (the rest is applied on the next turn).
const APPLY_BATCH: usize = 4096;
/// Skip reasons kept between two [`KubeSource::take_skipped`] calls (all are counted).
const MAX_SKIP_REASONS: usize = 32;

/// The command-line flags that select the live API (shared by `run` and `explain`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ApiArgs {
    /// Take pods, services, endpoint slices, namespaces, policies and nodes live from the
    /// Kubernetes API: in-cluster service account, or --kubeconfig.
    #[arg(long)]
    pub k8s_api: bool,
    /// Kubeconfig file for the Kubernetes API (its current context; implies --k8s-api).
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
}

impl ApiArgs {
    pub fn enabled(&self) -> bool {
        self.k8s_api || self.kubeconfig.is_some()
    }

    pub async fn connect(&self) -> Result<Connection, LiveError> {
        connect(self.kubeconfig.as_deref()).await
    }
}

/// Why the live API cannot be used; every message is one line.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// An unreadable or unusable kubeconfig: `<file>: <what>`.
    #[error("{path}: {what}")]
    Kubeconfig { path: String, what: String },
    #[error("Kubernetes API: no in-cluster service account ({0}); pass --kubeconfig PATH")]
    InCluster(String),
    #[error("Kubernetes API {server}: {what}")]
    Client { server: String, what: String },
    #[error("Kubernetes API {server}: caches not synced after {}: {what}", humantime::format_duration(*.timeout))]
    NotSynced {
        server: String,
        timeout: Duration,
        what: String,
    },
    #[error("Kubernetes API: {0}")]
    Runtime(String),
}

impl LiveError {
    /// Bad input (configuration) rather than a failure at run time: the CLI exits 2.
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            LiveError::Kubeconfig { .. } | LiveError::InCluster(_) | LiveError::Client { .. }
        )
    }
}

/// A configured client and the server it talks to (for messages).
#[derive(Clone)]
pub struct Connection {
    pub client: Client,
    pub server: String,
    /// What the client was made from, for clients made on other threads (Kubernetes Events
    /// are written from the output thread).
    pub config: Config,
}

impl Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

/// A client from `kubeconfig` (its current context), or from the pod's service account.
/// Nothing is sent to the server yet.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Connection, LiveError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| kubeconfig_error(path, e))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| kubeconfig_error(path, e))?
        }
        None => Config::incluster().map_err(|e| LiveError::InCluster(chain(&e)))?,
    };
    let server = config
        .cluster_url
        .to_string()
        .trim_end_matches('/')
        .to_string();
    let client = Client::try_from(config.clone()).map_err(|e| LiveError::Client {
        server: server.clone(),
        what: chain(&e),
    })?;
    Ok(Connection {
        client,
        server,
        config,
    })
}

fn kubeconfig_error(path: &Path, e: KubeconfigError) -> LiveError {
    let what = match &e {
        // Its message repeats the path.
        KubeconfigError::ReadConfig(io, _) => one_line(&io.to_string()),
        KubeconfigError::CurrentContextNotSet => {
            "no current-context (choose one with `kubectl config use-context NAME`)".into()
        }
        _ => chain(&e),
    };
    LiveError::Kubeconfig {
        path: path.display().to_string(),
        what,
    }
}

/// An error and its sources on one line, without the repeats of messages that already
/// quote their source.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    one_line(&out)
}

#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// How long addresses of deleted pods stay attributable (`--ip-history`).
    pub ip_history: Duration,
    /// [`KubeSource::start`] fails if a kind has not been listed by then.
    pub sync_timeout: Duration,
    /// Watch Nodes too (needs list/watch on nodes; pods' hostIPs cover nodes that run pods).
    pub nodes: bool,
    /// Retry delays after a watch error: doubling from `backoff_min` up to `backoff_max`,
    /// each jittered down to half so the agents of a cluster do not retry in step.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            ip_history: DEFAULT_IP_HISTORY,
            sync_timeout: Duration::from_secs(60),
            nodes: true,
            // client-go's reflector: 800 ms to 30 s.
            backoff_min: Duration::from_millis(800),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// A change to the cluster, stamped when its watch event arrived.
#[derive(Debug)]
pub struct Update {
    pub at: Timestamp,
    pub change: Change,
}

#[derive(Debug)]
pub enum Change {
    Apply(Object),
    Delete(ObjectRef),
    /// Every object of the kind has been listed (first sync, or a relist).
    Synced(ObjectKind),
    /// An object or watch event the model cannot use.
    Skip(Skipped),
    /// A watch error; the watcher retries.
    Error(ObjectKind, String),
}

/// What updates did: returned by [`KubeSource::apply`] (that call) and
/// [`KubeSource::counts`] (since start).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LiveCounts {
    pub upserts: u64,
    pub deletes: u64,
    pub skipped: u64,
    /// Lists after the first (after 410 Gone, or a watch that could not resume).
    pub relists: u64,
    pub errors: u64,
}

impl LiveCounts {
    /// Anything that may change a lookup.
    pub fn changed(&self) -> bool {
        self.upserts + self.deletes > 0
    }

    fn since(&self, before: &LiveCounts) -> LiveCounts {
        LiveCounts {
            upserts: self.upserts - before.upserts,
            deletes: self.deletes - before.deletes,
            skipped: self.skipped - before.skipped,
            relists: self.relists - before.relists,
            errors: self.errors - before.errors,
        }
    }
}

/// Objects left out since the last [`KubeSource::take_skipped`]: the daemon reports `count`
/// as a `lost` event ([`SkipReport::lost`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkipReport {
    pub count: u64,
    /// The first few, for the log.
    pub reasons: Vec<Skipped>,
}

/// `lost.reason` of API objects or watch events the model could not use.
pub const LOST_REASON: &str = "k8s_object_skipped";

impl SkipReport {
    /// The `lost` section for an event with `count` = [`SkipReport::count`]; None when
    /// nothing was skipped.
    pub fn lost(&self) -> Option<Lost> {
        (self.count > 0).then(|| Lost {
            source: LostSource::Input,
            reason: LOST_REASON.to_string(),
            sink: None,
        })
    }
}

/// The live identity source: watcher tasks and the updates they produce.
/// Dropping it stops the watchers.
pub struct KubeSource {
    server: String,
    rx: mpsc::Receiver<Update>,
    /// Received by [`KubeSource::changed`], not yet applied.
    pending: Option<Update>,
    tasks: Vec<JoinHandle<()>>,
    kinds: Vec<ObjectKind>,
    synced: BTreeSet<ObjectKind>,
    last_error: BTreeMap<ObjectKind, String>,
    skipped: SkipReport,
    counts: LiveCounts,
}

impl Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("server", &self.server)
            .field("kinds", &self.kinds)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl Drop for KubeSource {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl KubeSource {
    /// Start the watchers and return once every kind is listed, with the cluster built from
    /// the lists. Must run inside a tokio runtime (the watchers are spawned on it).
    pub async fn start(
        conn: &Connection,
        opts: &LiveOptions,
    ) -> Result<(Self, Cluster), LiveError> {
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let mut kinds = vec![
            ObjectKind::Namespace,
            ObjectKind::Pod,
            ObjectKind::Service,
            ObjectKind::EndpointSlice,
            ObjectKind::NetworkPolicy,
        ];
        if opts.nodes {
            kinds.push(ObjectKind::Node);
        }
        let c = &conn.client;
        let tasks = kinds
            .iter()
            .map(|kind| match kind {
                ObjectKind::Pod => spawn::<core::Pod>(c, *kind, &tx, opts),
                ObjectKind::Service => spawn::<core::Service>(c, *kind, &tx, opts),
                ObjectKind::EndpointSlice => spawn::<discovery::EndpointSlice>(c, *kind, &tx, opts),
                ObjectKind::Namespace => spawn::<core::Namespace>(c, *kind, &tx, opts),
                ObjectKind::NetworkPolicy => {
                    spawn::<networking::NetworkPolicy>(c, *kind, &tx, opts)
                }
                ObjectKind::Node => spawn::<core::Node>(c, *kind, &tx, opts),
            })
            .collect();
        drop(tx);
        let mut source = Self {
            server: conn.server.clone(),
            rx,
            pending: None,
            tasks,
            kinds,
            synced: BTreeSet::new(),
            last_error: BTreeMap::new(),
            skipped: SkipReport::default(),
            counts: LiveCounts::default(),
        };
        let mut cluster = Cluster::new(opts.ip_history);
        let deadline = tokio::time::Instant::now() + opts.sync_timeout;
        while !source.is_synced() {
            match tokio::time::timeout_at(deadline, source.rx.recv()).await {
                Ok(Some(update)) => source.apply_one(&mut cluster, update),
                Ok(None) => return Err(source.not_synced(opts.sync_timeout, "watchers stopped")),
                Err(_) => return Err(source.not_synced(opts.sync_timeout, "")),
            }
        }
        Ok((source, cluster))
    }

    fn not_synced(&self, timeout: Duration, why: &str) -> LiveError {
        // Kinds failing the same way (a server that cannot be reached) share one line.
        let mut by_error: Vec<(&str, Vec<&str>)> = Vec::new();
        for k in self.kinds.iter().filter(|k| !self.synced.contains(k)) {
            let e = self.last_error.get(k).map_or("no answer", String::as_str);
            match by_error.iter_mut().find(|(x, _)| *x == e) {
                Some((_, kinds)) => kinds.push(k.as_str()),
                None => by_error.push((e, vec![k.as_str()])),
            }
        }
        let waiting: Vec<String> = by_error
            .iter()
            .map(|(e, kinds)| format!("{}: {e}", kinds.join(", ")))
            .collect();
        let mut what = waiting.join("; ");
        if !why.is_empty() {
            what = format!("{why}; {what}");
        }
        LiveError::NotSynced {
            server: self.server.clone(),
            timeout,
            what,
        }
    }

    /// Every kind has been listed at least once (always true after [`KubeSource::start`]).
    pub fn is_synced(&self) -> bool {
        self.kinds.iter().all(|k| self.synced.contains(k))
    }

    pub fn server(&self) -> &str {
        &self.server
    }

    /// Wait until an update is ready for [`KubeSource::apply`]. Cancel-safe: meant for a
    /// `tokio::select!` branch. Never returns if every watcher has stopped.
    pub async fn changed(&mut self) {
        if self.pending.is_some() {
            return;
        }
        match self.rx.recv().await {
            Some(update) => self.pending = Some(update),
            None => std::future::pending().await,
        }
    }

    /// Apply the updates received so far (up to a batch; more wake [`KubeSource::changed`]
    /// again). Never waits.
    pub fn apply(&mut self, cluster: &mut Cluster) -> LiveCounts {
        let before = self.counts;
        if let Some(update) = self.pending.take() {
            self.apply_one(cluster, update);
        }
        for _ in 0..APPLY_BATCH {
            match self.rx.try_recv() {
                Ok(update) => self.apply_one(cluster, update),
                Err(_) => break,
            }
        }
        self.counts.since(&before)
    }

    fn apply_one(&mut self, cluster: &mut Cluster, update: Update) {
        match update.change {
            Change::Apply(object) => match cluster.apply(&object, update.at) {
                Ok(()) => self.counts.upserts += 1,
                // The cluster keeps the previous version, if any.
                Err(e) => self.skip(Skipped {
                    position: String::new(),
                    object: Some(object.object_ref().to_string()),
                    reason: e.to_string(),
                }),
            },
            Change::Delete(r) => {
                cluster.delete(&r, update.at);
                self.counts.deletes += 1;
            }
            Change::Synced(kind) => {
                if !self.synced.insert(kind) {
                    self.counts.relists += 1;
                }
            }
            Change::Skip(s) => self.skip(s),
            Change::Error(kind, what) => {
                self.counts.errors += 1;
                self.last_error.insert(kind, what);
            }
        }
    }

    fn skip(&mut self, s: Skipped) {
        tracing::debug!("Kubernetes object skipped: {s}");
        self.counts.skipped += 1;
        self.skipped.count += 1;
        if self.skipped.reasons.len() < MAX_SKIP_REASONS {
            self.skipped.reasons.push(s);
        }
    }

    /// Objects skipped since the last call (count zero: nothing to report).
    pub fn take_skipped(&mut self) -> SkipReport {
        std::mem::take(&mut self.skipped)
    }

    /// Totals since start.
    pub fn counts(&self) -> LiveCounts {
        self.counts
    }
}

/// `--pod NAMESPACE/NAME`: what the cache knows of one pod's addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodAddresses {
    pub key: ObjectKey,
    /// Empty while the pod has no address yet (Pending).
    pub ips: Vec<IpAddr>,
    /// The addresses are the node's, shared with everything else on it.
    pub host_network: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PodLookupError {
    #[error("{0:?} is not NAMESPACE/NAME")]
    Spec(String),
    #[error("no pod {0} in the cluster")]
    NotFound(ObjectKey),
}

/// The addresses of the pod `spec` (`NAMESPACE/NAME`) names, from the live cache.
pub fn pod_addresses(cluster: &Cluster, spec: &str) -> Result<PodAddresses, PodLookupError> {
    let key = ObjectKey::parse(spec).ok_or_else(|| PodLookupError::Spec(spec.to_string()))?;
    let pod: &Arc<Pod> = cluster
        .pod(&key)
        .ok_or_else(|| PodLookupError::NotFound(key.clone()))?;
    Ok(PodAddresses {
        ips: pod.ips.clone(),
        host_network: pod.host_network,
        key,
    })
}

/// `droptrace explain --k8s-api`: connect, list everything once and stop watching.
/// Builds its own runtime: call it outside one.
pub fn load_once(args: &ApiArgs, opts: &LiveOptions) -> Result<(Cluster, String), LiveError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| LiveError::Runtime(format!("cannot start the runtime: {e}")))?;
    rt.block_on(async {
        let conn = args.connect().await?;
        let (source, cluster) = KubeSource::start(&conn, opts).await?;
        Ok((cluster, source.server().to_string()))
    })
}

fn spawn<K>(
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
    use super::*;

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
