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
use std::{
    net::SocketAddr,
    path::PathBuf,
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    encode::{self, Format},
    event::{Event, Kind, LostSource},
};

pub mod cli;
pub mod k8s_events;
pub mod metrics;
pub mod sink;
mod spool;
mod tls;

use metrics::Metrics;
pub use sink::http::HttpMode;
use sink::{file, http, otlp, stream};
pub use tls::TlsFiles;

/// One encoded event as it travels to a sink (and sits in a spool).
#[derive(Debug, Clone)]
pub struct Record {
    pub kind: Kind,
    /// RFC 3339 event time (syslog TIMESTAMP, HEC `time`).
    pub time: String,
    /// One JSON line, no newline.
    pub line: Bytes,
    /// For OTLP sinks: the LogRecord fields other than the body ([`otlp::sidecar`]); empty
    /// when no OTLP output is configured.
    pub otlp: Bytes,
}

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

#[derive(Debug)]
pub(crate) enum DeliverError {
    /// Try again later (after `after` if the receiver said so).
    Retry {
        after: Option<Duration>,
        why: String,
    },
    /// The receiver refused these events for good (malformed, too large, ...).
    Rejected(String),
    /// The receiver answered with a certificate that --ca (or the system store) does not
    /// trust: a configuration error at start, retried like any failure later on (a SIEM
    /// may be rotating its certificate).
    Untrusted(String),
}

impl DeliverError {
    fn retry(why: impl Into<String>) -> Self {
        Self::Retry {
            after: None,
            why: why.into(),
        }
    }

    fn why(&self) -> &str {
        match self {
            Self::Retry { why, .. } | Self::Rejected(why) | Self::Untrusted(why) => why,
        }
    }
}

/// One `--output` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSpec {
    /// As given; the sink's name in `lost.sink`, metrics and logs.
    pub name: String,
    pub target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
    Tcp {
        host: String,
        port: u16,
    },
    Syslog {
        host: String,
        port: u16,
        tls: bool,
    },
    Http {
        host: String,
        port: u16,
        path: String,
        tls: bool,
    },
    /// OpenTelemetry logs over gRPC (`otlp://`, `otlps://`) or HTTP (`otlp+http(s)://`).
    Otlp {
        host: String,
        port: u16,
        /// HTTP only: where to POST (default /v1/logs).
        path: String,
        grpc: bool,
        tls: bool,
    },
}

impl Target {
    /// Sends over the network (what `--format text` and the spool are not for).
    pub fn is_network(&self) -> bool {
        !matches!(self, Target::Stdout | Target::File(_))
    }
}

impl FromStr for SinkSpec {
    type Err = OutputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| OutputError::Spec(format!("--output {s}: {why}"));
        let target = if s == "-" {
            Target::Stdout
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(bad("empty path".into()));
            }
            Target::File(PathBuf::from(path))
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = host_port(rest, None).map_err(bad)?;
            Target::Tcp { host, port }
        } else if let Some(rest) = s.strip_prefix("syslog+tcp://") {
            let (host, port) = host_port(rest, Some(514)).map_err(bad)?;
            Target::Syslog {
                host,
                port,
                tls: false,
            }
        } else if let Some(rest) = s.strip_prefix("syslog+tls://") {
            let (host, port) = host_port(rest, Some(6514)).map_err(bad)?;
            Target::Syslog {
                host,
                port,
                tls: true,
            }
        } else if let Some((grpc, tls, rest)) = [
            ("otlp://", true, false),
            ("otlps://", true, true),
            ("otlp+http://", false, false),
            ("otlp+https://", false, true),
        ]
        .into_iter()
        .find_map(|(p, g, t)| s.strip_prefix(p).map(|r| (g, t, r)))
        {
            let (authority, path) = split_url(rest, "").map_err(bad)?;
            if grpc && !matches!(path, "" | "/") {
                return Err(bad(
                    "OTLP/gRPC takes no path (the service is LogsService/Export)".into(),
                ));
            }
            let default = if grpc {
                otlp::GRPC_PORT
            } else {
                otlp::HTTP_PORT
            };
            let (host, port) = host_port(authority, Some(default)).map_err(bad)?;
            Target::Otlp {
                host,
                port,
                path: if matches!(path, "" | "/") {
                    otlp::HTTP_PATH.to_string()
                } else {
                    path.to_string()
                },
                grpc,
                tls,
            }
        } else if let Some((tls, rest)) = s
            .strip_prefix("http://")
            .map(|r| (false, r))
            .or_else(|| s.strip_prefix("https://").map(|r| (true, r)))
        {
            let (authority, path) = split_url(rest, "/").map_err(bad)?;
            let (host, port) =
                host_port(authority, Some(if tls { 443 } else { 80 })).map_err(bad)?;
            Target::Http {
                host,
                port,
                path: path.to_string(),
                tls,
            }
        } else {
            return Err(bad(
                "unknown scheme (expected -, file:PATH, tcp://, syslog+tcp://, syslog+tls://, http://, https://, otlp://, otlps://, otlp+http://, otlp+https://)"
                    .into(),
            ));
        };
        Ok(SinkSpec {
            name: s.to_string(),
            target,
        })
    }
}

/// The authority and path of a URL after its scheme (`default_path` when it has none);
/// credentials in the URL are refused.
fn split_url<'a>(rest: &'a str, default_path: &'a str) -> Result<(&'a str, &'a str), String> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, default_path),
    };
    if authority.contains('@') {
        return Err("credentials in the URL are not supported; use --http-auth-file".into());
    }
    Ok((authority, path))
}

/// `host:port`, `[v6]:port`, or a bare host when there is a default port.
fn host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let s = s.trim_end_matches('/');
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed `[` in the address")?;
        (format!("[{h}]"), after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("no host".into());
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("`{p}` is not a port")),
            Ok(p) => p,
        },
        None => default_port.ok_or("no port (HOST:PORT)")?,
    };
    Ok((host, port))
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

/// Why events were discarded; each is reported in `lost.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Discard {
    /// Memory queue full and no spool (or the spool could not keep up).
    QueueFull,
    /// `--spool-max` reached (or the spool could not be written).
    SpoolFull,
    /// The receiver refused them for good (HTTP 4xx, ES bulk item errors).
    Rejected,
    /// Still in memory at the end of `--flush-timeout` with no spool to keep them.
    Shutdown,
    /// Over the per-node write rate (`--k8s-events`).
    RateLimited,
}

const DISCARDS: [Discard; 5] = [
    Discard::QueueFull,
    Discard::SpoolFull,
    Discard::Rejected,
    Discard::Shutdown,
    Discard::RateLimited,
];

impl Discard {
    fn as_str(self) -> &'static str {
        match self {
            Discard::QueueFull => "queue_full",
            Discard::SpoolFull => "spool_full",
            Discard::Rejected => "rejected",
            Discard::Shutdown => "shutdown",
            Discard::RateLimited => "rate_limited",
        }
    }
}

/// Counters of one sink, shared by `Output::send`, its tasks and the metrics endpoint.
#[derive(Debug, Default)]
pub struct SinkStats {
    sent: AtomicU64,
    errors: AtomicU64,
    spooled: AtomicU64,
    /// The last connect or delivery failed (set at start too, when the receiver is not up).
    down: std::sync::atomic::AtomicBool,
    discarded: [AtomicU64; 5],
    /// Discards already announced to the other sinks / to this sink itself.
    reported_others: [AtomicU64; 5],
    reported_self: [AtomicU64; 5],
}

impl SinkStats {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Events in the spool now.
    pub fn spooled(&self) -> u64 {
        self.spooled.load(Ordering::Relaxed)
    }

    /// Whether the receiver answered the last connect or delivery.
    pub fn up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    pub fn discarded(&self) -> u64 {
        self.discarded
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .sum()
    }

    fn discard(&self, why: Discard, n: u64) {
        if n > 0 {
            self.discarded[why as usize].fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// What one sink did over the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSummary {
    pub name: String,
    pub sent: u64,
    pub errors: u64,
    pub discarded: u64,
    /// Left in the spool for the next run.
    pub spooled: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputSummary {
    pub sinks: Vec<SinkSummary>,
    /// The flush deadline passed before every sink caught up.
    pub timed_out: bool,
}

impl OutputSummary {
    pub fn line(&self) -> String {
        let sinks: Vec<_> = self
            .sinks
            .iter()
            .map(|s| {
                format!(
                    "{}: {} sent, {} errors, {} discarded, {} left in spool",
                    s.name, s.sent, s.errors, s.discarded, s.spooled
                )
            })
            .collect();
        format!(
            "droptrace: outputs{}: {}",
            if self.timed_out {
                " (flush timed out)"
            } else {
                ""
            },
            sinks.join("; ")
        )
    }
}

struct SinkHandle {
    name: String,
    tx: mpsc::Sender<Arc<Record>>,
    stats: Arc<SinkStats>,
}

impl SinkHandle {
    fn push(&self, rec: &Arc<Record>) {
        if self.tx.try_send(rec.clone()).is_err() {
            self.stats.discard(Discard::QueueFull, 1);
        }
    }
}

/// Makes the `lost` records the output reports itself.
struct LostMaker {
    format: Format,
    node: String,
    /// Some sink speaks OTLP: records carry the OTLP sidecar.
    otlp: bool,
}

impl LostMaker {
    fn record(&self, sink: &str, why: Discard, count: u64) -> (Event, Arc<Record>) {
        let e = Event::lost(
            &self.node,
            count,
            LostSource::Sink,
            why.as_str(),
            Some(sink),
        );
        let rec = Arc::new(record(self.format, self.otlp, &e, &mut Vec::new()));
        (e, rec)
    }
}

fn record(format: Format, otlp: bool, e: &Event, buf: &mut Vec<u8>) -> Record {
    encode::encode(format, e, buf);
    Record {
        kind: e.kind,
        time: e.time.clone(),
        line: Bytes::copy_from_slice(buf),
        otlp: if otlp { otlp::sidecar(e) } else { Bytes::new() },
    }
}

/// The daemon's handle on all sinks. `send` never blocks; `shutdown` flushes.
pub struct Output {
    /// To the encoder task on the output thread: encoding (a few microseconds for ECS/OCSF)
    /// stays off the tracing loop.
    events: mpsc::Sender<Arc<Event>>,
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
                    let dir = dir.join(sanitize(&spec.name));
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

        let (events_tx, events_rx) = mpsc::channel(queue);
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
    pub fn send(&mut self, event: &Event) {
        if let Some(m) = &self.metrics {
            m.observe(event);
        }
        if self.events.try_send(Arc::new(event.clone())).is_err() {
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
    pub fn observe(&self, event: &Event) {
        if let Some(m) = &self.metrics {
            m.observe(event);
        }
    }

    /// Like `send`, but waits for room instead of discarding (with `lossless`, the whole
    /// pipeline then goes at the pace of the slowest sink). For `replay`.
    pub async fn send_wait(&mut self, event: &Event) {
        if let Some(m) = &self.metrics {
            m.observe(event);
        }
        if self.events.send(Arc::new(event.clone())).await.is_err() {
            for s in self.sinks.iter() {
                s.stats.discard(Discard::Shutdown, 1);
            }
            self.k8s_discard(event, Discard::Shutdown);
        }
    }

    /// The metrics registry when `--metrics` is on (the daemon marks readiness on it).
    pub fn metrics(&self) -> Option<&Arc<Metrics>> {
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

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

struct SinkCtx {
    name: String,
    stats: Arc<SinkStats>,
    has_spool: bool,
    shared: Mutex<Shared>,
    batch: usize,
    /// When this sink last announced its own discards: at most once per
    /// [`SELF_REPORT_EVERY`] while running, so a sustained overload is one `lost` record a
    /// second, not one per queue drain.
    last_self_report: Mutex<Option<std::time::Instant>>,
}

const SELF_REPORT_EVERY: Duration = Duration::from_secs(1);

struct Shared {
    spool: Option<spool::Spool>,
    /// New records go to the spool tail (set while the spool holds anything).
    spooling: bool,
}

impl SinkCtx {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        // A panic while holding the lock cannot leave the spool worse than a crash would.
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Discards of this sink not yet announced to itself.
    fn pending_self(&self) -> bool {
        DISCARDS.iter().any(|w| {
            let i = *w as usize;
            self.stats.discarded[i].load(Ordering::Relaxed)
                > self.stats.reported_self[i].load(Ordering::Relaxed)
        })
    }

    fn self_report_due(&self) -> bool {
        self.last_self_report
            .lock()
            .map(|t| t.is_none_or(|t| t.elapsed() >= SELF_REPORT_EVERY))
            .unwrap_or(true)
    }

    fn update_gauge(&self, sh: &Shared) {
        if let Some(s) = &sh.spool {
            self.stats.spooled.store(s.records(), Ordering::Relaxed);
        }
    }

    /// Appends to the spool tail; what does not fit is a counted discard.
    fn spool_append(&self, sh: &mut Shared, recs: &[Arc<Record>]) {
        let Some(sp) = sh.spool.as_mut() else {
            self.stats.discard(Discard::Shutdown, recs.len() as u64);
            return;
        };
        match sp.append(recs) {
            Ok(over) => self.stats.discard(Discard::SpoolFull, over as u64),
            Err(e) => {
                tracing::warn!(sink = %self.name, "spool write failed: {e}");
                self.stats.discard(Discard::SpoolFull, recs.len() as u64);
            }
        }
        self.update_gauge(sh);
    }

    /// Puts an undelivered batch back in front of the spool (or counts it lost without one).
    fn spool_prepend(&self, sh: &mut Shared, recs: &[Arc<Record>]) {
        let Some(sp) = sh.spool.as_mut() else {
            self.stats.discard(Discard::Shutdown, recs.len() as u64);
            return;
        };
        if let Err(e) = sp.prepend(recs) {
            tracing::warn!(sink = %self.name, "spool write failed: {e}");
            self.stats.discard(Discard::SpoolFull, recs.len() as u64);
        }
        sh.spooling = true;
        self.update_gauge(sh);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    Running,
    /// Stop taking new events; deliver what is queued and spooled.
    Draining,
    /// Flush deadline: stop delivering, keep the rest in the spool.
    Stop,
}

/// `--k8s-events` as the output thread starts it.
struct K8sEvents {
    stats: Arc<SinkStats>,
    config: kube::Config,
    node: String,
    queue: usize,
}

#[allow(clippy::too_many_arguments)]
async fn run_outputs(
    workers: Vec<(Arc<SinkCtx>, Transport, mpsc::Receiver<Arc<Record>>)>,
    (events, encode): (mpsc::Receiver<Arc<Event>>, Encoding),
    (sinks, k8s): (Arc<Vec<SinkHandle>>, Option<K8sEvents>),
    lost: Arc<LostMaker>,
    metrics: Option<(Arc<Metrics>, std::net::TcpListener)>,
    flush_timeout: Duration,
    ready: oneshot::Sender<Result<(), OutputError>>,
    stop: oneshot::Receiver<tokio::time::Instant>,
    done: oneshot::Sender<OutputSummary>,
) {
    // Reachability at start: a SIEM that is down (or not up yet) must not stop tracing. The
    // sink starts "down" and its delivery task connects as soon as the receiver answers.
    let mut workers = workers;
    for (ctx, t, _) in workers.iter_mut() {
        if let Err(e) = t.connect().await {
            if let DeliverError::Untrusted(why) = e {
                let _ = ready.send(Err(OutputError::Sink {
                    sink: ctx.name.clone(),
                    why,
                }));
                return;
            }
            ctx.stats.down.store(true, Ordering::Relaxed);
            tracing::warn!(
                sink = %ctx.name,
                "receiver unreachable at start ({}); {}",
                e.why(),
                if ctx.has_spool {
                    "spooling until it answers"
                } else {
                    "holding --queue-size events in memory until it answers, counting the \
                     rest as lost (--spool-dir keeps them)"
                }
            );
        }
    }
    // The Events writer's client is made here, so its connections live on this thread.
    let k8s = match k8s {
        Some(k) => match kube::Client::try_from(k.config.clone()) {
            Ok(client) => Some((k, client)),
            Err(e) => {
                let _ = ready.send(Err(OutputError::Sink {
                    sink: k8s_events::SINK_NAME.into(),
                    why: e.to_string(),
                }));
                return;
            }
        },
        None => None,
    };
    let server = match metrics {
        Some((m, l)) => match tokio::net::TcpListener::from_std(l) {
            Ok(l) => Some(tokio::spawn(metrics::serve(l, m))),
            Err(e) => {
                let _ = ready.send(Err(OutputError::Metrics {
                    addr: String::new(),
                    why: e.to_string(),
                }));
                return;
            }
        },
        None => None,
    };
    let _ = ready.send(Ok(()));

    let (phase_tx, phase_rx) = watch::channel(Phase::Running);
    let mut tasks = Vec::new();
    let contexts: Vec<_> = workers.iter().map(|(c, _, _)| c.clone()).collect();
    let mut transports = Vec::new();
    for (ctx, transport, rx) in workers {
        let (give_back, returned) = oneshot::channel();
        transports.push(returned);
        let (direct_tx, direct_rx) = mpsc::channel(ctx.batch.max(64));
        tasks.push(tokio::spawn(intake(
            ctx.clone(),
            rx,
            direct_tx,
            phase_rx.clone(),
        )));
        tasks.push(tokio::spawn(delivery(
            ctx,
            (transport, give_back),
            direct_rx,
            lost.clone(),
            phase_rx.clone(),
        )));
    }

    let mut k8s_feed = None;
    let mut k8s_stats = None;
    let mut k8s_taken = None;
    if let Some((k, client)) = k8s {
        let (tx, rx) = mpsc::channel(k.queue);
        let writer = k8s_events::Writer::new(client, &k.node, k.stats.clone());
        let (taken_tx, taken_rx) = oneshot::channel();
        k8s_taken = Some(taken_rx);
        tasks.push(tokio::spawn(k8s_events::run(
            writer,
            rx,
            phase_rx.clone(),
            taken_tx,
        )));
        k8s_feed = Some((tx, k.stats.clone()));
        k8s_stats = Some(k.stats);
    }
    let sources: Vec<(String, Arc<SinkStats>)> = sinks
        .iter()
        .map(|s| (s.name.clone(), s.stats.clone()))
        .chain(
            k8s_stats
                .iter()
                .map(|s| (k8s_events::SINK_NAME.to_string(), s.clone())),
        )
        .collect();

    let (hurry_tx, hurry_rx) = watch::channel(false);
    let mut encoder = tokio::spawn(encode_all(
        events,
        (sinks.clone(), k8s_feed),
        encode,
        hurry_rx,
    ));

    // Running: announce discards once a second until asked to stop.
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    let deadline = loop {
        tokio::select! {
            _ = tick.tick() => report_lost(&sources, &sinks, &lost),
            d = &mut stop => break d.unwrap_or_else(|_| tokio::time::Instant::now() + flush_timeout),
        }
    };
    // The sender is gone: the encoder ends once it has handed on what was queued. A lossless
    // encoder waiting on a stuck sink is told to hurry at the deadline (then whatever a sink
    // cannot take is counted by that sink).
    if tokio::time::timeout_at(deadline, &mut encoder)
        .await
        .is_err()
    {
        let _ = hurry_tx.send(true);
        let _ = encoder.await;
    }
    // The Events writer has counted what it turned down: announce that too.
    if let Some(t) = k8s_taken {
        let _ = tokio::time::timeout_at(deadline, t).await;
    }
    report_lost(&sources, &sinks, &lost);
    let _ = phase_tx.send(Phase::Draining);
    let mut joined = futures_join(&mut tasks, Some(deadline)).await;
    let timed_out = !joined;
    if !joined {
        let _ = phase_tx.send(Phase::Stop);
        // Spooling what is left is local disk work; give it a bounded moment.
        joined = futures_join(
            &mut tasks,
            Some(tokio::time::Instant::now() + Duration::from_secs(5)),
        )
        .await;
        if !joined {
            for t in &tasks {
                t.abort();
            }
        }
    }
    // Discards counted while draining (a sink that never caught up, with no spool to keep
    // what it held): announced to the sinks that are still up, straight through their
    // transports, so they too have their `lost` record.
    let finals = unreported(&sources, &lost);
    for (ctx, returned) in contexts.iter().zip(transports) {
        let Ok(mut t) = returned.await else { continue };
        let recs: Vec<_> = finals
            .iter()
            .filter(|(from, _)| *from != ctx.name)
            .map(|(_, r)| r.clone())
            .collect();
        if !recs.is_empty() {
            let n = recs.len() as u64;
            let sent = ctx.stats.up()
                && matches!(
                    tokio::time::timeout(FINAL_REPORT_TIMEOUT, t.deliver(&recs)).await,
                    Ok(Ok(_))
                );
            if sent {
                ctx.stats.sent.fetch_add(n, Ordering::Relaxed);
            } else if let Some(sp) = ctx.lock().spool.as_mut() {
                for r in &recs {
                    let _ = sp.append_unbounded(r);
                }
            }
        }
        t.close().await;
    }
    // Discards that could not be announced in-stream any more: keep the announcement in
    // the sink's own spool so the next run delivers it.
    for ctx in &contexts {
        let mut sh = ctx.lock();
        if let Some(sp) = sh.spool.as_mut() {
            for why in DISCARDS {
                let d = ctx.stats.discarded[why as usize].load(Ordering::Relaxed)
                    - ctx.stats.reported_self[why as usize].load(Ordering::Relaxed);
                if d > 0 {
                    let (_, rec) = lost.record(&ctx.name, why, d);
                    if sp.append_unbounded(&rec).is_ok() {
                        ctx.stats.reported_self[why as usize].fetch_add(d, Ordering::Relaxed);
                    }
                }
            }
        }
        ctx.update_gauge(&sh);
    }
    if let Some(s) = server {
        s.abort();
    }
    let summary = OutputSummary {
        sinks: contexts
            .iter()
            .map(|c| (&c.name, &c.stats))
            .chain(k8s_stats.iter().map(|s| (&sources[sources.len() - 1].0, s)))
            .map(|(name, stats)| SinkSummary {
                name: name.clone(),
                sent: stats.sent(),
                errors: stats.errors(),
                discarded: stats.discarded(),
                spooled: stats.spooled(),
            })
            .collect(),
        timed_out,
    };
    let _ = done.send(summary);
}

/// How the encoder task encodes: the format, whether records need the OTLP sidecar, and
/// whether to wait for room in the queues (replay).
#[derive(Debug, Clone, Copy)]
struct Encoding {
    format: Format,
    otlp: bool,
    lossless: bool,
}

/// Stall incidents on their way to the Kubernetes Events writer, and its counters.
type K8sFeed = (mpsc::Sender<Arc<Event>>, Arc<SinkStats>);

/// Encodes each event once and queues the line on every sink; hands stall incidents to the
/// Kubernetes Events writer.
async fn encode_all(
    mut events: mpsc::Receiver<Arc<Event>>,
    (sinks, k8s): (Arc<Vec<SinkHandle>>, Option<K8sFeed>),
    encoding: Encoding,
    mut hurry: watch::Receiver<bool>,
) {
    let Encoding {
        format,
        otlp,
        lossless,
    } = encoding;
    let mut buf = Vec::with_capacity(4096);
    while let Some(e) = events.recv().await {
        if let Some((tx, stats)) = &k8s {
            let n = k8s_events::events_for(&e, "").len() as u64;
            if n > 0 {
                let sent = if lossless && !*hurry.borrow() {
                    tx.send(e.clone()).await.is_ok()
                } else {
                    tx.try_send(e.clone()).is_ok()
                };
                if !sent {
                    stats.discard(Discard::QueueFull, n);
                }
            }
        }
        let rec = Arc::new(record(format, otlp, &e, &mut buf));
        for s in sinks.iter() {
            if !lossless || *hurry.borrow() {
                s.push(&rec);
                continue;
            }
            tokio::select! {
                r = s.tx.send(rec.clone()) => if r.is_err() {
                    s.stats.discard(Discard::Shutdown, 1);
                },
                _ = hurry.wait_for(|h| *h) => s.push(&rec),
            }
        }
    }
}

/// Waits for every task, until `deadline`; true when all ended.
async fn futures_join(
    tasks: &mut [tokio::task::JoinHandle<()>],
    deadline: Option<tokio::time::Instant>,
) -> bool {
    for t in tasks.iter_mut() {
        if t.is_finished() {
            continue;
        }
        match deadline {
            Some(d) => {
                if tokio::time::timeout_at(d, &mut *t).await.is_err() {
                    return false;
                }
            }
            None => {
                let _ = (&mut *t).await;
            }
        }
    }
    true
}

/// Tells every other sink about each output's new discards (`sources`: the sinks, and the
/// Kubernetes Events writer, which has no stream of its own).
fn report_lost(sources: &[(String, Arc<SinkStats>)], sinks: &[SinkHandle], lost: &LostMaker) {
    for (name, rec) in unreported(sources, lost) {
        for other in sinks.iter().filter(|o| o.name != name) {
            other.push(&rec);
        }
    }
}

/// At exit, how long a sink that is up gets to take the last loss announcements.
const FINAL_REPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// `lost` records for the discards not yet announced to the other sinks, with the name of
/// the output that discarded; marks them announced.
fn unreported(
    sources: &[(String, Arc<SinkStats>)],
    lost: &LostMaker,
) -> Vec<(String, Arc<Record>)> {
    let mut out = Vec::new();
    for (name, stats) in sources {
        for why in DISCARDS {
            let total = stats.discarded[why as usize].load(Ordering::Relaxed);
            let told = stats.reported_others[why as usize].load(Ordering::Relaxed);
            if total > told {
                stats.reported_others[why as usize].store(total, Ordering::Relaxed);
                out.push((name.clone(), lost.record(name, why, total - told).1));
            }
        }
    }
    out
}

async fn phase_at_least(rx: &mut watch::Receiver<Phase>, p: Phase) {
    let _ = rx.wait_for(|x| rank(*x) >= rank(p)).await;
}

fn rank(p: Phase) -> u8 {
    match p {
        Phase::Running => 0,
        Phase::Draining => 1,
        Phase::Stop => 2,
    }
}

fn drain(rx: &mut mpsc::Receiver<Arc<Record>>, max: usize, into: &mut Vec<Arc<Record>>) {
    while into.len() < max {
        match rx.try_recv() {
            Ok(r) => into.push(r),
            Err(_) => break,
        }
    }
}

/// Memory queue -> direct channel or spool tail.
async fn intake(
    ctx: Arc<SinkCtx>,
    mut rx: mpsc::Receiver<Arc<Record>>,
    direct: mpsc::Sender<Arc<Record>>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut closed = false;
    loop {
        let first = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = phase_at_least(&mut phase, Phase::Draining), if !closed => {
                // Stop accepting; what is queued is still received below.
                rx.close();
                closed = true;
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut items = vec![first];
        drain(&mut rx, 1024, &mut items);
        if ctx.has_spool {
            let mut sh = ctx.lock();
            let mut to_spool = Vec::new();
            for r in items {
                if sh.spooling {
                    to_spool.push(r);
                } else if let Err(e) = direct.try_send(r) {
                    sh.spooling = true;
                    to_spool.push(e.into_inner());
                }
            }
            if !to_spool.is_empty() {
                ctx.spool_append(&mut sh, &to_spool);
            }
        } else {
            let mut items = items.into_iter();
            while let Some(r) = items.next() {
                let stop = tokio::select! {
                    res = direct.send(r) => res.is_err(),
                    _ = phase_at_least(&mut phase, Phase::Stop) => true,
                };
                if stop {
                    // At the deadline without a spool: what is still here is lost.
                    let rest = 1 + items.len() as u64;
                    ctx.stats.discard(Discard::Shutdown, rest);
                    rx.close();
                    let mut n = 0;
                    while rx.try_recv().is_ok() {
                        n += 1;
                    }
                    ctx.stats.discard(Discard::Shutdown, n);
                    return;
                }
            }
        }
    }
}

enum Source {
    Direct,
    Spool(spool::Peeked),
    /// This sink's own discard announcement: counts as reported only once delivered.
    SelfLost(Vec<(Discard, u64)>),
}

/// Direct channel first, then spool; delivers with retries; hands failures to the spool.
/// Hands its transport back when done (still connected, for the final loss announcements).
async fn delivery(
    ctx: Arc<SinkCtx>,
    (mut transport, give_back): (Transport, oneshot::Sender<Transport>),
    mut direct: mpsc::Receiver<Arc<Record>>,
    lost: Arc<LostMaker>,
    mut phase: watch::Receiver<Phase>,
) {
    let mut backoff = Backoff::default();
    // Announced once already when the receiver was not up at start.
    let mut down = !ctx.stats.up();
    let mut direct_open = true;
    'outer: loop {
        if *phase.borrow() == Phase::Stop {
            break;
        }
        let mut batch = Vec::new();
        let mut source = Source::Direct;
        drain(&mut direct, ctx.batch, &mut batch);
        if batch.is_empty() {
            let urgent = !direct_open || *phase.borrow() != Phase::Running;
            match from_spool_or_self(&ctx, &lost, urgent) {
                Ok(Some((b, src))) => {
                    batch = b;
                    source = src;
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(sink = %ctx.name, "spool read failed: {e}");
                    if sleep_or_stop(&mut phase, backoff.next()).await {
                        break;
                    }
                    continue;
                }
            }
        }
        if batch.is_empty() {
            if !direct_open {
                // Draining, intake gone, spool empty: done.
                break;
            }
            tokio::select! {
                r = direct.recv() => match r {
                    Some(r) => batch.push(r),
                    None => { direct_open = false; continue; }
                },
                _ = phase.changed() => continue,
                // Discards held back by the once-a-second limit: announce them when due.
                _ = tokio::time::sleep(SELF_REPORT_EVERY), if ctx.pending_self() => continue,
            }
            drain(&mut direct, ctx.batch, &mut batch);
        }

        loop {
            let res = tokio::select! {
                r = transport.deliver(&batch) => Some(r),
                _ = phase_at_least(&mut phase, Phase::Stop) => None,
            };
            let n = batch.len() as u64;
            match res {
                Some(Ok(rejected)) => {
                    if down {
                        tracing::info!(sink = %ctx.name, "sink recovered");
                        down = false;
                        ctx.stats.down.store(false, Ordering::Relaxed);
                    }
                    backoff = Backoff::default();
                    ctx.stats.sent.fetch_add(n - rejected, Ordering::Relaxed);
                    ctx.stats.discard(Discard::Rejected, rejected);
                    finish(&ctx, source);
                    break;
                }
                Some(Err(DeliverError::Rejected(why))) => {
                    tracing::warn!(sink = %ctx.name, "receiver rejected {n} events: {why}");
                    ctx.stats.discard(Discard::Rejected, n);
                    finish(&ctx, source);
                    break;
                }
                // While running, an untrusted certificate is one more reason to retry.
                Some(Err(e)) => {
                    let (after, why) = match e {
                        DeliverError::Retry { after, why } => (after, why),
                        other => (None, other.why().to_string()),
                    };
                    ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
                    if !down {
                        tracing::warn!(sink = %ctx.name, "sink unavailable: {why}; {}",
                            if ctx.has_spool { "spooling" } else { "retrying from memory" });
                        down = true;
                        ctx.stats.down.store(true, Ordering::Relaxed);
                    }
                    let wait = after.unwrap_or_else(|| backoff.next()).min(MAX_RETRY_AFTER);
                    if matches!(source, Source::Direct) && ctx.has_spool {
                        // Everything from here on goes through the spool, in order.
                        {
                            let mut sh = ctx.lock();
                            sh.spooling = true;
                            drain(&mut direct, usize::MAX, &mut batch);
                            ctx.spool_prepend(&mut sh, &batch);
                        }
                        if sleep_or_stop(&mut phase, wait).await {
                            break 'outer;
                        }
                        continue 'outer;
                    }
                    if matches!(source, Source::SelfLost(_)) {
                        // Recomputed (with any newer discards) on the next round.
                        if sleep_or_stop(&mut phase, wait).await {
                            break 'outer;
                        }
                        continue 'outer;
                    }
                    if sleep_or_stop(&mut phase, wait).await {
                        // A spooled batch is still in the spool; a direct one (no spool)
                        // is counted below.
                        if matches!(source, Source::Direct) {
                            ctx.stats.discard(Discard::Shutdown, n);
                        }
                        break 'outer;
                    }
                }
                None => {
                    // Deadline with a batch in flight: it may have been partly written
                    // (at-least-once here). Keep it unless it is already in the spool.
                    if matches!(source, Source::Direct) {
                        let mut sh = ctx.lock();
                        ctx.spool_prepend(&mut sh, &batch);
                    }
                    break 'outer;
                }
            }
        }
    }
    // Whatever is still in the direct channel goes in front of the spool (or is lost).
    let mut rest = Vec::new();
    drain(&mut direct, usize::MAX, &mut rest);
    if !rest.is_empty() {
        let mut sh = ctx.lock();
        ctx.spool_prepend(&mut sh, &rest);
    }
    if let Err(mut t) = give_back.send(transport) {
        t.close().await;
    }
}

/// With the direct channel empty: the spool head, else (caught up) this sink's own pending
/// discard announcements, else nothing.
/// `urgent` (draining): announce pending discards now, not at the next one-second mark.
fn from_spool_or_self(
    ctx: &SinkCtx,
    lost: &LostMaker,
    urgent: bool,
) -> std::io::Result<Option<(Vec<Arc<Record>>, Source)>> {
    let mut sh = ctx.lock();
    while let Some(sp) = sh.spool.as_mut().filter(|s| !s.is_empty()) {
        let Some(p) = sp.peek(ctx.batch)? else { break };
        // A line the spool cannot read back (disk corruption, a foreign file) is counted
        // lost, never sent as an empty event.
        let good: Vec<_> = p
            .records
            .iter()
            .filter(|r| !r.line.is_empty())
            .cloned()
            .collect();
        let bad = (p.records.len() - good.len()) as u64;
        if bad > 0 {
            tracing::warn!(sink = %ctx.name, "{bad} unreadable spool lines counted lost");
            ctx.stats.discard(Discard::SpoolFull, bad);
        }
        if good.is_empty() {
            sp.commit(&p)?;
            ctx.update_gauge(&sh);
            continue;
        }
        return Ok(Some((good, Source::Spool(p))));
    }
    // Caught up: intake may go direct again.
    sh.spooling = false;
    drop(sh);
    let pending: Vec<_> = DISCARDS
        .iter()
        .map(|w| {
            let i = *w as usize;
            let n = ctx.stats.discarded[i].load(Ordering::Relaxed)
                - ctx.stats.reported_self[i].load(Ordering::Relaxed);
            (*w, n)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    if pending.is_empty() || !(urgent || ctx.self_report_due()) {
        return Ok(None);
    }
    if let Ok(mut t) = ctx.last_self_report.lock() {
        *t = Some(std::time::Instant::now());
    }
    let batch = pending
        .iter()
        .map(|(w, n)| lost.record(&ctx.name, *w, *n).1)
        .collect();
    Ok(Some((batch, Source::SelfLost(pending))))
}

/// Most we wait on a receiver's Retry-After before trying again.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

fn finish(ctx: &SinkCtx, source: Source) {
    match source {
        Source::Direct => {}
        Source::Spool(p) => {
            let mut sh = ctx.lock();
            if let Some(sp) = sh.spool.as_mut()
                && let Err(e) = sp.commit(&p)
            {
                tracing::warn!(sink = %ctx.name, "spool commit failed: {e}");
            }
            ctx.update_gauge(&sh);
        }
        Source::SelfLost(reported) => {
            for (why, n) in reported {
                ctx.stats.reported_self[why as usize].fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

/// Sleeps, returning true early if the flush deadline passed meanwhile.
async fn sleep_or_stop(phase: &mut watch::Receiver<Phase>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => *phase.borrow() == Phase::Stop,
        _ = phase_at_least(phase, Phase::Stop) => true,
    }
}

/// Exponential backoff: 100 ms doubling to 30 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(30));
        d
    }
}

enum Transport {
    Stdout(tokio::io::Stdout),
    File(file::FileSink),
    Stream(stream::StreamSink),
    Http(http::HttpSink),
    Grpc(otlp::GrpcSink),
}

impl Transport {
    fn build(
        spec: &SinkSpec,
        opts: &OutputOptions,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Self, OutputError> {
        let sink_err = |why: String| OutputError::Sink {
            sink: spec.name.clone(),
            why,
        };
        let tls_for = |host: &str, on: bool| -> Result<_, OutputError> {
            match (on, tls) {
                (true, Some(c)) => Ok(Some((c.clone(), tls::server_name(host)?))),
                _ => Ok(None),
            }
        };
        Ok(match &spec.target {
            Target::Stdout => Transport::Stdout(tokio::io::stdout()),
            Target::File(path) => Transport::File(
                file::FileSink::open(path, opts.rotate_size, opts.rotate_keep)
                    .map_err(|e| sink_err(e.to_string()))?,
            ),
            Target::Tcp { host, port } => Transport::Stream(stream::StreamSink::new(
                host,
                *port,
                None,
                stream::Framing::Ndjson,
                opts.io_timeout,
            )),
            Target::Syslog { host, port, tls } => Transport::Stream(stream::StreamSink::new(
                host,
                *port,
                tls_for(host, *tls)?,
                stream::Framing::Syslog {
                    hostname: stream::syslog_hostname(&opts.node),
                    procid: std::process::id(),
                },
                opts.io_timeout,
            )),
            Target::Http {
                host,
                port,
                path,
                tls,
            } => Transport::Http(http::HttpSink::new(
                host,
                *port,
                path,
                tls_for(host, *tls)?,
                opts.http_mode,
                opts.http_auth.clone(),
                opts.io_timeout,
            )),
            Target::Otlp {
                host,
                port,
                path,
                grpc,
                tls,
            } => {
                let resource = otlp::Resource::new(&crate::daemon::hostname());
                let mut headers = opts.otlp_headers.clone();
                if *grpc {
                    if let Some(a) = &opts.http_auth {
                        headers.push(("authorization".into(), a.clone()));
                    }
                    Transport::Grpc(otlp::GrpcSink::new(
                        host,
                        *port,
                        tls_for(host, *tls)?,
                        headers,
                        opts.io_timeout,
                        resource,
                    ))
                } else {
                    Transport::Http(
                        http::HttpSink::new(
                            host,
                            *port,
                            path,
                            tls_for(host, *tls)?,
                            HttpMode::Generic,
                            opts.http_auth.clone(),
                            opts.io_timeout,
                        )
                        .otlp(resource, headers),
                    )
                }
            }
        })
    }

    async fn connect(&mut self) -> Result<(), DeliverError> {
        match self {
            Transport::Stream(s) => s.connect().await,
            Transport::Http(h) => h.connect().await,
            Transport::Grpc(g) => g.connect().await,
            Transport::Stdout(_) | Transport::File(_) => Ok(()),
        }
    }

    /// Ok(n): accepted, of which the receiver refused `n` individually.
    async fn deliver(&mut self, batch: &[Arc<Record>]) -> Result<u64, DeliverError> {
        match self {
            Transport::Stdout(out) => {
                use tokio::io::AsyncWriteExt;
                let mut buf = Vec::new();
                for r in batch {
                    stream::frame(&stream::Framing::Ndjson, r, &mut buf);
                }
                out.write_all(&buf)
                    .await
                    .map_err(|e| DeliverError::retry(format!("stdout: {e}")))?;
                out.flush()
                    .await
                    .map_err(|e| DeliverError::retry(format!("stdout: {e}")))?;
                Ok(0)
            }
            Transport::File(f) => f
                .deliver(batch)
                .map(|()| 0)
                .map_err(|e| DeliverError::retry(format!("write: {e}"))),
            Transport::Stream(s) => s.deliver(batch).await.map(|()| 0),
            Transport::Http(h) => h.deliver(batch).await.map(|a| a.rejected),
            Transport::Grpc(g) => g.deliver(batch).await,
        }
    }

    async fn close(&mut self) {
        match self {
            Transport::Stream(s) => s.close().await,
            Transport::Stdout(out) => {
                use tokio::io::AsyncWriteExt;
                let _ = out.flush().await;
            }
            Transport::File(_) | Transport::Http(_) | Transport::Grpc(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let t = |s: &str| s.parse::<SinkSpec>().map(|s| s.target);
        assert_eq!(t("-").unwrap(), Target::Stdout);
        assert_eq!(t("file:/tmp/x").unwrap(), Target::File("/tmp/x".into()));
        assert_eq!(
            t("tcp://127.0.0.1:5000").unwrap(),
            Target::Tcp {
                host: "127.0.0.1".into(),
                port: 5000
            }
        );
        assert_eq!(
            t("syslog+tls://[::1]").unwrap(),
            Target::Syslog {
                host: "[::1]".into(),
                port: 6514,
                tls: true
            }
        );
        assert_eq!(
            t("https://es:9200/logs/_bulk").unwrap(),
            Target::Http {
                host: "es".into(),
                port: 9200,
                path: "/logs/_bulk".into(),
                tls: true
            }
        );
        assert_eq!(
            t("http://h").unwrap(),
            Target::Http {
                host: "h".into(),
                port: 80,
                path: "/".into(),
                tls: false
            }
        );
        for bad in [
            "ftp://x",
            "tcp://host",
            "tcp://:1",
            "tcp://h:0",
            "tcp://h:99999",
            "file:",
            "http://u:p@h/",
            "syslog+tls://[::1",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sanitized_spool_names() {
        assert_eq!(sanitize("syslog+tls://h:6514"), "syslog_tls___h_6514");
    }
}
