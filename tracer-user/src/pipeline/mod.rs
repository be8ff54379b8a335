//! The daemon's core, free of I/O: kernel records in, events out.
//!
//! Fed raw ring buffer records ([`Pipeline::record`]), the kernel's aggregated drop counts
//! ([`Pipeline::repeats`]), conntrack removals and clock ticks, it decodes, correlates attempts
//! and storms, and returns droptrace.v1 events, each marked for the stream or for counting
//! only ([`Emit`] decides), plus the [`Action`]s the kernel side should take (watch a learned
//! Oracle redirect target, forget an idle aggregation key). No tokio, no sockets, no maps: the
//! run loop (`daemon`) wires it to the kernel and the outputs, the criterion bench and the
//! unit tests drive it directly.
mod emit;
pub mod repeats;
pub mod report;

use std::net::SocketAddr;

pub use emit::{Emit, EmitError, Summary};
use tracer_common::{
    CtEvent, DropEvent, DropKey, EventHeader, RetransmitEvent, StateEvent, StormSample, TnsEvent,
    kind,
};

use self::repeats::{AggEntry, Repeats};
use crate::{
    clock::Clock,
    collect::{Symbols, conntrack, drops, tcp, tns},
    correlate::oracle::{self, TnsTracker},
    correlate::{
        self, Correlator, Join,
        storm::{self, Storms},
    },
    decode::drop_class::DropClass,
    decode::{CtSignal, DropSignal, FlowKey},
    event::{Event, Kind, LostSource},
};

/// How long a learned Oracle redirect target stays watched in the kernel.
pub const REDIRECT_WATCH_NS: u64 = 600_000_000_000;

#[derive(Debug, Clone)]
pub struct Config {
    pub node: String,
    /// The ports the kernel watches (Oracle listeners by default).
    pub ports: Vec<u16>,
    pub emit: Emit,
    pub correlate: correlate::Config,
    pub storm: storm::Config,
    /// Aggregation keys idle this long after their last report are forgotten.
    pub agg_idle_ns: u64,
}

impl Config {
    pub fn new(node: &str, ports: &[u16]) -> Self {
        Self {
            node: node.to_string(),
            ports: ports.to_vec(),
            emit: Emit::default(),
            correlate: correlate::Config::default(),
            storm: storm::Config::default(),
            agg_idle_ns: 2_000_000_000,
        }
    }
}

/// What the kernel side should do for the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Watch this address and port until the CLOCK_MONOTONIC time (an Oracle redirect target).
    WatchHostPort(SocketAddr, u64),
    /// Watch this port on every address (a redirect target named by host name).
    WatchPort(u16),
    /// Remove an idle key from the kernel's aggregation map if its repeats are still the
    /// number reported (they all are), then tell `Pipeline::agg_key_forgotten`.
    ForgetAggKey(DropKey, u64),
}

/// One event out of the pipeline.
#[derive(Debug, Clone)]
pub struct Output {
    pub event: Event,
    /// In the stream; otherwise counted (summary, metrics) but not sent.
    pub stream: bool,
}

/// What the pipeline reads from the host besides kernel records.
pub trait Host {
    /// Container id and pod UID of a process, read while it is alive.
    fn process_identity(&self, tgid: u32) -> (Option<String>, Option<String>);
}

/// The real host: /proc.
pub struct Procfs;

impl Host for Procfs {
    fn process_identity(&self, tgid: u32) -> (Option<String>, Option<String>) {
        crate::decode::process::identity(tgid)
    }
}

/// Running totals already reported as `lost` records.
#[derive(Debug, Default)]
struct Reported {
    evicted: u64,
    tns_malformed: u64,
    counters: std::collections::HashMap<&'static str, u64>,
}

pub struct Pipeline {
    cfg: Config,
    clock: Clock,
    symbols: Symbols,
    host: Box<dyn Host + Send>,
    correlator: Correlator,
    storms: Storms,
    tns: TnsTracker,
    repeats: Repeats,
    out: Vec<Output>,
    actions: Vec<Action>,
    summary: Summary,
    reported: Reported,
    /// Incident ids for storms, shared with nothing else.
    next_storm_id: u64,
    flushed: Vec<DropSignal>,
    /// Connects already emitted, so one seen from both ends is one record.
    recent_connects: std::collections::VecDeque<FlowKey>,
}

/// Reads a plain-data record out of ring buffer bytes (8-byte aligned only, so unaligned).
fn record<T: Copy>(bytes: &[u8]) -> Option<T> {
    (bytes.len() >= size_of::<T>())
        // SAFETY: length checked; T is a repr(C) plain-data kernel record.
        .then(|| unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

impl Pipeline {
    pub fn new(cfg: Config, clock: Clock, symbols: Symbols, host: Box<dyn Host + Send>) -> Self {
        Self {
            correlator: Correlator::new(cfg.correlate.clone()),
            storms: Storms::new(cfg.storm.clone()),
            tns: TnsTracker::new(cfg.ports.iter().copied()),
            repeats: Repeats::new(cfg.agg_idle_ns),
            cfg,
            clock,
            symbols,
            host,
            out: Vec::new(),
            actions: Vec::new(),
            summary: Summary::default(),
            reported: Reported::default(),
            next_storm_id: 1,
            flushed: Vec::new(),
            recent_connects: std::collections::VecDeque::new(),
        }
    }

    /// Events produced since the last call.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Output> {
        self.out.drain(..)
    }

    /// Kernel-side actions requested since the last call.
    pub fn drain_actions(&mut self) -> std::vec::Drain<'_, Action> {
        self.actions.drain(..)
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    pub fn into_summary(mut self) -> Summary {
        self.summary.evicted = self.correlator.evicted;
        self.summary
    }

    /// Attempts and storms followed right now.
    pub fn tracked(&self) -> (usize, usize) {
        (self.correlator.tracked(), self.storms.tracked())
    }

    fn push(&mut self, event: Event) {
        let stream = self.cfg.emit.streams(&event);
        self.summary.count(&event, stream);
        self.out.push(Output { event, stream });
    }

    /// One ring buffer record.
    pub fn record(&mut self, bytes: &[u8]) {
        let Some(hdr) = record::<EventHeader>(bytes) else {
            self.summary.undecodable += 1;
            return;
        };
        let ok = match hdr.kind {
            kind::DROP => record::<DropEvent>(bytes).map(|rec| {
                let d = drops::decode(&rec, &self.symbols);
                self.repeats.first(drops::agg_key(&rec), &d);
                self.drop_signal(d);
            }),
            kind::STORM_SAMPLE => record::<StormSample>(bytes).map(|rec| {
                let (folded, real) = drops::decode_sample(&rec);
                let server = if folded.src.ip().is_unspecified() {
                    folded.dst
                } else {
                    folded.src
                };
                let source = if server == real.dst {
                    real.src
                } else {
                    real.dst
                };
                self.storms.sample(server, source.ip());
            }),
            kind::STATE => record::<StateEvent>(bytes).map(|rec| {
                let mut s = tcp::decode_state(&rec, &self.symbols.tcp_states);
                if s.new.state == crate::decode::State::SynSent
                    && let Some(o) = s.owner.as_mut()
                {
                    // Read now, while the connecting process is alive.
                    (o.container_id, o.pod_uid) = self.host.process_identity(o.tgid);
                }
                let e = report::state_event(&s, &self.clock, &self.cfg.node);
                self.push(e);
                self.correlator.on_state(&s);
            }),
            kind::RETRANSMIT => record::<RetransmitEvent>(bytes).map(|rec| {
                let r = tcp::decode_retransmit(&rec, &self.symbols.tcp_states);
                let e = report::retransmit_event(&r, &self.clock, &self.cfg.node);
                self.push(e);
                self.correlator.on_retransmit(&r);
            }),
            kind::CT_UNREPLIED => record::<CtEvent>(bytes)
                .and_then(|rec| conntrack::decode(&rec, &self.symbols.ct))
                .map(|c| self.conntrack_removed(&c)),
            kind::TNS => record::<TnsEvent>(bytes).map(|rec| self.tns_packet(&tns::decode(&rec))),
            _ => None,
        };
        if ok.is_none() {
            self.summary.undecodable += 1;
        }
        self.drain_correlator();
    }

    /// A drop, from its own record or from the kernel's aggregated repeats.
    fn drop_signal(&mut self, d: DropSignal) {
        if d.redirected && !self.redirected_leg(&d) {
            // A REDIRECTed client's SYN elsewhere than where it was sent: the kernel kept it
            // only in case it was the redirected leg; it is not a watched flow.
            return;
        }
        self.summary.drop_seen(&d);
        if d.class == DropClass::Local {
            // The host's own housekeeping (a queue purged at close, a sniffer's copy its
            // packet socket could not take, even when the kernel folded it toward a flooded
            // destination): a drop record, held back by default; no attempt's, no storm's.
            self.emit_drop(&d, None);
            return;
        }
        let server = storm::server_of(&d);
        if d.flow.is_folded() {
            // The kernel folded a storm of new flows: a storm toward that end.
            let id = self.storms.start(server, d.ts_ns, &mut self.next_storm_id);
            self.absorb_drop_only(server);
            self.storms.folded(server, &d);
            self.emit_drop(&d, Some(id));
            return;
        }
        if self.storms.is_active(server) && !self.correlator.owns_locally(&d) {
            // One more source of a storm: folded into its next drop record.
            self.storms.absorb(server, &d);
            return;
        }
        self.emit_drop(&d, None);
        if let Join::NewDropOnly(_) = self.correlator.on_drop(&d)
            && self.storms.new_drop_only(d.flow.src.ip(), server, d.ts_ns)
        {
            self.storms.start(server, d.ts_ns, &mut self.next_storm_id);
            self.absorb_drop_only(server);
        }
    }

    /// Whether a drop goes to a REDIRECT's target (as dialled, or its original tuple's).
    fn redirected_leg(&self, d: &DropSignal) -> bool {
        self.tns.is_redirect_target(d.flow.dst)
            || d.ct
                .as_ref()
                .is_some_and(|ct| self.tns.is_redirect_target(ct.original.dst))
    }

    /// Hands a storming destination's attempts seen only through drops to the storm.
    fn absorb_drop_only(&mut self, server: SocketAddr) {
        let taken = self.correlator.absorb_drop_only(server);
        if !taken.is_empty() {
            self.storms.absorb_attempts(server, taken);
        }
    }

    fn emit_drop(&mut self, d: &DropSignal, storm: Option<u64>) {
        let mut e = report::drop_event(d, &self.clock, &self.cfg.node);
        if let (Some(id), Some(drop)) = (storm, e.drop.as_mut()) {
            drop.storm = Some(id);
        }
        self.push(e);
    }

    fn tns_packet(&mut self, p: &tns::TnsSignal) {
        let tracked = self.tns.on_packet(p);
        for outcome in tracked.outcomes {
            match outcome {
                oracle::Outcome::Redirect {
                    client,
                    port,
                    target,
                    oracle,
                    ..
                } => {
                    // Watch the second leg in the kernel before the client's SYN leaves.
                    match target {
                        Some(t) => {
                            self.tns.learn_target(t);
                            self.actions
                                .push(Action::WatchHostPort(t, p.ts_ns + REDIRECT_WATCH_NS));
                            self.correlator.on_redirect(client, t, oracle, p.ts_ns);
                        }
                        // A host name: watch its port everywhere.
                        None => {
                            self.tns.learn_target_port(port);
                            self.actions.push(Action::WatchPort(port));
                        }
                    }
                }
                oracle::Outcome::Refuse { flow, oracle, .. } => {
                    self.correlator.on_refuse(flow, oracle, p.ts_ns);
                }
            }
        }
        for (flow, oracle) in tracked.events {
            let e = report::tns_event(&flow, oracle, p.ts_ns, &self.clock, &self.cfg.node);
            self.push(e);
        }
    }

    /// An unreplied conntrack entry went away (from the kernel program or ctnetlink).
    pub fn conntrack_removed(&mut self, c: &CtSignal) {
        let e = report::conntrack_event(c, &self.clock, &self.cfg.node);
        self.push(e);
        self.correlator.on_conntrack(c);
        self.drain_correlator();
    }

    /// The kernel's aggregated drop counts, read from its map by the run loop: repeats since
    /// the last flush become drop signals. Then storms flush their folded drops, so every
    /// count is in the stream before an incident that sums it.
    pub fn repeats(&mut self, now_ns: u64, entries: &[AggEntry]) {
        let mut flushed = std::mem::take(&mut self.flushed);
        let mut forget = Vec::new();
        self.repeats
            .flush(now_ns, entries, &self.symbols, &mut flushed, &mut forget);
        for d in flushed.drain(..) {
            self.drop_signal(d);
        }
        self.flushed = flushed;
        for (id, d) in self.storms.flush() {
            self.emit_drop(&d, Some(id));
        }
        self.actions
            .extend(forget.into_iter().map(|(k, n)| Action::ForgetAggKey(k, n)));
        self.drain_correlator();
    }

    /// The run loop removed an idle key from the kernel's aggregation map (`ForgetAggKey`).
    pub fn agg_key_forgotten(&mut self, key: &DropKey) {
        self.repeats.forgotten(key);
    }

    /// Whether an attempt ended and waits for the kernel's last counts (flush, then tick).
    pub fn wants_flush(&self) -> bool {
        self.correlator.has_ended()
    }

    /// Time passes: attempts and storms that ended or stalled are reported.
    pub fn tick(&mut self, now_ns: u64) {
        self.correlator.tick(now_ns);
        self.drain_correlator();
        self.storms.tick(now_ns);
        self.drain_storms();
        let evicted = self.correlator.evicted;
        self.summary.evicted = evicted;
        if evicted > self.reported.evicted {
            let n = evicted - self.reported.evicted;
            self.reported.evicted = evicted;
            self.lost(n, LostSource::Correlation, "flow_table_full");
        }
        if self.tns.malformed > self.reported.tns_malformed {
            let n = self.tns.malformed - self.reported.tns_malformed;
            self.reported.tns_malformed = self.tns.malformed;
            self.lost(n, LostSource::Input, "tns_malformed");
        }
    }

    /// At exit, after the last records and counts: everything still open is reported.
    pub fn finish(&mut self, now_ns: u64) {
        self.correlator.finish(now_ns);
        self.drain_correlator();
        for (id, d) in self.storms.flush() {
            self.emit_drop(&d, Some(id));
        }
        self.storms.finish();
        self.drain_storms();
    }

    /// A `lost` record for `count` events that never made it.
    pub fn lost(&mut self, count: u64, source: LostSource, reason: &str) {
        if source == LostSource::Kernel {
            self.summary.lost_kernel += count;
        }
        let e = Event::lost(&self.cfg.node, count, source, reason, None);
        self.push(e);
    }

    /// A running counter kept outside (kernel counters, ctnetlink): a `lost` record for what
    /// it gained since the last call with the same `reason`.
    pub fn lost_total(&mut self, total: u64, source: LostSource, reason: &'static str) {
        let before = self.reported.counters.get(reason).copied().unwrap_or(0);
        if total > before {
            self.reported.counters.insert(reason, total);
            self.lost(total - before, source, reason);
        }
    }

    /// Any event made outside the pipeline (identity skips, ...), counted and streamed.
    pub fn push_external(&mut self, event: Event) {
        self.push(event);
    }

    fn drain_correlator(&mut self) {
        let incidents: Vec<_> = self.correlator.drain().collect();
        for mut i in incidents {
            if i.drops.is_empty()
                && let Some(id) = self.storms.id(i.flow.dst)
            {
                i.storm = Some(id);
                i.diagnosis = format!(
                    "{}; a drop storm toward {} is under way (storm {id}): this attempt's \
                     SYNs may be among its folded drops",
                    i.diagnosis, i.flow.dst
                );
            }
            let e = report::stall_event(&i, &self.clock, &self.cfg.node);
            self.push(e);
        }
        let connected: Vec<_> = self.correlator.drain_connected().collect();
        for c in connected {
            if self.recent_connects.contains(&c.flow) {
                continue;
            }
            if self.recent_connects.len() >= 1024 {
                self.recent_connects.pop_front();
            }
            self.recent_connects.push_back(c.flow);
            let e = report::connect_event(&c, &self.clock, &self.cfg.node);
            self.push(e);
        }
    }

    fn drain_storms(&mut self) {
        let incidents: Vec<_> = self.storms.drain().collect();
        for s in incidents {
            let e = report::storm_event(&s, &self.clock, &self.cfg.node);
            self.push(e);
        }
    }

    /// Whether `kind` of event can be in the stream at all (so callers can skip work).
    pub fn streams_kind(&self, kind: Kind) -> bool {
        self.cfg.emit.streams_kind(kind)
    }
}

#[cfg(test)]
mod tests;
