//! Where encoded events go: `--output` sinks, each with its own task, bounded memory queue
//! and optional on-disk spool, so the tracing loop never waits for a receiver and nothing
//! is dropped without being counted (docs/siem.md, "Delivery guarantees").
//!
//! Per sink: `Output::send` -> intake queue (bounded; full = counted discard) -> intake
//! task -> either the direct channel to the delivery task, or, while the spool holds
//! anything (or the direct channel is full), the tail of the spool. The delivery task
//! takes the direct channel first, then the spool head; direct records are always older
//! than spooled ones, so order holds. A batch that fails goes back to the FRONT of the
//! spool with whatever the direct channel held; a spooled batch leaves the spool only once
//! the sink accepted it.
//!
//! All sink tasks run on one dedicated thread (its own current-thread runtime), so disk
//! and network I/O never run on the tracing loop's runtime.
//!
//! The folder, in the order an event goes through it:
//! - here: [`Output`], the daemon's handle (start, send, shutdown), and its options;
//!   [`cli`]: the `--output`, `--spool-dir`, `--metrics`... arguments that make them;
//! - `thread`: the output thread (encodes each event once, runs the tasks, drains at exit);
//! - `delivery`: one sink's queue, intake and delivery tasks; `spool`: its on-disk spool;
//! - [`sink`]: the transports (stdout, file, TCP/syslog stream, HTTP, OTLP) and the
//!   `--output` syntax; `tls`: certificates for them;
//! - [`k8s_events`]: `--k8s-events`, stall incidents as Kubernetes Events;
//! - `stats`: each output's counters; `lost`: discards as in-stream `lost` records;
//! - [`metrics`]: the Prometheus registry and its HTTP server, which read the counters.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use crate::{encode::Format, event::Event};

pub mod cli;
mod delivery;
pub mod k8s_events;
mod lost;
pub(crate) mod metrics;
pub(crate) mod sink;
mod spool;
mod stats;
mod thread;
mod tls;

use delivery::{Shared, SinkCtx, SinkHandle};
use lost::LostMaker;
use metrics::Metrics;
use sink::Transport;
pub use sink::{HttpMode, SinkSpec, Target};
use stats::{Discard, SinkStats};
pub use stats::{OutputSummary, SinkSummary};
use thread::{Encoding, K8sEvents, Queued, run_outputs};
pub use tls::TlsFiles;

/// Most events [`Output::send_all_wait`] hands over at once.
pub(crate) const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{0}")]
    Spec(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("output {sink}: {why}")]
    Sink { sink: String, why: String },
    #[error("--spool-dir {dir}: {why}")]
    Spool { dir: String, why: String },
    #[error("--metrics {addr}: {why}")]
    Metrics { addr: String, why: String },
    #[error("cannot start the output thread: {0}")]
    Runtime(String),
}

#[derive(Debug, Clone)]
pub struct OutputOptions {
    pub format: Format,
    /// `node` of the `lost` events the output makes itself.
    pub node: String,
    /// File sinks rotate past this many bytes (0 = never) and keep this many old files.
    pub rotate_size: u64,
    pub rotate_keep: u32,
    pub tls: TlsFiles,
    pub http_mode: HttpMode,
    /// The Authorization header value for HTTP and OTLP sinks.
    pub http_auth: Option<String>,
    /// More headers for OTLP requests (OTEL_EXPORTER_OTLP_HEADERS).
    pub otlp_headers: Vec<(String, String)>,
    /// Most events in one write / POST.
    pub batch: usize,
    pub spool_dir: Option<PathBuf>,
    pub spool_max: u64,
    /// Events buffered in memory per sink before spooling or counting discards.
    pub queue_size: usize,
    pub flush_timeout: Duration,
    /// Connect, TLS handshake, write and HTTP response timeout.
    pub io_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub metrics_max_pods: usize,
    /// Wait for room in the queues instead of discarding (`replay`: a batch tool should
    /// go at the pace of its slowest output, not lose events). Never for `run`.
    pub lossless: bool,
    /// `--k8s-events`: the API to write Kubernetes Events to.
    pub k8s_events: Option<kube::Config>,
}

impl Default for OutputOptions {
    fn default() -> Self {
        Self {
            format: Format::Native,
            node: String::new(),
            rotate_size: 100 << 20,
            rotate_keep: 5,
            tls: TlsFiles::default(),
            http_mode: HttpMode::Generic,
            http_auth: None,
            otlp_headers: Vec::new(),
            batch: 500,
            spool_dir: None,
            spool_max: 256 << 20,
            queue_size: 8192,
            flush_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(10),
            metrics_addr: None,
            metrics_max_pods: metrics::DEFAULT_MAX_PODS,
            lossless: false,
            k8s_events: None,
        }
    }
}

/// The daemon's handle on all sinks. `send` never blocks; `shutdown` flushes.
pub struct Output {
    /// To the encoder task on the output thread: encoding (a few microseconds for ECS/OCSF)
    /// stays off the tracing loop.
    events: mpsc::Sender<Queued>,
    sinks: Arc<Vec<SinkHandle>>,
    /// `--k8s-events`: its counters (it takes stall incidents, not lines).
    k8s: Option<Arc<SinkStats>>,
    metrics: Option<Arc<Metrics>>,
    flush_timeout: Duration,
    stop: Option<oneshot::Sender<tokio::time::Instant>>,
    done: Option<oneshot::Receiver<OutputSummary>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Output {
    /// Validates every sink (scheme, files, TLS material, spool directory) and starts their
    /// tasks: a configuration problem is an error before the first event. A receiver that
    /// does not answer yet is not: that sink spools (or counts what it cannot hold as lost)
    /// until it does, and says so once.
    pub async fn start(specs: &[SinkSpec], opts: OutputOptions) -> Result<Output, OutputError> {
        let default = [SinkSpec {
            name: "-".into(),
            target: Target::Stdout,
        }];
        let specs = if specs.is_empty() {
            &default[..]
        } else {
            specs
        };
        for (i, s) in specs.iter().enumerate() {
            if specs[..i].iter().any(|o| o.name == s.name) {
                return Err(OutputError::Spec(format!(
                    "--output {} given twice",
                    s.name
                )));
            }
        }
        let metrics_listener = match opts.metrics_addr {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr).map_err(|e| OutputError::Metrics {
                    addr: addr.to_string(),
                    why: e.to_string(),
                })?;
                l.set_nonblocking(true).map_err(|e| OutputError::Metrics {
                    addr: addr.to_string(),
                    why: e.to_string(),
                })?;
                Some(l)
            }
            None => None,
        };
        let metrics = metrics_listener
            .as_ref()
            .map(|_| Arc::new(Metrics::new(opts.metrics_max_pods)));
        // Certificate files are loaded whenever given, so a typo fails now even if no TLS
        // output uses them yet.
        let tls = if specs.iter().any(|s| {
            matches!(
                s.target,
                Target::Syslog { tls: true, .. }
                    | Target::Http { tls: true, .. }
                    | Target::Otlp { tls: true, .. }
            )
        }) || opts.tls.ca.is_some()
            || opts.tls.client_cert.is_some()
            || opts.tls.client_key.is_some()
        {
            Some(tls::client_config(&opts.tls)?)
        } else {
            None
        };

        // Lossless mode waits instead of buffering: small queues keep the backlog at the end
        // (what the flush deadline has to deliver) small.
        let queue = if opts.lossless {
            opts.batch.max(64)
        } else {
            opts.queue_size.max(1)
        };
        let mut workers = Vec::new();
        let mut handles = Vec::new();
        for spec in specs {
            let transport = Transport::build(spec, &opts, tls.as_ref())?;
            let spool = match &opts.spool_dir {
                Some(dir) => {
                    let dir = dir.join(spool::sanitize(&spec.name));
                    Some(spool::Spool::open(&dir, opts.spool_max).map_err(|e| {
                        OutputError::Spool {
                            dir: dir.display().to_string(),
                            why: e.to_string(),
                        }
                    })?)
                }
                None => None,
            };
            let stats = Arc::new(SinkStats::default());
            if let Some(s) = &spool {
                stats.spooled.store(s.records(), Ordering::Relaxed);
            }
            if let Some(m) = &metrics {
                m.register_sink(&spec.name, stats.clone());
            }
            let (tx, rx) = mpsc::channel(queue);
            handles.push(SinkHandle {
                name: spec.name.clone(),
                tx,
                stats: stats.clone(),
            });
            let spooling = spool.as_ref().is_some_and(|s| !s.is_empty());
            workers.push((
                Arc::new(SinkCtx {
                    name: spec.name.clone(),
                    stats,
                    has_spool: spool.is_some(),
                    shared: Mutex::new(Shared { spool, spooling }),
                    batch: opts.batch.max(1),
                    last_self_report: Mutex::new(None),
                }),
                transport,
                rx,
            ));
        }
        let sinks = Arc::new(handles);
        let otlp = specs
            .iter()
            .any(|s| matches!(s.target, Target::Otlp { .. }));
        let lost = Arc::new(LostMaker {
            format: opts.format,
            node: opts.node.clone(),
            otlp,
        });

        let k8s = opts.k8s_events.clone().map(|config| {
            let stats = Arc::new(SinkStats::default());
            if let Some(m) = &metrics {
                m.register_sink(k8s_events::SINK_NAME, stats.clone());
            }
            K8sEvents {
                stats,
                config,
                node: opts.node.clone(),
                queue,
            }
        });
        let k8s_stats = k8s.as_ref().map(|k| k.stats.clone());

        // Lossless (replay) hands events over in batches of up to `BATCH`: room for about
        // `queue` events, as in the sinks' queues.
        let events_queue = if opts.lossless {
            (queue / BATCH).max(2)
        } else {
            queue
        };
        let (events_tx, events_rx) = mpsc::channel(events_queue);
        let encode = Encoding {
            format: opts.format,
            otlp,
            lossless: opts.lossless,
        };
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = oneshot::channel();
        let thread_sinks = sinks.clone();
        let thread_metrics = metrics.clone();
        let flush_timeout = opts.flush_timeout;
        let thread = std::thread::Builder::new()
            .name("droptrace-output".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(OutputError::Runtime(e.to_string())));
                        return;
                    }
                };
                rt.block_on(run_outputs(
                    workers,
                    (events_rx, encode),
                    (thread_sinks, k8s),
                    lost,
                    thread_metrics.zip(metrics_listener),
                    flush_timeout,
                    ready_tx,
                    stop_rx,
                    done_tx,
                ));
            })
            .map_err(|e| OutputError::Runtime(e.to_string()))?;
        match ready_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                return Err(OutputError::Runtime("output thread ended".into()));
            }
        }
        Ok(Output {
            events: events_tx,
            sinks,
            k8s: k8s_stats,
            metrics,
            flush_timeout,
            stop: Some(stop_tx),
            done: Some(done_rx),
            thread: Some(thread),
        })
    }

    /// Queues the event for every sink (encoded once, on the output thread). Never blocks:
    /// a full queue is a counted discard, reported in-stream as a `lost` event.
    pub(crate) fn send(&mut self, event: &Event) {
        if let Some(m) = &self.metrics {
            m.observe(event);
        }
        if self
            .events
            .try_send(Queued::One(Arc::new(event.clone())))
            .is_err()
        {
            for s in self.sinks.iter() {
                s.stats.discard(Discard::QueueFull, 1);
            }
            self.k8s_discard(event, Discard::QueueFull);
        }
    }

    /// The Kubernetes Events an event would have made, counted as discarded.
    fn k8s_discard(&self, event: &Event, why: Discard) {
        if let Some(k) = &self.k8s {
            let n = k8s_events::events_for(event, "").len();
            k.discard(why, n as u64);
        }
    }

    /// Counts an event the stream does not carry (see `--emit`): metrics count every event.
    pub(crate) fn observe(&self, event: &Event) {
        if let Some(m) = &self.metrics {
            m.observe(event);
        }
    }

    /// Like `send`, but waits for room instead of discarding (with `lossless`, the whole
    /// pipeline then goes at the pace of the slowest sink), for a batch of at most [`BATCH`]
    /// events: one hand-off to the output thread for all of them, not one each (the two
    /// threads taking turns on a core per event cost as much as encoding). For `replay`.
    /// Takes the events: the caller is done with them, and they are not copied.
    pub(crate) async fn send_all_wait(&mut self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        if let Some(m) = &self.metrics {
            for e in &events {
                m.observe(e);
            }
        }
        if let Err(unsent) = self.events.send(Queued::Batch(events)).await {
            let Queued::Batch(events) = unsent.0 else {
                return;
            };
            for s in self.sinks.iter() {
                s.stats.discard(Discard::Shutdown, events.len() as u64);
            }
            for e in &events {
                self.k8s_discard(e, Discard::Shutdown);
            }
        }
    }

    /// The metrics registry when `--metrics` is on (the daemon marks readiness on it).
    pub(crate) fn metrics(&self) -> Option<&Arc<Metrics>> {
        self.metrics.as_ref()
    }

    /// `--flush-timeout`.
    pub fn flush_timeout(&self) -> Duration {
        self.flush_timeout
    }

    /// Delivers what is queued within `timeout`; what is not delivered by then stays in
    /// the spool (or is counted discarded without one). Returns per-sink totals.
    pub async fn shutdown(mut self, timeout: Duration) -> OutputSummary {
        let deadline = tokio::time::Instant::now() + timeout;
        // No more events: the encoder finishes what is queued, then the sinks drain.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.events, closed));
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(deadline);
        }
        let summary = match self.done.take() {
            Some(done) => done.await.unwrap_or_default(),
            None => OutputSummary::default(),
        };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        summary
    }
}
