//! The enrich stage's view of the cluster: one `Cluster` fed by a snapshot file (reloaded on
//! change with --watch-snapshot) or by the live API, and the node-local identity of processes
//! (pod UID from the cgroup path). The daemon owns it on its single thread: lookups take no
//! lock.
use std::{collections::HashMap, net::IpAddr, path::PathBuf, time::Duration};

use crate::{
    enrich::k8s::{
        self, Cluster, EnrichOptions, KubeSource, LiveOptions, SnapshotWatcher, live::Connection,
    },
    event::{Endpoint, Event, Kind, LostSource, Policy, Shared},
};

pub struct IdentityOptions {
    pub snapshot: Option<PathBuf>,
    pub watch_snapshot: bool,
    pub api: Option<Connection>,
    pub ip_history: Duration,
}

pub struct Identity {
    cluster: Cluster,
    snapshot: Option<SnapshotWatcher>,
    watch_snapshot: bool,
    api: Option<KubeSource>,
    /// Verdicts by what decides them; cleared whenever the cluster changes. A stalled flow
    /// repeats (its drops, its incident), and a denied verdict renders a fix: ~50 us saved each.
    cache: HashMap<CacheKey, Enriched>,
}

/// What the enrichment of a drop or stall depends on besides the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    src: IpAddr,
    dst: IpAddr,
    /// The port the connection was opened to (decides the policy).
    port: u16,
    reply: bool,
    original: Option<(IpAddr, IpAddr, u16)>,
    extra_ports: Vec<u16>,
    dynamic_ports: Vec<u16>,
}

#[derive(Debug, Clone)]
struct Enriched {
    source: Option<Shared<Endpoint>>,
    destination: Option<Shared<Endpoint>>,
    policy: Option<Shared<Policy>>,
}

const CACHE_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Bad input: the CLI exits 2.
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Api(String),
}

impl Identity {
    /// Loads the snapshot (strictly: any bad object is an error) or lists the live API (waits
    /// for every cache); None when no source is configured.
    pub async fn start(opts: IdentityOptions) -> Result<Option<Self>, IdentityError> {
        let id = Self::load(opts).await;
        // Parsing a large cluster leaves megabytes of freed JSON and API objects in the heap;
        // hand them back to the system rather than carry them for the life of the daemon.
        // SAFETY: malloc_trim only releases free memory.
        unsafe { libc::malloc_trim(0) };
        id
    }

    async fn load(opts: IdentityOptions) -> Result<Option<Self>, IdentityError> {
        match (opts.snapshot, opts.api) {
            (Some(_), Some(_)) => Err(IdentityError::Input(
                "--k8s-snapshot and --k8s-api/--kubeconfig are alternatives; pass one".into(),
            )),
            (Some(path), None) => {
                let (watcher, cluster) =
                    SnapshotWatcher::start(&path, crate::enrich::model::now(), opts.ip_history)
                        .map_err(|e| IdentityError::Input(e.to_string()))?;
                Ok(Some(Self {
                    cluster,
                    snapshot: Some(watcher),
                    watch_snapshot: opts.watch_snapshot,
                    api: None,
                    cache: HashMap::new(),
                }))
            }
            (None, Some(conn)) => {
                let live = LiveOptions {
                    ip_history: opts.ip_history,
                    ..LiveOptions::default()
                };
                let (source, cluster) = KubeSource::start(&conn, &live).await.map_err(|e| {
                    if e.is_input() {
                        IdentityError::Input(e.to_string())
                    } else {
                        IdentityError::Api(e.to_string())
                    }
                })?;
                Ok(Some(Self {
                    cluster,
                    snapshot: None,
                    watch_snapshot: false,
                    api: Some(source),
                    cache: HashMap::new(),
                }))
            }
            (None, None) => Ok(None),
        }
    }

    /// An identity over a given cluster (benchmarks, tests).
    pub fn from_cluster(cluster: Cluster) -> Self {
        Self {
            cluster,
            snapshot: None,
            watch_snapshot: false,
            api: None,
            cache: HashMap::new(),
        }
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// `--pod NAMESPACE/NAME`: its current addresses (one line on error).
    pub fn pod_ips(&self, spec: &str) -> Result<Vec<std::net::IpAddr>, String> {
        k8s::live::pod_addresses(&self.cluster, spec)
            .map(|p| p.ips)
            .map_err(|e| format!("--pod: {e}"))
    }

    /// Fills `source`, `destination` and `policy` of drop and stall events. A stall of an
    /// Oracle second leg gets a fix covering both the listener port and the redirect port.
    pub fn enrich(&mut self, e: &mut Event) {
        if !matches!(e.kind, Kind::Drop | Kind::Stall) {
            return;
        }
        let mut extra_ports = Vec::new();
        let mut dynamic_ports = Vec::new();
        if let Some(o) = &e.oracle {
            dynamic_ports.clone_from(&o.redirect_ports);
            let port = e.flow.as_ref().map(|f| f.dst_port);
            for p in [
                o.listener.as_ref().map(|l| l.port),
                o.redirect.as_ref().map(|r| r.port),
            ]
            .into_iter()
            .flatten()
            {
                if Some(p) != port && !extra_ports.contains(&p) {
                    extra_ports.push(p);
                }
            }
        }
        let key = e.flow.as_ref().map(|f| {
            let reply = e.tcp.as_ref().is_some_and(|t| t.flags.is_syn_ack());
            let original = e
                .conntrack
                .as_ref()
                .map(|c| (c.original.src_ip, c.original.dst_ip, c.original.dst_port));
            CacheKey {
                src: f.src_ip,
                dst: f.dst_ip,
                port: match (&original, reply) {
                    (Some((_, _, p)), _) => *p,
                    (None, true) => f.src_port,
                    (None, false) => f.dst_port,
                },
                reply,
                original,
                extra_ports: extra_ports.clone(),
                dynamic_ports: dynamic_ports.clone(),
            }
        });
        match key.as_ref().and_then(|k| self.cache.get(k)) {
            Some(hit) => {
                e.source.clone_from(&hit.source);
                e.destination.clone_from(&hit.destination);
                e.policy.clone_from(&hit.policy);
            }
            None => {
                let opts = EnrichOptions {
                    extra_ports,
                    dynamic_ports,
                };
                k8s::enrich(&self.cluster, e, &opts);
                if let Some(k) = key {
                    if self.cache.len() >= CACHE_MAX {
                        self.cache.clear();
                    }
                    self.cache.insert(
                        k,
                        Enriched {
                            source: e.source.clone(),
                            destination: e.destination.clone(),
                            policy: e.policy.clone(),
                        },
                    );
                }
            }
        }
        // Node-local identity: the connecting process's pod, from its cgroup, when the
        // address alone does not name it (hostNetwork pods share the node address).
        if let Some(uid) = e.process.as_ref().and_then(|p| p.pod_uid.clone())
            && let Some(src) = e.source.as_mut()
            && src.pod.is_none()
            && let Some(pod) = self.cluster.pod_by_uid(&uid)
            && let Some(ip) = src.ip
        {
            *src = Shared::new(k8s::enrich::pod_endpoint(&self.cluster, pod, ip));
        }
    }

    /// Snapshot reloads and API objects skipped since the last call, as `lost` events.
    pub fn poll(&mut self, node: &str) -> Vec<Event> {
        let mut out = Vec::new();
        if self.watch_snapshot
            && let Some(w) = self.snapshot.as_mut()
        {
            match w.poll(&mut self.cluster, crate::enrich::model::now()) {
                Ok(Some(reload)) => {
                    self.cache.clear();
                    tracing::info!(
                        objects = reload.objects,
                        skipped = reload.skipped.len(),
                        "reloaded {}",
                        w.path().display()
                    );
                    for s in &reload.skipped {
                        tracing::warn!("snapshot: skipped {s}");
                    }
                    if !reload.skipped.is_empty() {
                        out.push(lost(
                            node,
                            reload.skipped.len() as u64,
                            "k8s_object_skipped",
                        ));
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!("snapshot not reloaded: {e}"),
            }
        }
        if let Some(api) = self.api.as_mut() {
            let report = api.take_skipped();
            for s in &report.reasons {
                tracing::warn!("Kubernetes API: skipped {s}");
            }
            if let Some(l) = report.lost() {
                out.push(Event::lost(
                    node,
                    report.count,
                    l.source,
                    &l.reason,
                    l.sink.as_deref(),
                ));
            }
        }
        out
    }

    /// Resolves when the live API has updates to apply (never without one).
    pub async fn changed(&mut self) {
        match self.api.as_mut() {
            Some(api) => api.changed().await,
            None => std::future::pending().await,
        }
    }

    pub fn apply(&mut self) {
        if let Some(api) = self.api.as_mut()
            && api.apply(&mut self.cluster).changed()
        {
            self.cache.clear();
        }
    }
}

fn lost(node: &str, count: u64, reason: &str) -> Event {
    Event::lost(node, count, LostSource::Input, reason, None)
}
