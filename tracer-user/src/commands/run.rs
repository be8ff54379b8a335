//! `droptrace run`: kernel records -> decode -> correlate -> encode -> sinks, until a signal,
//! `--duration` or `--max-events`.
use std::time::Duration;

use crate::{
    clock::{self, Clock},
    collect::loader::{Tracer, TracerError, TracerOptions},
    collect::{
        Symbols, collector, conntrack,
        conntrack::netlink::{self, CtDestroyEvents},
    },
    commands::check,
    correlate,
    enrich::identity::Identity,
    event::{Kind, LostSource},
    output::Output,
    pipeline::{self, Action, Emit, Pipeline, Summary},
};
use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};

pub const DEFAULT_PORTS: [u16; 3] = [1521, 1522, 2484];

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub ports: Vec<u16>,
    pub all_tcp: bool,
    pub duration: Option<Duration>,
    pub max_events: Option<u64>,
    pub node: String,
    pub ringbuf_bytes: u32,
    /// Records beyond problems that go into the stream (`--emit`, `--raw`).
    pub emit: Emit,
    pub stall_after: Duration,
    /// Bound on connection attempts tracked at once.
    pub flow_table: usize,
    /// How often drop counts aggregated in the kernel are flushed into the stream.
    pub flush: Duration,
    /// Capacity of the in-kernel drop aggregation map.
    pub agg_entries: u32,
    /// New-flow drop records per second per CPU before a storm is folded per destination.
    pub new_flows_per_sec: u32,
    /// Fall back to ctnetlink DESTROY events for conntrack removals where fentry is refused.
    pub ct_netlink: bool,
    /// `--pod NAMESPACE/NAME`: only events of this pod's flows (needs an identity source).
    pub pod: Option<String>,
}

/// The run loop's side of the pipeline: enrichment, `--pod`, `--max-events`, and the
/// outputs. Everything that decides what an event says is in [`Pipeline`].
struct Wiring {
    identity: Option<Identity>,
    /// `--pod`: the pod and its addresses, refreshed as the cluster changes.
    pod: Option<(String, Vec<std::net::IpAddr>)>,
    out: Output,
    max_events: Option<u64>,
    emitted: u64,
}

impl Wiring {
    fn done(&self) -> bool {
        self.max_events.is_some_and(|m| self.emitted >= m)
    }

    /// Everything the pipeline produced: enriched, filtered, into the outputs (or only into
    /// the metrics, for what the stream does not carry).
    fn deliver(&mut self, p: &mut Pipeline) {
        for o in p.drain() {
            let mut e = o.event;
            if let (Some((_, ips)), Some(f)) = (&self.pod, &e.flow)
                && !ips.contains(&f.src_ip)
                && !ips.contains(&f.dst_ip)
            {
                continue;
            }
            if let Some(id) = self.identity.as_mut()
                && matches!(
                    e.kind,
                    Kind::Drop | Kind::Stall | Kind::Storm | Kind::Connect
                )
            {
                id.enrich(&mut e);
            }
            if !o.stream {
                self.out.observe(&e);
                continue;
            }
            self.out.send(&e);
            if e.kind != Kind::Lost {
                self.emitted += 1;
            }
            if self.done() {
                break;
            }
        }
    }
}

/// Carries out what the pipeline asked of the kernel side.
fn act(tracer: &mut Tracer, p: &mut Pipeline) {
    let mut forgotten = Vec::new();
    for a in p.drain_actions() {
        let done = match (&a, tracer.watch.as_mut()) {
            (Action::WatchHostPort(t, until), Some(w)) => w.host_port(*t, *until),
            (Action::WatchPort(port), Some(w)) => w.port(*port),
            (Action::ForgetAggKey(k, reported), _) => {
                if tracer.forget_drop_key(k, *reported) {
                    forgotten.push(*k);
                }
                Ok(())
            }
            (_, None) => Ok(()),
        };
        match (&a, done) {
            (Action::WatchHostPort(t, _), Ok(())) => {
                tracing::info!("learned Oracle redirect target {t}")
            }
            (Action::WatchPort(port), Ok(())) => {
                tracing::info!("learned Oracle redirect port {port}")
            }
            (_, Ok(())) => {}
            (_, Err(e)) => tracing::warn!("{a:?}: {e}"),
        }
    }
    for k in &forgotten {
        p.agg_key_forgotten(k);
    }
}

/// Everything before the first event: checks, layouts, load, attach. Optional hooks that
/// cannot run are reported and skipped.
pub fn start(opts: &RunOptions) -> anyhow::Result<(Tracer, Symbols)> {
    let t0 = std::time::Instant::now();
    let report = check::run(false);
    tracing::debug!(elapsed = ?t0.elapsed(), "preflight");
    if let Some(fail) = report.first_failure() {
        anyhow::bail!("{}: {}", fail.name, fail.detail);
    }
    let r = report.resolved.context("kernel layouts")?;
    let mut tracer = Tracer::load(&TracerOptions {
        layout: r.skb,
        tcp: r.tcp.as_ref().ok().copied(),
        ct: r.ct.as_ref().ok().copied(),
        ports: opts.ports.clone(),
        all_tcp: opts.all_tcp,
        ringbuf_bytes: opts.ringbuf_bytes,
        agg_entries: opts.agg_entries,
        new_flows_per_sec: opts.new_flows_per_sec,
    })?;
    tracing::debug!(elapsed = ?t0.elapsed(), "object loaded");
    for c in collector::ALL {
        let attached = c
            .can_run(&r)
            .map_err(TracerError::Unavailable)
            .and_then(|_| c.attach(&r, &mut tracer));
        let attached = match attached {
            Ok(a) => a,
            // A refusal for want of a privilege keeps its type: it is an exit status of its own.
            // A privilege refusal with a documented fix stops the run even for an optional
            // hook: on Debian's kernels at perf_event_paranoid=3 the drop hook attaches as a
            // BTF tracepoint (no perf event) while the connect-lifecycle hooks are refused,
            // and a run without them reports no stall outcome (seen in the 6.12 and 7.3 VMs).
            Err(e) if c.required() || e.is_privilege_refusal() => return Err(e.into()),
            Err(why) => {
                tracing::warn!("{}: {why}", c.skipped());
                continue;
            }
        };
        tracing::debug!("{}: {attached}", c.name());
    }
    if let Err(why) = &r.ct {
        tracing::warn!("conntrack entries of drops not read: {why}");
    }
    Ok((tracer, r.symbols))
}

/// Traces until stopped; `output` (started by the caller, so bad sinks fail before any
/// kernel work) is flushed and shut down at the end.
pub async fn run(
    opts: RunOptions,
    output: Output,
    identity: Option<Identity>,
) -> anyhow::Result<Summary> {
    // Handlers first: a SIGINT or SIGTERM that arrives while the programs load, or just
    // after "attached" is logged, is a clean stop, not the default action (seen in a 5.10 VM:
    // SIGINT 0.4 s after "attached" killed the process before the handlers existed).
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let (mut tracer, symbols) = start(&opts)?;
    // Where the kernel refuses the nf_ct_delete program, its own DESTROY events stand in.
    let traced = tracer.attached();
    let mut ct_events = if !opts.ct_netlink
        || traced.contains(&conntrack::PROGRAM)
        || traced.contains(&conntrack::KPROBE_PROGRAM)
    {
        None
    } else {
        let filter = netlink::Filter {
            ports: opts.ports.clone(),
            all_tcp: opts.all_tcp,
        };
        match CtDestroyEvents::open(symbols.ct.clone(), filter)
            .and_then(crate::collect::loader::readable)
        {
            Ok(fd) => {
                tracing::info!(
                    "conntrack removals from ctnetlink DESTROY events (this network namespace)"
                );
                Some(fd)
            }
            Err(e) => {
                tracing::warn!("conntrack removals not reported: ctnetlink: {e}");
                None
            }
        }
    };
    if let Some(m) = output.metrics() {
        m.set_ready(true);
    }
    tracing::info!(
        programs = ?tracer.attached(),
        ports = ?if opts.all_tcp { vec![] } else { opts.ports.clone() },
        all_tcp = opts.all_tcp,
        "attached; tracing"
    );

    let pod = match (&opts.pod, &identity) {
        (Some(spec), Some(id)) => {
            Some((spec.clone(), id.pod_ips(spec).map_err(anyhow::Error::msg)?))
        }
        (Some(_), None) => anyhow::bail!("--pod needs --k8s-api, --kubeconfig or --k8s-snapshot"),
        (None, _) => None,
    };
    let mut cfg = pipeline::Config::new(&opts.node, &opts.ports);
    cfg.emit = opts.emit;
    cfg.correlate = correlate::Config {
        stall_after_ns: opts.stall_after.as_nanos() as u64,
        capacity: opts.flow_table,
        ..correlate::Config::default()
    };
    cfg.storm.idle_ns = opts.stall_after.as_nanos() as u64;
    cfg.agg_idle_ns = 2 * opts.flush.as_nanos() as u64;
    let mut p = Pipeline::new(cfg, Clock::new(), symbols, Box::new(pipeline::Procfs));
    let mut w = Wiring {
        identity,
        pod,
        out: output,
        max_events: opts.max_events,
        emitted: 0,
    };
    let mut agg = Vec::new();

    let deadline = async {
        match opts.duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut poll = tokio::time::interval(Duration::from_secs(1));
    let mut flush = tokio::time::interval(opts.flush);
    // Records below the wakeup threshold are submitted without waking us: drain on a timer.
    let mut drain = tokio::time::interval(Duration::from_millis(100));
    // Stall detection resolution: a fraction of --stall-after, at most 250 ms.
    let mut ticker = tokio::time::interval((opts.stall_after / 4).min(Duration::from_millis(250)));

    loop {
        tokio::select! {
            guard = tracer.events.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    p.record(&item);
                }
                guard.clear_ready();
            }
            _ = drain.tick() => {
                read_ring(&mut tracer, &mut p);
            }
            _ = flush.tick() => {
                // The ring first: a key's first record carries what its repeats repeat.
                read_ring(&mut tracer, &mut p);
                tracer.drop_counts(&mut agg);
                p.repeats(clock::monotonic_ns(), &agg);
            }
            guard = async {
                match tracer.logger.as_mut() {
                    Some(l) => l.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard?;
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            _ = ticker.tick() => {
                if p.wants_flush() {
                    // Ended attempts report complete drop counts.
                    read_ring(&mut tracer, &mut p);
                    tracer.drop_counts(&mut agg);
                    p.repeats(clock::monotonic_ns(), &agg);
                }
                p.tick(clock::monotonic_ns());
            }
            guard = async {
                match ct_events.as_mut() {
                    Some(c) => c.readable_mut().await,
                    None => std::future::pending().await,
                }
            } => {
                let mut guard = guard?;
                let now = clock::monotonic_ns();
                let mut removed = Vec::new();
                guard.get_inner_mut().drain(now, |c| removed.push(c));
                guard.clear_ready();
                for c in &removed {
                    p.conntrack_removed(c);
                }
            }
            _ = async {
                match w.identity.as_mut() {
                    Some(id) => id.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(id) = w.identity.as_mut() {
                    id.apply();
                    // A re-created pod can come back with another address.
                    if let Some((spec, ips)) = w.pod.as_mut()
                        && let Ok(now) = id.pod_ips(spec)
                    {
                        *ips = now;
                    }
                }
            }
            _ = poll.tick() => {
                report_counters(&tracer, &mut p, &w.out);
                if let Some(c) = ct_events.as_ref() {
                    let c = c.get_ref();
                    p.lost_total(c.overruns, LostSource::Kernel, "ctnetlink_overrun");
                    p.lost_total(c.malformed, LostSource::Input, "ctnetlink_malformed");
                }
                let node = opts.node.clone();
                let reports = w.identity.as_mut().map(|id| id.poll(&node)).unwrap_or_default();
                for e in reports {
                    p.push_external(e);
                }
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = &mut deadline => break,
        }
        act(&mut tracer, &mut p);
        w.deliver(&mut p);
        if w.done() {
            break;
        }
    }

    // Detach first so nothing new arrives, then drain what is already in the ring and the
    // aggregation map, and report everything still open.
    tracer.detach();
    if !w.done() {
        read_ring(&mut tracer, &mut p);
        tracer.flush_logs();
        tracer.drop_counts(&mut agg);
        let now = clock::monotonic_ns();
        p.repeats(now, &agg);
        p.finish(now);
        report_counters(&tracer, &mut p, &w.out);
        w.deliver(&mut p);
    }
    drop(tracer);
    let flush_timeout = w.out.flush_timeout();
    let mut summary = p.into_summary();
    summary.output = Some(w.out.shutdown(flush_timeout).await);
    Ok(summary)
}

/// Every record waiting in the ring buffer, through the pipeline.
fn read_ring(tracer: &mut Tracer, p: &mut Pipeline) {
    let ring = tracer.events.get_mut();
    while let Some(item) = ring.next() {
        p.record(&item);
    }
}

/// The kernel's counters: losses (ring buffer full, records it could not read) as `lost`
/// records when they grow, every counter into the metrics.
fn report_counters(tracer: &Tracer, p: &mut Pipeline, out: &Output) {
    let all = tracer.counters.all();
    for i in tracer_common::counter::LOSSES {
        let (name, total) = all[i as usize];
        p.lost_total(total, LostSource::Kernel, name);
    }
    if let Some(m) = out.metrics() {
        m.kernel_counters(&all);
    }
}
