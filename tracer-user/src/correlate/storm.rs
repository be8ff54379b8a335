//! Storms: a flood of drops toward one destination from many sources (a SYN flood with
//! random source addresses, a scan, a policy denying a whole deployment) is one problem, so it
//! becomes one `storm` incident per destination - counts, duration, peak rate, top sources -
//! not one stall per spoofed source.
//!
//! A storm starts when the kernel folds drops of new flows past its per-CPU budget (the
//! folded records carry an unspecified source), or when many attempts seen only through drops
//! start toward one destination within a second. While it lasts, drops toward that
//! destination that no local socket owns are folded here too and leave as one `drop` record
//! per (reason, location, namespace) and flush, so the records per second stay bounded while
//! the sum of `count` still equals the kernel's counter. It ends after `idle_ns` without a
//! drop. Pure: time comes from the signals and `tick`.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
};

use super::{Absorbed, DropTally};
use crate::decode::DropSignal;

/// The kernel sends one sample of a folded drop's real source every this many folded drops
/// per CPU (tracer_common::STORM_SAMPLE_EVERY).
pub const SAMPLE_EVERY: u64 = tracer_common::STORM_SAMPLE_EVERY as u64;
/// Distinct sources remembered per storm; beyond it new ones count as `other`.
const MAX_SOURCES: usize = 65_536;
/// Sources listed in the incident.
const TOP: usize = 5;
/// Attempts seen only through drops toward one destination within a second that make it a
/// storm even before the kernel folds anything.
pub const SOURCES_PER_SEC: usize = 32;

#[derive(Debug, Clone)]
pub struct Config {
    /// A storm ends after this long without a drop.
    pub idle_ns: u64,
    /// Distinct new sources per second toward one destination that start a storm.
    pub sources_per_sec: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            idle_ns: 3_000_000_000,
            sources_per_sec: SOURCES_PER_SEC,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StormOutcome {
    InProgress,
    Ended,
}

impl StormOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StormOutcome::InProgress => "in_progress",
            StormOutcome::Ended => "ended",
        }
    }
}

/// A source and its drops: exact where they came one record each, estimated from the
/// kernel's samples where they were folded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub ip: IpAddr,
    pub drops: u64,
}

/// One record to emit.
#[derive(Debug, Clone)]
pub struct StormIncident {
    pub id: u64,
    /// The destination every drop was headed to.
    pub server: SocketAddr,
    pub started_ns: u64,
    pub at_ns: u64,
    pub outcome: StormOutcome,
    /// Every drop toward `server` since the storm began.
    pub total: u64,
    pub peak_per_sec: u64,
    pub drops: Vec<DropTally>,
    /// Distinct sources seen (exactly, or in samples).
    pub distinct_sources: u64,
    /// Sources beyond the remembered ones.
    pub other_sources: bool,
    pub top: Vec<Source>,
    /// Whether `top` counts are estimated from samples.
    pub estimated: bool,
    pub diagnosis: String,
}

#[derive(Debug)]
struct Storm {
    id: u64,
    server: SocketAddr,
    started_ns: u64,
    last_ns: u64,
    total: u64,
    drops: Vec<DropTally>,
    /// Drops folded here since the last flush, to leave as drop records.
    pending: Vec<DropSignal>,
    /// Per source: (exact drops, samples).
    sources: HashMap<IpAddr, (u64, u64)>,
    other_sources: bool,
    second_start_ns: u64,
    this_second: u64,
    peak_per_sec: u64,
    reported_in_progress: bool,
}

/// New attempts seen only through drops toward one destination, in the current second.
#[derive(Debug, Default)]
struct Window {
    start_ns: u64,
    sources: Vec<IpAddr>,
}

#[derive(Debug, Default)]
pub struct Storms {
    cfg: Config,
    active: HashMap<SocketAddr, Storm>,
    windows: HashMap<SocketAddr, Window>,
    out: Vec<StormIncident>,
}

/// The end a drop was headed to: the one the kernel kept when it folded the other away,
/// the server of a SYN-ACK, else the destination.
pub fn server_of(d: &DropSignal) -> SocketAddr {
    if d.flow.dst.ip().is_unspecified() && d.flow.dst.port() == 0 || d.is_syn_ack() {
        d.flow.src
    } else {
        d.flow.dst
    }
}

impl Storms {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            ..Self::default()
        }
    }

    pub fn is_active(&self, server: SocketAddr) -> bool {
        self.active.contains_key(&server)
    }

    /// The storm toward `server`, if any: its id.
    pub fn id(&self, server: SocketAddr) -> Option<u64> {
        self.active.get(&server).map(|s| s.id)
    }

    /// Incidents produced since the last call.
    pub fn drain(&mut self) -> std::vec::Drain<'_, StormIncident> {
        self.out.drain(..)
    }

    /// Starts a storm toward `server` (if none is active) with the next id from `next_id`.
    pub fn start(&mut self, server: SocketAddr, ts_ns: u64, next_id: &mut u64) -> u64 {
        if let Some(s) = self.active.get(&server) {
            return s.id;
        }
        let id = *next_id;
        *next_id += 1;
        self.windows.remove(&server);
        self.active.insert(
            server,
            Storm {
                id,
                server,
                started_ns: ts_ns,
                last_ns: ts_ns,
                total: 0,
                drops: Vec::new(),
                pending: Vec::new(),
                sources: HashMap::new(),
                other_sources: false,
                second_start_ns: ts_ns,
                this_second: 0,
                peak_per_sec: 0,
                reported_in_progress: false,
            },
        );
        id
    }

    /// A new attempt seen only through drops from `client` toward `server`; true once they
    /// come from enough sources within a second to be a storm.
    pub fn new_drop_only(&mut self, client: IpAddr, server: SocketAddr, ts_ns: u64) -> bool {
        let w = self.windows.entry(server).or_default();
        if ts_ns.saturating_sub(w.start_ns) >= 1_000_000_000 {
            w.start_ns = ts_ns;
            w.sources.clear();
        }
        if !w.sources.contains(&client) {
            w.sources.push(client);
        }
        w.sources.len() >= self.cfg.sources_per_sec
    }

    /// A drop record the kernel folded (its source unspecified): counted into the storm;
    /// the caller emits the record itself.
    pub fn folded(&mut self, server: SocketAddr, d: &DropSignal) {
        if let Some(s) = self.active.get_mut(&server) {
            s.count(d);
        }
    }

    /// A drop of one flow toward a storming destination: counted, its source remembered, and
    /// kept to leave folded with the next flush.
    pub fn absorb(&mut self, server: SocketAddr, d: &DropSignal) {
        if let Some(s) = self.active.get_mut(&server) {
            s.count(d);
            s.source(d.flow.src.ip(), d.count, 0);
            match s.pending.iter_mut().find(|p| same_place(p, d)) {
                Some(p) => {
                    p.count += d.count;
                    p.ts_ns = p.ts_ns.max(d.ts_ns);
                }
                None => {
                    let mut p = d.clone();
                    p.flow.src = unspecified(d.flow.src);
                    p.ct = None;
                    s.pending.push(p);
                }
            }
        }
    }

    /// Attempts the correlator handed over: their drops are in the stream already, one
    /// record each; the storm counts them and their sources.
    pub fn absorb_attempts(&mut self, server: SocketAddr, attempts: Vec<Absorbed>) {
        let Some(s) = self.active.get_mut(&server) else {
            return;
        };
        for a in attempts {
            let n: u64 = a.drops.iter().map(|t| t.count).sum();
            s.source(a.client.ip(), n, 0);
            s.total += n;
            for t in a.drops {
                s.tally(t);
            }
        }
    }

    /// One sampled real source of the kernel's folded drops.
    pub fn sample(&mut self, server: SocketAddr, src: IpAddr) {
        if let Some(s) = self.active.get_mut(&server) {
            s.source(src, 0, 1);
        }
    }

    /// Drops folded here since the last call, as (storm id, drop record to emit).
    pub fn flush(&mut self) -> Vec<(u64, DropSignal)> {
        let mut out = Vec::new();
        for s in self.active.values_mut() {
            out.extend(s.pending.drain(..).map(|p| (s.id, p)));
        }
        out
    }

    /// Time passes: a storm in progress is reported once it has lasted a second, and ends
    /// after `idle_ns` without drops. Call `flush` first: a storm's last folded drops must
    /// leave before it is reported ended.
    pub fn tick(&mut self, now_ns: u64) {
        self.windows
            .retain(|_, w| now_ns.saturating_sub(w.start_ns) < 1_000_000_000);
        let idle = self.cfg.idle_ns;
        let ended: Vec<SocketAddr> = self
            .active
            .values()
            .filter(|s| now_ns.saturating_sub(s.last_ns) >= idle && s.pending.is_empty())
            .map(|s| s.server)
            .collect();
        for server in ended {
            if let Some(s) = self.active.remove(&server) {
                self.out.push(s.incident(StormOutcome::Ended, s.last_ns));
            }
        }
        for s in self.active.values_mut() {
            if !s.reported_in_progress
                && s.total > 0
                && now_ns.saturating_sub(s.started_ns) >= 1_000_000_000
            {
                s.reported_in_progress = true;
                self.out.push(s.incident(StormOutcome::InProgress, now_ns));
            }
        }
    }

    /// At exit: every storm ends now.
    pub fn finish(&mut self) {
        for (_, s) in self.active.drain() {
            self.out.push(s.incident(StormOutcome::Ended, s.last_ns));
        }
    }

    pub fn tracked(&self) -> usize {
        self.active.len()
    }
}

fn unspecified(a: SocketAddr) -> SocketAddr {
    let ip = match a.ip() {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u8; 16]),
    };
    SocketAddr::new(ip, 0)
}

fn same_place(a: &DropSignal, b: &DropSignal) -> bool {
    a.reason == b.reason
        && a.location == b.location
        && a.netns == b.netns
        && a.flow.dst == b.flow.dst
        && a.tcp_flags == b.tcp_flags
}

impl Storm {
    fn count(&mut self, d: &DropSignal) {
        self.total += d.count;
        self.last_ns = self.last_ns.max(d.ts_ns);
        if d.ts_ns.saturating_sub(self.second_start_ns) >= 1_000_000_000 {
            self.second_start_ns = d.ts_ns;
            self.this_second = 0;
        }
        self.this_second += d.count;
        self.peak_per_sec = self.peak_per_sec.max(self.this_second);
        self.tally(DropTally::of(d));
    }

    fn tally(&mut self, t: DropTally) {
        match self.drops.iter_mut().find(|x| x.same_place(&t)) {
            Some(x) => x.count += t.count,
            None => self.drops.push(t),
        }
    }

    fn source(&mut self, ip: IpAddr, exact: u64, samples: u64) {
        if ip.is_unspecified() {
            return;
        }
        let full = self.sources.len() >= MAX_SOURCES;
        match self.sources.get_mut(&ip) {
            Some((e, s)) => {
                *e += exact;
                *s += samples;
            }
            None if full => self.other_sources = true,
            None => {
                self.sources.insert(ip, (exact, samples));
            }
        }
    }

    fn incident(&self, outcome: StormOutcome, at_ns: u64) -> StormIncident {
        let estimated = self.sources.values().any(|(_, s)| *s > 0);
        let mut top: Vec<Source> = self
            .sources
            .iter()
            .map(|(ip, (e, s))| Source {
                ip: *ip,
                drops: e + s * SAMPLE_EVERY,
            })
            .collect();
        top.sort_by(|a, b| b.drops.cmp(&a.drops).then(a.ip.cmp(&b.ip)));
        top.truncate(TOP);
        let mut inc = StormIncident {
            id: self.id,
            server: self.server,
            started_ns: self.started_ns,
            at_ns,
            outcome,
            total: self.total,
            peak_per_sec: self.peak_per_sec,
            drops: self.drops.clone(),
            distinct_sources: self.sources.len() as u64,
            other_sources: self.other_sources,
            top,
            estimated,
            diagnosis: String::new(),
        };
        inc.diagnosis = super::diagnosis::storm(&inc);
        inc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::testing;

    fn drop_(ts: u64, src: &str, dst: &str, count: u64) -> DropSignal {
        let mut d = testing::drop(ts, testing::key(src, dst), 0x02, "NETFILTER_DROP");
        d.count = count;
        d
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn a_flood_from_many_sources_is_one_storm_with_exact_counts() {
        let server: SocketAddr = "10.0.0.2:1521".parse().unwrap();
        let mut st = Storms::new(Config::default());
        let mut next = 1;
        let id = st.start(server, S, &mut next);
        for i in 0..1000u32 {
            let src = format!("192.0.{}.{}:{}", i / 250, i % 250, 1024 + i);
            st.absorb(server, &drop_(S + u64::from(i), &src, "10.0.0.2:1521", 1));
        }
        // The kernel folded 5000 more: one record, sampled sources.
        st.folded(server, &drop_(S + 5000, "0.0.0.0:0", "10.0.0.2:1521", 5000));
        st.sample(server, "198.51.100.7".parse().unwrap());
        let folded = st.flush();
        assert_eq!(folded.len(), 1, "per-flow drops leave as one record");
        assert_eq!(folded[0].0, id);
        assert_eq!(folded[0].1.count, 1000);
        assert!(folded[0].1.flow.src.ip().is_unspecified());
        st.tick(2 * S + 10);
        st.tick(10 * S);
        let incidents: Vec<_> = st.drain().collect();
        assert_eq!(incidents.len(), 2, "{incidents:#?}");
        assert_eq!(incidents[0].outcome, StormOutcome::InProgress);
        let fin = &incidents[1];
        assert_eq!(fin.outcome, StormOutcome::Ended);
        assert_eq!(fin.id, id);
        assert_eq!(fin.total, 6000);
        assert_eq!(fin.distinct_sources, 1001);
        assert!(fin.estimated);
        assert_eq!(fin.top[0].ip.to_string(), "198.51.100.7");
        assert_eq!(fin.top[0].drops, SAMPLE_EVERY);
        assert!(fin.diagnosis.contains("6000"), "{}", fin.diagnosis);
        assert_eq!(st.tracked(), 0);
    }

    #[test]
    fn many_new_sources_within_a_second_start_a_storm() {
        let server: SocketAddr = "10.0.0.2:1521".parse().unwrap();
        let mut st = Storms::new(Config {
            sources_per_sec: 3,
            ..Config::default()
        });
        assert!(!st.new_drop_only("10.0.1.1".parse().unwrap(), server, S));
        assert!(!st.new_drop_only("10.0.1.1".parse().unwrap(), server, S + 1));
        assert!(!st.new_drop_only("10.0.1.2".parse().unwrap(), server, S + 2));
        // A second later the window starts over.
        assert!(!st.new_drop_only("10.0.1.3".parse().unwrap(), server, 2 * S + 3));
        assert!(!st.new_drop_only("10.0.1.4".parse().unwrap(), server, 2 * S + 4));
        assert!(st.new_drop_only("10.0.1.5".parse().unwrap(), server, 2 * S + 5));
    }
}
