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
//! # async fn run(args: droptrace::enrich::k8s::ApiArgs) -> Result<(), droptrace::enrich::k8s::LiveError> {
//! use droptrace::enrich::k8s::{KubeSource, LiveOptions};
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
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery, networking::v1 as networking},
    jiff::Timestamp,
};
use tokio::{sync::mpsc, task::JoinHandle};

use crate::enrich::k8s::{
    cluster::{Cluster, DEFAULT_IP_HISTORY, Object, ObjectKind, ObjectRef},
    snapshot::Skipped,
};
use crate::enrich::model::{ObjectKey, Pod};
use crate::event::{Lost, LostSource};

mod connect;
mod watch;

use connect::chain;
pub use connect::{ApiArgs, Connection, LiveError, connect};
use watch::spawn;

/// Updates in flight between the watchers and the daemon; beyond it the watchers wait.
const CHANNEL_CAPACITY: usize = 1024;
/// Updates [`KubeSource::apply`] takes in one call, so a relist of a large cluster does not
/// hold the run loop for long (the rest is applied on the next turn).
const APPLY_BATCH: usize = 4096;
/// Skip reasons kept between two [`KubeSource::take_skipped`] calls (all are counted).
const MAX_SKIP_REASONS: usize = 32;

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
