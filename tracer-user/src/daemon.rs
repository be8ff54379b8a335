//! `droptrace run`: kernel events -> decode -> encode -> sinks, until a signal, `--duration`
//! or `--max-events`.
use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracer_common::{DropEvent, EventHeader, kind};

use crate::{
    clock::{self, Clock},
    collectors::{self, Symbols, skb_drop},
    event::{Event, Kind, Lost, LostSource},
    kernel::{btf::KernelBtf, kallsyms::Kallsyms},
    preflight,
    sinks::{Output, OutputSummary},
    tracer::{Tracer, TracerOptions},
};

pub const DEFAULT_PORTS: [u16; 3] = [1521, 1522, 2484];

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub ports: Vec<u16>,
    pub all_tcp: bool,
    pub duration: Option<Duration>,
    pub max_events: Option<u64>,
    pub node: String,
    pub ringbuf_bytes: u32,
}

/// Totals printed to stderr at exit.
#[derive(Debug, Default)]
pub struct Summary {
    pub events: BTreeMap<&'static str, u64>,
    pub drops_by_reason: BTreeMap<String, u64>,
    pub lost_kernel: u64,
    pub undecodable: u64,
    pub output: Option<OutputSummary>,
}

impl Summary {
    pub fn line(&self) -> String {
        let total: u64 = self.events.values().sum();
        let kinds: Vec<_> = self.events.iter().map(|(k, v)| format!("{k} {v}")).collect();
        let reasons: Vec<_> = self
            .drops_by_reason
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let mut line = format!(
            "droptrace: {total} events ({}), {} lost in kernel, {} undecodable; drops by reason: {}",
            if kinds.is_empty() { "none".to_string() } else { kinds.join(", ") },
            self.lost_kernel,
            self.undecodable,
            if reasons.is_empty() { "none".to_string() } else { reasons.join(", ") },
        );
        if let Some(o) = &self.output {
            line.push('\n');
            line.push_str(&o.line());
        }
        line
    }
}

/// The hostname, for `node` when neither --node-name nor NODE_NAME is given.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

struct Pipeline {
    clock: Clock,
    symbols: Symbols,
    node: String,
    out: Output,
    summary: Summary,
    max_events: Option<u64>,
    emitted: u64,
}

impl Pipeline {
    fn emit(&mut self, event: &Event) {
        self.out.send(event);
        *self.summary.events.entry(event.kind.as_str()).or_default() += 1;
        if event.kind != Kind::Lost {
            self.emitted += 1;
        }
    }

    fn done(&self) -> bool {
        self.max_events.is_some_and(|m| self.emitted >= m)
    }

    /// One ring buffer record.
    fn record(&mut self, bytes: &[u8]) {
        if bytes.len() < size_of::<EventHeader>() {
            self.summary.undecodable += 1;
            return;
        }
        match bytes[0] {
            kind::DROP if bytes.len() >= size_of::<DropEvent>() => {
                // SAFETY: length checked; DropEvent is plain data; the ring buffer only
                // guarantees 8-byte alignment, so read unaligned.
                let rec: DropEvent =
                    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) };
                let event = skb_drop::decode(&rec, &self.symbols, &self.clock, &self.node);
                if let Some(d) = &event.drop {
                    *self.summary.drops_by_reason.entry(d.reason.clone()).or_default() +=
                        event.count;
                }
                self.emit(&event);
            }
            _ => self.summary.undecodable += 1,
        }
    }

    fn report_kernel_loss(&mut self, total_lost: u64) {
        if total_lost > self.summary.lost_kernel {
            let mut e = Event::new(Kind::Lost, clock::now_rfc3339(), &self.node);
            e.count = total_lost - self.summary.lost_kernel;
            e.lost = Some(Lost {
                source: LostSource::Kernel,
                reason: "ringbuf_full".to_string(),
                sink: None,
            });
            self.summary.lost_kernel = total_lost;
            self.emit(&e);
        }
    }
}

/// Everything before the first event: checks, layout, load, attach.
pub fn start(opts: &RunOptions) -> anyhow::Result<(Tracer, Symbols)> {
    let report = preflight::run();
    if let Some(fail) = report.first_failure() {
        anyhow::bail!("{}: {}", fail.name, fail.detail);
    }
    let root = report.tracefs.context("tracefs")?;
    let btf = KernelBtf::vmlinux()?;
    let format = skb_drop::read_format(&root)?;
    let layout = skb_drop::resolve_layout(&format, &btf)?;
    let symbols = Symbols {
        kallsyms: Kallsyms::load(),
        drop_reasons: collectors::drop_reason_names(Some(&btf), &format.reason_symbols),
    };
    let mut tracer = Tracer::load(&TracerOptions {
        layout,
        ports: opts.ports.clone(),
        all_tcp: opts.all_tcp,
        ringbuf_bytes: opts.ringbuf_bytes,
    })?;
    tracer.attach_all()?;
    Ok((tracer, symbols))
}

/// Traces until stopped; `output` (started by the caller, so bad sinks fail before any
/// kernel work) is flushed and shut down at the end.
pub async fn run(opts: RunOptions, output: Output) -> anyhow::Result<Summary> {
    let (mut tracer, symbols) = start(&opts)?;
    if let Some(m) = output.metrics() {
        m.set_ready(true);
    }
    tracing::info!(
        programs = ?tracer.attached(),
        ports = ?if opts.all_tcp { vec![] } else { opts.ports.clone() },
        all_tcp = opts.all_tcp,
        "attached; tracing"
    );

    let mut p = Pipeline {
        clock: Clock::new(),
        symbols,
        node: opts.node.clone(),
        out: output,
        summary: Summary::default(),
        max_events: opts.max_events,
        emitted: 0,
    };

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(Duration::from_secs(1));

    loop {
        let Tracer {
            events,
            counters,
            logger,
            ..
        } = &mut tracer;
        tokio::select! {
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    p.record(&item);
                    if p.done() { break; }
                }
                guard.clear_ready();
                if p.done() { break; }
            }
            guard = async {
                match logger {
                    Some(l) => l.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = poll.tick() => {
                p.report_kernel_loss(counters.lost_in_kernel());
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
    }

    // Detach first so nothing new arrives, then drain what is already in the ring.
    tracer.detach();
    if !p.done() {
        let ring = tracer.events.get_mut();
        while let Some(item) = ring.next() {
            p.record(&item);
            if p.done() {
                break;
            }
        }
    }
    tracer.flush_logs();
    p.report_kernel_loss(tracer.counters.lost_in_kernel());
    drop(tracer);
    let flush_timeout = p.out.flush_timeout();
    let mut summary = p.summary;
    summary.output = Some(p.out.shutdown(flush_timeout).await);
    Ok(summary)
}
