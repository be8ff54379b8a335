//! `droptrace run`: kernel records -> decode -> correlate -> encode -> sinks, until a signal,
//! `--duration` or `--max-events`.
use std::{collections::BTreeMap, time::Duration};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracer_common::{CtEvent, DropEvent, EventHeader, RetransmitEvent, StateEvent, TnsEvent, kind};

use crate::{
    aggregate::DropAggregator,
    cgroup,
    clock::{self, Clock},
    collectors::{
        Symbols, conntrack,
        ct_netlink::{self, CtDestroyEvents},
        skb_drop, tcp_state, tns,
    },
    correlate::{self, Correlator},
    event::{Event, Kind, LostSource},
    identity::Identity,
    preflight, report,
    signal::{self, DropSignal},
    sinks::{Output, OutputSummary},
    tns_track::{self, TnsTracker},
    tracer::{Tracer, TracerOptions, Watch},
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
    /// Also emit every per-signal record (tcp_state, retransmit, conntrack).
    pub raw: bool,
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

/// Totals printed to stderr at exit.
#[derive(Debug, Default)]
pub struct Summary {
    pub events: BTreeMap<&'static str, u64>,
    pub drops_by_reason: BTreeMap<String, u64>,
    pub lost_kernel: u64,
    pub undecodable: u64,
    pub evicted: u64,
    pub output: Option<OutputSummary>,
}

impl Summary {
    pub fn line(&self) -> String {
        let total: u64 = self.events.values().sum();
        let list = |m: Vec<String>| {
            if m.is_empty() {
                "none".to_string()
            } else {
                m.join(", ")
            }
        };
        let mut line = format!(
            "droptrace: {total} events ({}), {} lost in kernel, {} undecodable, {} attempts \
             evicted; drops by reason: {}",
            list(
                self.events
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect()
            ),
            self.lost_kernel,
            self.undecodable,
            self.evicted,
            list(
                self.drops_by_reason
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect()
            ),
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

/// How long a learned Oracle redirect target stays watched in the kernel.
const REDIRECT_WATCH_NS: u64 = 600_000_000_000;

struct Pipeline {
    identity: Option<Identity>,
    /// `--pod`: the pod and its addresses, refreshed as the cluster changes.
    pod: Option<(String, Vec<std::net::IpAddr>)>,
    tns: TnsTracker,
    watch: Option<Watch>,
    reported_malformed: u64,
    reported_ct_overruns: u64,
    reported_ct_malformed: u64,
    clock: Clock,
    symbols: Symbols,
    correlator: Correlator,
    aggregator: Option<DropAggregator>,
    flushed: Vec<DropSignal>,
    node: String,
    raw: bool,
    out: Output,
    summary: Summary,
    max_events: Option<u64>,
    emitted: u64,
    reported_evictions: u64,
}

/// Reads a plain-data record out of ring buffer bytes (8-byte aligned only, so unaligned).
fn record<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>())
        // SAFETY: length checked; T is a repr(C) plain-data kernel record.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl Pipeline {
    fn emit(&mut self, event: &Event) {
        if let (Some((_, ips)), Some(f)) = (&self.pod, &event.flow)
            && !ips.contains(&f.src_ip)
            && !ips.contains(&f.dst_ip)
        {
            return;
        }
        match &mut self.identity {
            Some(id) if matches!(event.kind, Kind::Drop | Kind::Stall) => {
                let mut e = event.clone();
                id.enrich(&mut e);
                self.out.send(&e);
            }
            _ => self.out.send(event),
        }
        *self.summary.events.entry(event.kind.as_str()).or_default() += 1;
        if event.kind != Kind::Lost {
            self.emitted += 1;
        }
    }

    fn done(&self) -> bool {
        self.max_events.is_some_and(|m| self.emitted >= m)
    }

    /// One ring buffer record through decode and correlate.
    fn record(&mut self, bytes: &[u8]) {
        if bytes.len() < size_of::<EventHeader>() {
            self.summary.undecodable += 1;
            return;
        }
        match bytes[0] {
            kind::DROP => {
                let Some(rec) = record::<DropEvent>(bytes) else {
                    self.summary.undecodable += 1;
                    return;
                };
                let d = skb_drop::decode(&rec, &self.symbols);
                *self
                    .summary
                    .drops_by_reason
                    .entry(d.reason.clone())
                    .or_default() += d.count;
                self.emit(&report::drop_event(&d, &self.clock, &self.node));
                self.correlator.on_drop(&d);
            }
            kind::STATE => {
                let Some(rec) = record::<StateEvent>(bytes) else {
                    self.summary.undecodable += 1;
                    return;
                };
                let mut s = tcp_state::decode_state(&rec, &self.symbols.tcp_states);
                if s.new.is("SYN_SENT")
                    && let Some(o) = s.owner.as_mut()
                {
                    // Read now, while the connecting process is alive.
                    (o.container_id, o.pod_uid) = cgroup::identity(o.tgid);
                }
                if self.raw {
                    self.emit(&report::state_event(&s, &self.clock, &self.node));
                }
                self.correlator.on_state(&s);
            }
            kind::RETRANSMIT => {
                let Some(rec) = record::<RetransmitEvent>(bytes) else {
                    self.summary.undecodable += 1;
                    return;
                };
                let r = tcp_state::decode_retransmit(&rec, &self.symbols.tcp_states);
                if self.raw {
                    self.emit(&report::retransmit_event(&r, &self.clock, &self.node));
                }
                self.correlator.on_retransmit(&r);
            }
            kind::CT_UNREPLIED => {
                let Some(c) = record::<CtEvent>(bytes)
                    .and_then(|rec| conntrack::decode(&rec, &self.symbols.ct))
                else {
                    self.summary.undecodable += 1;
                    return;
                };
                self.conntrack_removed(&c);
            }
            kind::TNS => {
                let Some(rec) = record::<TnsEvent>(bytes) else {
                    self.summary.undecodable += 1;
                    return;
                };
                self.tns_packet(&tns::decode(&rec));
            }
            _ => self.summary.undecodable += 1,
        }
        self.flush_incidents();
    }

    fn tns_packet(&mut self, p: &tns::TnsSignal) {
        let tracked = self.tns.on_packet(p);
        for outcome in tracked.outcomes {
            match outcome {
                tns_track::Outcome::Redirect {
                    client,
                    host,
                    port,
                    target,
                    oracle,
                    ..
                } => {
                    // Watch the second leg in the kernel before the client's SYN leaves.
                    let learned = match (target, self.watch.as_mut()) {
                        (Some(t), Some(w)) => {
                            self.tns.learn_target(t);
                            w.host_port(t, clock::monotonic_ns() + REDIRECT_WATCH_NS)
                        }
                        // A host name: watch its port everywhere.
                        (None, Some(w)) => w.port(port),
                        (_, None) => Ok(()),
                    };
                    if let Err(e) = learned {
                        tracing::warn!("cannot watch redirect target {host}:{port}: {e}");
                    }
                    tracing::info!(%client, "learned Oracle redirect target {host}:{port}");
                    if let Some(t) = target {
                        self.correlator.on_redirect(client, t, oracle, p.ts_ns);
                    }
                }
                tns_track::Outcome::Refuse { flow, oracle, .. } => {
                    self.correlator.on_refuse(flow, oracle, p.ts_ns);
                }
            }
        }
        for (flow, oracle) in tracked.events {
            self.emit(&report::tns_event(
                &flow,
                oracle,
                p.ts_ns,
                &self.clock,
                &self.node,
            ));
        }
    }

    fn drop_signal(&mut self, d: &DropSignal) {
        *self
            .summary
            .drops_by_reason
            .entry(d.reason.clone())
            .or_default() += d.count;
        self.emit(&report::drop_event(d, &self.clock, &self.node));
        self.correlator.on_drop(d);
    }

    /// Drop counts the kernel aggregated since the last flush, into the stream.
    fn flush_drops(&mut self) {
        let Some(agg) = self.aggregator.as_mut() else {
            return;
        };
        let mut flushed = std::mem::take(&mut self.flushed);
        agg.flush(clock::monotonic_ns(), &self.symbols, &mut flushed);
        for d in flushed.drain(..) {
            self.drop_signal(&d);
        }
        self.flushed = flushed;
        self.flush_incidents();
    }

    /// An unreplied conntrack entry went away (from the kernel program or ctnetlink).
    fn conntrack_removed(&mut self, c: &signal::CtSignal) {
        if self.raw {
            self.emit(&report::conntrack_event(c, &self.clock, &self.node));
        }
        self.correlator.on_conntrack(c);
    }

    /// ctnetlink overruns and unparsable messages since the last report.
    fn report_ct_netlink(&mut self, ct: &CtDestroyEvents) {
        self.reported_ct_overruns = self.report_growth(
            ct.overruns,
            self.reported_ct_overruns,
            LostSource::Kernel,
            "ctnetlink_overrun",
        );
        self.reported_ct_malformed = self.report_growth(
            ct.malformed,
            self.reported_ct_malformed,
            LostSource::Input,
            "ctnetlink_malformed",
        );
    }

    /// A `lost` record for what a running counter gained since `reported`; returns the new
    /// reported total.
    fn report_growth(
        &mut self,
        total: u64,
        reported: u64,
        source: LostSource,
        reason: &str,
    ) -> u64 {
        if total > reported {
            let e = Event::lost(&self.node, total - reported, source, reason, None);
            self.emit(&e);
        }
        total.max(reported)
    }

    fn flush_incidents(&mut self) {
        let incidents: Vec<_> = self.correlator.drain().collect();
        for i in &incidents {
            self.emit(&report::stall_event(i, &self.clock, &self.node));
        }
    }

    fn tick(&mut self) {
        if self.correlator.has_ended() {
            // Ended attempts report complete drop counts.
            self.flush_drops();
        }
        self.correlator.tick(clock::monotonic_ns());
        self.flush_incidents();
        let evicted = self.correlator.evicted;
        if evicted > self.reported_evictions {
            self.summary.evicted = evicted;
        }
        self.reported_evictions = self.report_growth(
            evicted,
            self.reported_evictions,
            LostSource::Correlation,
            "flow_table_full",
        );
    }

    /// TNS bytes the parser could not decode since the last report.
    fn report_malformed(&mut self) {
        self.reported_malformed = self.report_growth(
            self.tns.malformed,
            self.reported_malformed,
            LostSource::Input,
            "tns_malformed",
        );
    }

    fn report_kernel_loss(&mut self, total_lost: u64) {
        self.summary.lost_kernel = self.report_growth(
            total_lost,
            self.summary.lost_kernel,
            LostSource::Kernel,
            "ringbuf_full",
        );
    }
}

/// Everything before the first event: checks, layouts, load, attach. Optional hooks that
/// cannot run are reported and skipped.
pub fn start(opts: &RunOptions) -> anyhow::Result<(Tracer, Symbols)> {
    let t0 = std::time::Instant::now();
    let report = preflight::run(false);
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
    tracer.attach_tracepoint(skb_drop::PROGRAM, skb_drop::CATEGORY, skb_drop::TRACEPOINT)?;
    let optional = [
        (
            "TCP lifecycle",
            r.tcp.as_ref().map(|_| ()).map_err(Clone::clone),
            (
                tcp_state::STATE_PROGRAM,
                Some(tcp_state::STATE_CATEGORY),
                tcp_state::STATE_TRACEPOINT,
            ),
        ),
        (
            "retransmits",
            r.retransmit.clone(),
            (
                tcp_state::RETRANSMIT_PROGRAM,
                Some(tcp_state::RETRANSMIT_CATEGORY),
                tcp_state::RETRANSMIT_TRACEPOINT,
            ),
        ),
        (
            "conntrack removals",
            r.ct_delete.clone(),
            (conntrack::PROGRAM, None, conntrack::FUNCTION),
        ),
    ];
    match tns::cgroup2_root() {
        Some(root) => {
            for (prog, ingress) in [(tns::INGRESS_PROGRAM, true), (tns::EGRESS_PROGRAM, false)] {
                if let Err(e) = tracer.attach_cgroup_skb(prog, &root, ingress) {
                    tracing::warn!("Oracle TNS not followed: {prog}: {e}");
                }
            }
        }
        None => tracing::warn!("Oracle TNS not followed: no cgroup v2 root mounted"),
    }
    for (what, available, (prog, category, name)) in optional {
        let attached = available.and_then(|()| {
            match category {
                Some(c) => tracer.attach_tracepoint(prog, c, name),
                None => tracer.attach_fentry(prog, name),
            }
            .map_err(|e| e.to_string())
        });
        if let Err(why) = attached {
            tracing::warn!("{what} not traced: {why}");
        }
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
    let (mut tracer, symbols) = start(&opts)?;
    // Where the kernel refuses the nf_ct_delete program, its own DESTROY events stand in.
    let mut ct_events = if !opts.ct_netlink || tracer.attached().contains(&conntrack::PROGRAM) {
        None
    } else {
        let filter = ct_netlink::Filter {
            ports: opts.ports.clone(),
            all_tcp: opts.all_tcp,
        };
        match CtDestroyEvents::open(symbols.ct.clone(), filter).and_then(crate::tracer::readable) {
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

    let aggregator = tracer
        .drop_agg
        .take()
        .map(|m| DropAggregator::new(m, 2 * opts.flush.as_nanos() as u64));
    let pod = match (&opts.pod, &identity) {
        (Some(spec), Some(id)) => {
            Some((spec.clone(), id.pod_ips(spec).map_err(anyhow::Error::msg)?))
        }
        (Some(_), None) => anyhow::bail!("--pod needs --k8s-api, --kubeconfig or --k8s-snapshot"),
        (None, _) => None,
    };
    let mut p = Pipeline {
        pod,
        identity,
        tns: TnsTracker::new(opts.ports.iter().copied()),
        watch: tracer.watch.take(),
        reported_malformed: 0,
        reported_ct_overruns: 0,
        reported_ct_malformed: 0,
        clock: Clock::new(),
        symbols,
        aggregator,
        flushed: Vec::new(),
        correlator: Correlator::new(correlate::Config {
            stall_after_ns: opts.stall_after.as_nanos() as u64,
            capacity: opts.flow_table,
            ..correlate::Config::default()
        }),
        node: opts.node.clone(),
        raw: opts.raw,
        out: output,
        summary: Summary::default(),
        max_events: opts.max_events,
        emitted: 0,
        reported_evictions: 0,
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
    let mut flush = tokio::time::interval(opts.flush);
    // Records below the wakeup threshold are submitted without waking us: drain on a timer.
    let mut drain = tokio::time::interval(Duration::from_millis(100));
    // Stall detection resolution: a fraction of --stall-after, at most 250 ms.
    let mut ticker = tokio::time::interval((opts.stall_after / 4).min(Duration::from_millis(250)));

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
            _ = drain.tick() => {
                let ring = events.get_mut();
                while let Some(item) = ring.next() {
                    p.record(&item);
                    if p.done() { break; }
                }
                if p.done() { break; }
            }
            _ = flush.tick() => {
                p.flush_drops();
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
            _ = ticker.tick() => {
                p.tick();
                if p.done() { break; }
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
                p.flush_incidents();
                if p.done() { break; }
            }
            _ = async {
                match p.identity.as_mut() {
                    Some(id) => id.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(id) = p.identity.as_mut() {
                    id.apply();
                    // A re-created pod can come back with another address.
                    if let Some((spec, ips)) = p.pod.as_mut()
                        && let Ok(now) = id.pod_ips(spec)
                    {
                        *ips = now;
                    }
                }
            }
            _ = poll.tick() => {
                p.report_kernel_loss(counters.lost_in_kernel());
                p.report_malformed();
                if let Some(c) = ct_events.as_ref() {
                    p.report_ct_netlink(c.get_ref());
                }
                let node = p.node.clone();
                let reports = p.identity.as_mut().map(|id| id.poll(&node)).unwrap_or_default();
                for e in &reports {
                    p.emit(e);
                }
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
    if !p.done() {
        p.flush_drops();
        p.correlator.finish(clock::monotonic_ns());
        p.flush_incidents();
    }
    p.report_kernel_loss(tracer.counters.lost_in_kernel());
    p.summary.evicted = p.correlator.evicted;
    drop(tracer);
    let flush_timeout = p.out.flush_timeout();
    let mut summary = p.summary;
    summary.output = Some(p.out.shutdown(flush_timeout).await);
    Ok(summary)
}
