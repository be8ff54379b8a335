//! The flow table: joins the signals of one connection attempt (state changes, SYN and data
//! retransmits, drops, conntrack) into one `stall` incident. Pure: no I/O, time comes from the
//! signals and from `tick`, so every rule is unit-tested with synthetic signals.
use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
};

mod diagnosis;
mod incident;
pub mod oracle;
pub mod storm;

use diagnosis::{diagnose, redirected_leg};
pub use incident::{Absorbed, Config, Connected, DropTally, Incident, Join, Outcome, Side};

use crate::{
    decode::drop_class::DropClass,
    decode::{
        CtSignal, CtSnapshot, DropSignal, FlowKey, Owner, RetransmitSignal, State, StateSignal,
    },
    event,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Connecting,
    Established,
}

#[derive(Debug, Clone)]
struct Attempt {
    key: FlowKey,
    sk: Option<u64>,
    started_ns: u64,
    last_signal_ns: u64,
    owner: Option<Owner>,
    netns: u32,
    phase: Phase,
    syn_retransmits: u32,
    data_retransmits: u32,
    /// snd_una the current run of data retransmits is stuck at, and since when.
    stuck_una: Option<(u32, u64)>,
    drops: Vec<DropTally>,
    ct: Option<CtSnapshot>,
    server_saw_syn: bool,
    reported_in_progress: bool,
    reported_data_stall: bool,
    /// How and when it ended; reported at the next `tick`, after the drop counts the kernel
    /// still holds have been flushed in.
    ended: Option<(Outcome, u64, Option<i32>)>,
    /// Oracle context: the listener leg that redirected here, or the listener's answer.
    oracle: Option<event::Oracle>,
    /// First seen at a SYN retransmit: the SYN itself went out unwatched.
    first_syn_unseen: bool,
}

/// A listener REDIRECT waiting for the client's next connect.
#[derive(Debug, Clone)]
struct ExpectedLeg {
    at_ns: u64,
    oracle: event::Oracle,
}

pub struct Correlator {
    cfg: Config,
    /// By id: ids grow with creation, so the first entry is the oldest.
    attempts: BTreeMap<u64, Attempt>,
    by_key: HashMap<FlowKey, u64>,
    /// The translated tuple of attempts whose conntrack entry shows NAT (client -> pod after
    /// a Service DNAT, node -> server after SNAT): drops of the rewritten packet that carry
    /// no conntrack entry of their own (aggregated repeats) still join the attempt.
    by_nat: HashMap<FlowKey, u64>,
    by_sk: HashMap<u64, u64>,
    /// Attempts whose source port is not known yet, by (client ip, server): the kernel enters
    /// SYN_SENT before connect() picks the port, so the first state record has port 0.
    portless: HashMap<(IpAddr, SocketAddr), Vec<u64>>,
    next_id: u64,
    pub evicted: u64,
    out: Vec<Incident>,
    /// Attempts with `ended` set.
    ended: usize,
    /// Second legs announced by a listener REDIRECT, by (client address, target).
    expected: HashMap<(IpAddr, SocketAddr), ExpectedLeg>,
    /// Flows whose attempt was already reported, with when it ended: an unreplied conntrack
    /// entry outlives its attempt (120 s for SYN_SENT), and its removal then adds nothing.
    reported: HashMap<FlowKey, u64>,
    connected: Vec<Connected>,
}

/// How long a REDIRECT target waits for the client's connect.
const EXPECTED_LEG_NS: u64 = 60_000_000_000;

const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;
const EHOSTUNREACH: i32 = 113;
const ENETUNREACH: i32 = 101;
const EHOSTDOWN: i32 = 112;
const ENETDOWN: i32 = 100;

impl Correlator {
    pub fn new(cfg: Config) -> Self {
        Self {
            cfg,
            attempts: BTreeMap::new(),
            by_key: HashMap::new(),
            by_nat: HashMap::new(),
            by_sk: HashMap::new(),
            portless: HashMap::new(),
            next_id: 1,
            evicted: 0,
            out: Vec::new(),
            ended: 0,
            expected: HashMap::new(),
            reported: HashMap::new(),
            connected: Vec::new(),
        }
    }

    /// Connects that succeeded since the last call.
    pub fn drain_connected(&mut self) -> std::vec::Drain<'_, Connected> {
        self.connected.drain(..)
    }

    pub fn tracked(&self) -> usize {
        self.attempts.len()
    }

    /// Incidents produced since the last call.
    pub fn drain(&mut self) -> std::vec::Drain<'_, Incident> {
        self.out.drain(..)
    }

    fn insert(&mut self, a: Attempt) -> u64 {
        if self.attempts.len() >= self.cfg.capacity
            && let Some((&oldest, _)) = self.attempts.iter().next()
        {
            self.remove(oldest);
            self.evicted += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        if let Some(old) = self.by_key.insert(a.key, id) {
            // A new connect on the same 4-tuple supersedes the old record.
            self.remove(old);
            self.by_key.insert(a.key, id);
        }
        if let Some(sk) = a.sk {
            self.by_sk.insert(sk, id);
        }
        if a.key.src.port() == 0 {
            self.portless
                .entry((a.key.src.ip(), a.key.dst))
                .or_default()
                .push(id);
        }
        let mut a = a;
        if a.oracle.is_none()
            && let Some(leg) = self.expected.get(&(a.key.src.ip(), a.key.dst))
            && a.started_ns.saturating_sub(leg.at_ns) < EXPECTED_LEG_NS
        {
            a.oracle = Some(leg.oracle.clone());
        }
        self.attempts.insert(id, a);
        id
    }

    /// The listener redirected `client` to `target`: the next connect there is the second leg
    /// of the same database session.
    pub fn on_redirect(
        &mut self,
        client: IpAddr,
        target: SocketAddr,
        oracle: event::Oracle,
        ts_ns: u64,
    ) {
        self.expected
            .retain(|_, l| ts_ns.saturating_sub(l.at_ns) < EXPECTED_LEG_NS);
        // The connect may already be under way (its record raced the REDIRECT's).
        for a in self.attempts.values_mut() {
            if a.key.src.ip() == client
                && a.key.dst == target
                && a.started_ns + 1_000_000_000 >= ts_ns
                && a.oracle.is_none()
            {
                a.oracle = Some(oracle.clone());
            }
        }
        self.expected.insert(
            (client, target),
            ExpectedLeg {
                at_ns: ts_ns,
                oracle,
            },
        );
    }

    /// The listener refused the client's CONNECT on `flow` (client -> listener).
    pub fn on_refuse(&mut self, flow: FlowKey, oracle: event::Oracle, ts_ns: u64) {
        let found = self.find(None, &[flow]);
        let (id, mut a) = match found.and_then(|id| self.remove(id).map(|a| (id, a))) {
            Some(x) => x,
            None => {
                let id = self.next_id;
                self.next_id += 1;
                (id, Self::new_attempt(flow, ts_ns, None, 0))
            }
        };
        a.oracle = Some(oracle);
        self.out
            .push(incident(id, &a, Outcome::RefusedByListener, ts_ns, None));
    }

    /// Gives a portless attempt its real source port once a signal shows it.
    fn learn_port(&mut self, id: u64, flow: FlowKey) {
        let Some(a) = self.attempts.get_mut(&id) else {
            return;
        };
        if a.key.src.port() != 0 || flow.src.port() == 0 || a.key.dst != flow.dst {
            return;
        }
        let old = a.key;
        a.key = flow;
        if self.by_key.get(&old) == Some(&id) {
            self.by_key.remove(&old);
        }
        self.by_key.insert(flow, id);
        self.forget_portless(old, id);
    }

    fn forget_portless(&mut self, key: FlowKey, id: u64) {
        let slot = (key.src.ip(), key.dst);
        if let Some(ids) = self.portless.get_mut(&slot) {
            ids.retain(|&x| x != id);
            if ids.is_empty() {
                self.portless.remove(&slot);
            }
        }
    }

    fn remove(&mut self, id: u64) -> Option<Attempt> {
        let a = self.attempts.remove(&id)?;
        if a.key.src.port() != 0 && self.reported.len() < self.cfg.capacity {
            self.reported.insert(a.key, a.last_signal_ns);
        }
        if a.ended.is_some() {
            self.ended -= 1;
        }
        if self.by_key.get(&a.key) == Some(&id) {
            self.by_key.remove(&a.key);
        }
        if let Some(sk) = a.sk
            && self.by_sk.get(&sk) == Some(&id)
        {
            self.by_sk.remove(&sk);
        }
        if a.key.src.port() == 0 {
            self.forget_portless(a.key, id);
        }
        if let Some(t) = translated(&a)
            && self.by_nat.get(&t) == Some(&id)
        {
            self.by_nat.remove(&t);
        }
        Some(a)
    }

    /// Indexes an attempt by its translated tuple once its conntrack entry is known.
    fn index_nat(&mut self, id: u64) {
        if let Some(t) = self.attempts.get(&id).and_then(translated) {
            self.by_nat.insert(t, id);
        }
    }

    /// By socket, then by exact tuple, then the oldest portless attempt between the same
    /// client address and server (which then learns its port from the matching key).
    fn find(&mut self, sk: Option<u64>, keys: &[FlowKey]) -> Option<u64> {
        let found = sk
            .and_then(|sk| self.by_sk.get(&sk).copied())
            .map(|id| (id, keys.first().copied()))
            .or_else(|| {
                keys.iter()
                    .find_map(|k| self.by_key.get(k).map(|&id| (id, Some(*k))))
            })
            .or_else(|| {
                keys.iter()
                    .find_map(|k| self.by_nat.get(k).map(|&id| (id, None)))
            })
            .or_else(|| {
                keys.iter().find_map(|k| {
                    self.portless
                        .get(&(k.src.ip(), k.dst))
                        .and_then(|ids| ids.first())
                        .map(|&id| (id, Some(*k)))
                })
            });
        let (id, key) = found?;
        if let Some(k) = key {
            self.learn_port(id, k);
        }
        Some(id)
    }

    fn new_attempt(key: FlowKey, ts: u64, owner: Option<Owner>, netns: u32) -> Attempt {
        Attempt {
            key,
            sk: None,
            started_ns: ts,
            last_signal_ns: ts,
            owner,
            netns,
            phase: Phase::Connecting,
            syn_retransmits: 0,
            data_retransmits: 0,
            stuck_una: None,
            drops: Vec::new(),
            ct: None,
            server_saw_syn: false,
            reported_in_progress: false,
            reported_data_stall: false,
            ended: None,
            oracle: None,
            first_syn_unseen: false,
        }
    }

    /// Some attempt ended and waits for `tick` to report it.
    pub fn has_ended(&self) -> bool {
        self.ended > 0
    }

    pub fn on_state(&mut self, s: &StateSignal) {
        let (old, new) = (s.old.state, s.new.state);
        match (old, new) {
            (_, State::SynSent) => {
                let mut a = Self::new_attempt(s.flow, s.ts_ns, s.owner.clone(), s.netns);
                a.sk = Some(s.sk);
                self.insert(a);
            }
            (_, State::SynRecv) => {
                // Server side on this node: the SYN arrived.
                if let Some(id) = self.find(None, &[s.flow.reversed()])
                    && let Some(a) = self.attempts.get_mut(&id)
                {
                    a.server_saw_syn = true;
                    a.last_signal_ns = s.ts_ns;
                }
            }
            (State::SynSent, State::Established) => {
                let Some(id) = self.find(Some(s.sk), &[s.flow]) else {
                    return;
                };
                let Some(a) = self.attempts.get_mut(&id) else {
                    return;
                };
                a.last_signal_ns = s.ts_ns;
                // Late only when something was lost on the way: a retransmitted SYN, a
                // dropped packet of the attempt, or a stall already reported.
                if a.syn_retransmits > 0 || !a.drops.is_empty() || a.reported_in_progress {
                    let inc = incident(id, a, Outcome::EstablishedLate, s.ts_ns, None);
                    self.out.push(inc);
                }
                self.connected.push(Connected {
                    id,
                    flow: a.key,
                    side: Side::Client,
                    owner: a.owner.clone(),
                    netns: a.netns,
                    started_ns: a.started_ns,
                    at_ns: s.ts_ns,
                    syn_retransmits: a.syn_retransmits,
                });
                // Keep following it: a later data stall is the redirected-port failure mode.
                a.phase = Phase::Established;
                a.drops.clear();
                a.reported_in_progress = false;
            }
            (State::SynRecv, State::Established) => {
                // Server side on this node: a connection accepted (local end as src).
                let id = self.next_id;
                self.next_id += 1;
                self.connected.push(Connected {
                    id,
                    flow: s.flow.reversed(),
                    side: Side::Server,
                    owner: s.owner.clone(),
                    netns: s.netns,
                    started_ns: s.ts_ns,
                    at_ns: s.ts_ns,
                    syn_retransmits: 0,
                });
            }
            (State::SynSent, State::Close) => {
                let Some(id) = self.find(Some(s.sk), &[s.flow]) else {
                    return;
                };
                let Some(a) = self.attempts.get_mut(&id) else {
                    return;
                };
                if a.ended.is_some() {
                    return;
                }
                a.last_signal_ns = s.ts_ns;
                let outcome = match s.sk_err {
                    ECONNREFUSED => Outcome::Refused,
                    ETIMEDOUT => Outcome::Timeout,
                    EHOSTUNREACH | ENETUNREACH | EHOSTDOWN | ENETDOWN => Outcome::Unreachable,
                    // The application gave up (its own connect timeout): a timeout once the
                    // kernel had to retransmit or something was dropped.
                    _ if a.syn_retransmits > 0 || !a.drops.is_empty() => Outcome::Timeout,
                    _ => Outcome::Abandoned,
                };
                let errno = (s.sk_err != 0).then_some(s.sk_err);
                a.ended = Some((outcome, s.ts_ns, errno));
                self.ended += 1;
            }
            (_, State::Close) | (State::Established, _) => {
                if let Some(id) = self.find(Some(s.sk), &[s.flow])
                    && self
                        .attempts
                        .get(&id)
                        .is_some_and(|a| a.phase == Phase::Established)
                {
                    self.remove(id);
                }
            }
            _ => {}
        }
    }

    pub fn on_retransmit(&mut self, r: &RetransmitSignal) {
        let connecting = r.state.state == State::SynSent;
        let id = match self.find(Some(r.sk), &[r.flow]) {
            Some(id) => id,
            None => {
                // Started before we attached, or before its port was watched without a drop
                // of its first SYN here (a REDIRECT target dialled before droptrace read the
                // REDIRECT: a drop of that SYN is kept by the kernel and starts the attempt):
                // follow it from here, and say that its first SYN was not seen.
                let mut a = Self::new_attempt(r.flow, r.ts_ns, r.owner.clone(), r.netns);
                a.sk = Some(r.sk);
                a.first_syn_unseen = connecting;
                if !connecting {
                    a.phase = Phase::Established;
                }
                self.insert(a)
            }
        };
        let Some(a) = self.attempts.get_mut(&id) else {
            return;
        };
        a.last_signal_ns = r.ts_ns;
        if a.owner.is_none() {
            a.owner = r.owner.clone();
        }
        if a.sk.is_none() {
            // Seen first through a drop of its SYN (a REDIRECT target dialled before it was
            // watched): the socket is this node's, and its states and retransmits follow.
            a.sk = Some(r.sk);
            a.netns = r.netns;
            self.by_sk.insert(r.sk, id);
        }
        if connecting {
            a.syn_retransmits += 1;
            return;
        }
        if a.phase == Phase::Connecting {
            a.phase = Phase::Established;
        }
        match a.stuck_una {
            Some((una, _)) if una == r.snd_una => a.data_retransmits += 1,
            _ => {
                // New unacknowledged data: progress was made since the last run.
                a.stuck_una = Some((r.snd_una, r.ts_ns));
                a.data_retransmits = 1;
                a.reported_data_stall = false;
            }
        }
    }

    /// The keys a drop can join an attempt by: its own tuple either way, and the original
    /// tuple of its conntrack entry (the address the client dialled, before NAT).
    fn drop_keys(d: &DropSignal) -> Vec<FlowKey> {
        let mut keys = vec![d.flow, d.flow.reversed()];
        if let Some(ct) = &d.ct {
            keys.push(ct.original);
            keys.push(ct.original.reversed());
        }
        keys
    }

    /// Whether a socket on this node owns the attempt this drop belongs to.
    pub fn owns_locally(&self, d: &DropSignal) -> bool {
        Self::drop_keys(d).iter().any(|k| {
            let id = self
                .by_key
                .get(k)
                .or_else(|| self.by_nat.get(k))
                .or_else(|| {
                    self.portless
                        .get(&(k.src.ip(), k.dst))
                        .and_then(|ids| ids.first())
                });
            id.and_then(|id| self.attempts.get(id))
                .is_some_and(|a| a.sk.is_some())
        })
    }

    /// A drop of a watched flow. The host's own housekeeping (`local` class: a queue purged
    /// at close, an old segment) belongs to no attempt: it says nothing about a stall.
    pub fn on_drop(&mut self, d: &DropSignal) -> Join {
        if d.class == DropClass::Local || d.flow.is_folded() {
            // Local: not a problem of the attempt. Folded: a storm, no single attempt.
            return Join::None;
        }
        let keys = Self::drop_keys(d);
        let (id, new) = match self.find(None, &keys) {
            Some(id) => (id, false),
            None if d.is_syn() => {
                // A connect we have no socket for (client elsewhere, or routed through here).
                let key = d.ct.as_ref().map(|c| c.original).unwrap_or(d.flow);
                (
                    self.insert(Self::new_attempt(key, d.ts_ns, None, d.netns)),
                    true,
                )
            }
            None => return Join::None,
        };
        let Some(a) = self.attempts.get_mut(&id) else {
            return Join::None;
        };
        a.last_signal_ns = d.ts_ns;
        let learned_ct = a.ct.is_none() && d.ct.is_some();
        if learned_ct {
            a.ct.clone_from(&d.ct);
        }
        let t = DropTally::of(d);
        match a.drops.iter_mut().find(|x| x.same_place(&t)) {
            Some(x) => x.count += t.count,
            None => a.drops.push(t),
        }
        let local = a.sk.is_some();
        if learned_ct {
            self.index_nat(id);
        }
        match (local, new) {
            (true, _) => Join::Local(id),
            (false, true) => Join::NewDropOnly(id),
            (false, false) => Join::DropOnly(id),
        }
    }

    /// Removes the attempts seen only through drops whose server is `server` and that have
    /// not been reported: a storm toward that destination reports them as one.
    pub fn absorb_drop_only(&mut self, server: SocketAddr) -> Vec<Absorbed> {
        let ids: Vec<u64> = self
            .attempts
            .iter()
            .filter(|(_, a)| {
                a.sk.is_none()
                    && a.phase == Phase::Connecting
                    && !a.reported_in_progress
                    && a.ended.is_none()
                    && a.key.dst == server
            })
            .map(|(&id, _)| id)
            .collect();
        ids.into_iter()
            .filter_map(|id| self.remove(id))
            .map(|a| Absorbed {
                client: a.key.src,
                drops: a.drops,
            })
            .collect()
    }

    pub fn on_conntrack(&mut self, c: &CtSignal) {
        let key = c.ct.original;
        if let Some(id) = self.find(None, &[key])
            && let Some(a) = self.attempts.get_mut(&id)
        {
            a.ct = Some(c.ct.clone());
            a.last_signal_ns = c.ts_ns;
            return;
        }
        if self.reported.remove(&key).is_some() {
            return;
        }
        // The attempt is gone (or was never seen): the entry's removal is the only trace.
        let mut a = Self::new_attempt(key, c.ts_ns, None, c.netns);
        a.ct = Some(c.ct.clone());
        let id = self.next_id;
        self.next_id += 1;
        self.out
            .push(incident(id, &a, Outcome::Timeout, c.ts_ns, None));
    }

    /// Time passes: report attempts that ended or stalled, end the ones nothing will end.
    pub fn tick(&mut self, now_ns: u64) {
        let window = self.cfg.max_age_ns;
        self.reported
            .retain(|_, ended| now_ns.saturating_sub(*ended) < window);
        if self.ended > 0 {
            let ended: Vec<u64> = self
                .attempts
                .iter()
                .filter(|(_, a)| a.ended.is_some())
                .map(|(&id, _)| id)
                .collect();
            for id in ended {
                if let Some(a) = self.remove(id)
                    && let Some((outcome, at, errno)) = a.ended
                {
                    self.out.push(incident(id, &a, outcome, at, errno));
                }
            }
        }
        let mut finals = Vec::new();
        for (&id, a) in self.attempts.iter_mut() {
            let idle = now_ns.saturating_sub(a.last_signal_ns);
            match a.phase {
                Phase::Connecting => {
                    if a.sk.is_none() && idle >= self.cfg.idle_final_ns {
                        finals.push((id, Outcome::Timeout));
                    } else if idle >= self.cfg.max_age_ns {
                        finals.push((id, Outcome::Abandoned));
                    } else if !a.reported_in_progress
                        && now_ns.saturating_sub(a.started_ns) >= self.cfg.stall_after_ns
                    {
                        a.reported_in_progress = true;
                        self.out
                            .push(incident(id, a, Outcome::InProgress, now_ns, None));
                    }
                }
                Phase::Established => {
                    if let Some((_, since)) = a.stuck_una
                        && !a.reported_data_stall
                        && a.data_retransmits >= 2
                        && now_ns.saturating_sub(since) >= self.cfg.stall_after_ns
                    {
                        a.reported_data_stall = true;
                        self.out
                            .push(incident(id, a, Outcome::DataStalled, now_ns, None));
                    } else if idle >= self.cfg.max_age_ns {
                        finals.push((id, Outcome::Abandoned));
                    }
                }
            }
        }
        for (id, outcome) in finals {
            if let Some(a) = self.remove(id)
                && a.phase == Phase::Connecting
            {
                self.out.push(incident(id, &a, outcome, now_ns, None));
            }
        }
    }

    /// At exit: report what ended, and every attempt still connecting as in progress.
    pub fn finish(&mut self, now_ns: u64) {
        self.tick(now_ns);
        for (&id, a) in self.attempts.iter_mut() {
            if a.phase == Phase::Connecting && !a.reported_in_progress {
                a.reported_in_progress = true;
                self.out
                    .push(incident(id, a, Outcome::InProgress, now_ns, None));
            }
        }
    }
}

/// The attempt's tuple after NAT (client -> pod behind a Service), when its conntrack entry
/// shows that something was rewritten.
fn translated(a: &Attempt) -> Option<FlowKey> {
    let ct = a.ct.as_ref()?;
    let t = ct.reply.reversed();
    (t != a.key && t != ct.original).then_some(t)
}

fn incident(id: u64, a: &Attempt, outcome: Outcome, at_ns: u64, errno: Option<i32>) -> Incident {
    let mut inc = Incident {
        id,
        flow: a.key,
        owner: a.owner.clone(),
        netns: a.netns,
        started_ns: a.started_ns,
        at_ns,
        syn_retransmits: a.syn_retransmits,
        data_retransmits: a.data_retransmits,
        outcome,
        drops: a.drops.clone(),
        ct: a.ct.clone(),
        diagnosis: String::new(),
        errno,
        oracle: a.oracle.clone(),
        storm: None,
    };
    inc.diagnosis = diagnose(&inc, a.server_saw_syn);
    if let Some(leg) = redirected_leg(&inc) {
        inc.diagnosis = format!("{leg}; {}", inc.diagnosis);
    }
    if a.first_syn_unseen {
        inc.diagnosis.push_str(FIRST_SYN_UNSEEN);
    }
    inc
}

/// Said of an attempt first seen at a SYN retransmit: its counts start there.
pub(crate) const FIRST_SYN_UNSEEN: &str = " (followed from its first SYN retransmit: the first \
     SYN left before droptrace watched this port, and a drop of it is not counted)";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::TcpState;

    const MS: u64 = 1_000_000;

    fn key(src: &str, dst: &str) -> FlowKey {
        FlowKey {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    fn st(name: &str) -> TcpState {
        TcpState::new(0, name.to_string())
    }

    fn owner() -> Owner {
        Owner {
            pid: 4242,
            tgid: 4242,
            comm: "python".into(),
            cgroup_id: 7,
            container_id: None,
            pod_uid: None,
        }
    }

    fn state(ts: u64, sk: u64, flow: FlowKey, old: &str, new: &str, err: i32) -> StateSignal {
        StateSignal {
            ts_ns: ts,
            sk,
            flow,
            old: st(old),
            new: st(new),
            sk_err: err,
            netns: 100,
            owner: Some(owner()),
        }
    }

    fn retrans(ts: u64, sk: u64, flow: FlowKey, state: &str, una: u32) -> RetransmitSignal {
        RetransmitSignal {
            ts_ns: ts,
            sk,
            flow,
            state: st(state),
            snd_una: una,
            netns: 100,
            owner: None,
        }
    }

    fn drop_(ts: u64, flow: FlowKey, flags: u8, reason: &str) -> DropSignal {
        crate::decode::testing::drop(ts, flow, flags, reason)
    }

    fn cfg() -> Config {
        Config::default()
    }

    #[test]
    fn syn_dropped_by_netfilter_then_app_timeout_is_one_timeout_incident() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, f, "CLOSE", "SYN_SENT", 0));
        c.on_drop(&drop_(1, f, 0x02, "NETFILTER_DROP"));
        c.on_retransmit(&retrans(1000 * MS, 1, f, "SYN_SENT", 0));
        c.on_drop(&drop_(1000 * MS, f, 0x02, "NETFILTER_DROP"));
        c.on_retransmit(&retrans(2000 * MS, 1, f, "SYN_SENT", 0));
        c.on_drop(&drop_(2000 * MS, f, 0x02, "NETFILTER_DROP"));
        c.tick(2500 * MS);
        assert_eq!(c.drain().count(), 0, "nothing before --stall-after");
        c.on_state(&state(2900 * MS, 1, f, "SYN_SENT", "CLOSE", 0));
        // Reported at the next tick, once the kernel's drop counts are flushed in.
        c.on_drop(&drop_(2950 * MS, f, 0x02, "NETFILTER_DROP"));
        c.tick(2960 * MS);
        let out: Vec<_> = c.drain().collect();
        assert_eq!(out.len(), 1);
        let i = &out[0];
        assert_eq!(i.outcome, Outcome::Timeout);
        assert_eq!(i.syn_retransmits, 2);
        assert_eq!(i.owner.as_ref().unwrap().comm, "python");
        assert_eq!(i.drops.len(), 1);
        assert_eq!(i.drops[0].count, 4);
        assert_eq!(
            i.diagnosis,
            "SYN to 198.51.100.7:1521 dropped 4 times on this node by netfilter \
             (NETFILTER_DROP at nft_do_chain) in netns 200"
        );
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn connect_first_seen_at_a_syn_retransmit_says_its_first_syn_is_not_counted() {
        // A REDIRECT target the client dialled before the port was watched: the state change
        // and the first SYN's drop went by unseen; its retransmits are the first signals.
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:40123");
        c.on_retransmit(&retrans(1000 * MS, 1, f, "SYN_SENT", 0));
        c.on_drop(&drop_(1000 * MS, f, 0x02, "NETFILTER_DROP"));
        c.on_retransmit(&retrans(3000 * MS, 1, f, "SYN_SENT", 0));
        c.on_drop(&drop_(3000 * MS, f, 0x02, "NETFILTER_DROP"));
        c.on_state(&state(4000 * MS, 1, f, "SYN_SENT", "CLOSE", 110));
        c.tick(4100 * MS);
        let out: Vec<_> = c.drain().collect();
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].syn_retransmits, 2);
        assert_eq!(out[0].drops[0].count, 2);
        assert!(
            out[0].diagnosis.ends_with(FIRST_SYN_UNSEEN),
            "{}",
            out[0].diagnosis
        );
    }

    #[test]
    fn in_progress_after_stall_after_then_final_update_with_same_id() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, f, "CLOSE", "SYN_SENT", 0));
        c.on_retransmit(&retrans(1000 * MS, 1, f, "SYN_SENT", 0));
        c.tick(3000 * MS);
        let first: Vec<_> = c.drain().collect();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].outcome, Outcome::InProgress);
        c.tick(4000 * MS);
        assert_eq!(c.drain().count(), 0, "reported once");
        c.on_state(&state(7000 * MS, 1, f, "SYN_SENT", "CLOSE", ETIMEDOUT));
        c.tick(7001 * MS);
        let last: Vec<_> = c.drain().collect();
        assert_eq!(last[0].outcome, Outcome::Timeout);
        assert_eq!(last[0].id, first[0].id);
        assert!(
            last[0]
                .diagnosis
                .starts_with("no drop seen on this node; SYN unanswered after 1 retransmit")
        );
    }

    #[test]
    fn rst_is_refused_not_dropped() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, f, "CLOSE", "SYN_SENT", 0));
        // The server's stack discards the SYN (no socket) and answers RST.
        c.on_drop(&drop_(1, f, 0x02, "NO_SOCKET"));
        c.on_state(&state(2, 1, f, "SYN_SENT", "CLOSE", ECONNREFUSED));
        c.tick(3);
        let i = c.drain().next().unwrap();
        assert_eq!(i.outcome, Outcome::Refused);
        assert!(
            i.diagnosis.contains("the port is closed, not dropped"),
            "{}",
            i.diagnosis
        );
    }

    #[test]
    fn icmp_error_is_unreachable() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, f, "CLOSE", "SYN_SENT", 0));
        c.on_state(&state(5, 1, f, "SYN_SENT", "CLOSE", EHOSTUNREACH));
        c.tick(6);
        assert_eq!(c.drain().next().unwrap().outcome, Outcome::Unreachable);
    }

    #[test]
    fn clean_connect_reports_nothing_late_connect_reports_established_late() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, f, "CLOSE", "SYN_SENT", 0));
        c.on_state(&state(1, 1, f, "SYN_SENT", "ESTABLISHED", 0));
        assert_eq!(c.drain().count(), 0);

        let g = key("10.0.0.1:40001", "198.51.100.7:1521");
        c.on_state(&state(0, 2, g, "CLOSE", "SYN_SENT", 0));
        c.on_retransmit(&retrans(MS * 1000, 2, g, "SYN_SENT", 0));
        c.on_state(&state(MS * 1100, 2, g, "SYN_SENT", "ESTABLISHED", 0));
        let i = c.drain().next().unwrap();
        assert_eq!(i.outcome, Outcome::EstablishedLate);
        assert!(i.diagnosis.starts_with("connected after 1 retransmit"));
    }

    #[test]
    fn dnat_drop_joins_the_attempt_through_the_conntrack_original_tuple() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "10.96.0.10:1521");
        c.on_state(&state(0, 1, f, "CLOSE", "SYN_SENT", 0));
        let mut d = drop_(
            1,
            key("10.0.0.1:40000", "10.244.1.5:1521"),
            0x02,
            "NETFILTER_DROP",
        );
        d.ct = Some(CtSnapshot {
            state: "NEW".into(),
            status: vec!["DNAT".into()],
            original: f,
            reply: key("10.244.1.5:1521", "10.0.0.1:40000"),
            mark: 0,
            zone: 0,
        });
        c.on_drop(&d);
        c.on_state(&state(5, 1, f, "SYN_SENT", "CLOSE", 0));
        c.tick(6);
        let i = c.drain().next().unwrap();
        assert_eq!(i.flow, f);
        assert!(
            i.diagnosis
                .starts_with("SYN to 10.96.0.10:1521 (DNAT to 10.244.1.5:1521) dropped once"),
            "{}",
            i.diagnosis
        );
        assert_eq!(i.ct.unwrap().nat(), "dnat");
    }

    #[test]
    fn established_flow_with_unacked_retransmits_is_data_stalled_once() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, f, "CLOSE", "SYN_SENT", 0));
        c.on_state(&state(1, 1, f, "SYN_SENT", "ESTABLISHED", 0));
        for (i, t) in [200, 600, 1400, 3000].iter().enumerate() {
            c.on_retransmit(&retrans(t * MS + 10 * MS, 1, f, "ESTABLISHED", 5000));
            c.on_drop(&drop_(t * MS + 10 * MS, f, 0x18, "NETFILTER_DROP"));
            c.tick(t * MS + 20 * MS);
            assert_eq!(c.drain().count(), 0, "retransmit {i}: not yet stalled");
        }
        c.tick(3300 * MS);
        let i = c.drain().next().expect("data stall reported");
        assert_eq!(i.outcome, Outcome::DataStalled);
        assert_eq!(i.data_retransmits, 4);
        assert!(
            i.diagnosis
                .contains("data to 198.51.100.7:1521 dropped 4 times"),
            "{}",
            i.diagnosis
        );
        c.tick(9000 * MS);
        assert_eq!(c.drain().count(), 0, "reported once");
    }

    #[test]
    fn acknowledged_progress_resets_the_stall_clock() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_retransmit(&retrans(0, 1, f, "ESTABLISHED", 100));
        c.on_retransmit(&retrans(2000 * MS, 1, f, "ESTABLISHED", 100));
        c.on_retransmit(&retrans(2900 * MS, 1, f, "ESTABLISHED", 900));
        c.tick(3500 * MS);
        assert_eq!(c.drain().count(), 0);
    }

    #[test]
    fn syn_drop_without_a_local_socket_ends_after_silence() {
        let mut c = Correlator::new(cfg());
        let f = key("10.9.0.1:40000", "198.51.100.7:1521");
        c.on_drop(&drop_(0, f, 0x02, "TC_INGRESS"));
        c.on_drop(&drop_(1000 * MS, f, 0x02, "TC_INGRESS"));
        c.tick(3000 * MS);
        assert_eq!(c.drain().next().unwrap().outcome, Outcome::InProgress);
        c.tick(11_001 * MS);
        let i = c.drain().next().unwrap();
        assert_eq!(i.outcome, Outcome::Timeout);
        assert!(i.owner.is_none());
        assert!(
            i.diagnosis
                .contains("by a tc filter (TC_INGRESS at nft_do_chain)")
        );
        assert_eq!(c.tracked(), 0);
    }

    fn unreplied_removal(ts_ns: u64, f: FlowKey) -> CtSignal {
        CtSignal {
            ts_ns,
            netns: 300,
            ct: CtSnapshot {
                state: "UNREPLIED".into(),
                status: vec!["CONFIRMED".into()],
                original: f,
                reply: f.reversed(),
                mark: 0,
                zone: 0,
            },
        }
    }

    #[test]
    fn conntrack_removal_without_an_attempt_is_its_own_incident() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_conntrack(&unreplied_removal(5, f));
        let i = c.drain().next().unwrap();
        assert_eq!(i.outcome, Outcome::Timeout);
        assert!(
            i.diagnosis.contains("expired without a reply"),
            "{}",
            i.diagnosis
        );
    }

    #[test]
    fn conntrack_removal_after_the_reported_attempt_adds_nothing() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, f, "CLOSE", "SYN_SENT", 0));
        c.on_drop(&drop_(1, f, 0x02, "NETFILTER_DROP"));
        c.on_state(&state(3000 * MS, 1, f, "SYN_SENT", "CLOSE", ETIMEDOUT));
        c.tick(3001 * MS);
        assert_eq!(c.drain().next().unwrap().outcome, Outcome::Timeout);
        // The SYN_SENT entry expires two minutes later.
        c.on_conntrack(&unreplied_removal(123_000 * MS, f));
        assert_eq!(c.drain().count(), 0, "the attempt was reported already");
    }

    #[test]
    fn syn_sent_without_a_port_learns_it_from_the_first_drop() {
        // connect() enters SYN_SENT before the source port is chosen.
        let mut c = Correlator::new(cfg());
        let portless = key("10.0.0.1:0", "198.51.100.7:1521");
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, portless, "CLOSE", "SYN_SENT", 0));
        c.on_drop(&drop_(1, f, 0x02, "NETFILTER_DROP"));
        c.on_retransmit(&retrans(1000 * MS, 1, f, "SYN_SENT", 0));
        c.on_drop(&drop_(1000 * MS, f, 0x02, "NETFILTER_DROP"));
        c.on_state(&state(2000 * MS, 1, f, "SYN_SENT", "CLOSE", 0));
        c.tick(2001 * MS);
        let out: Vec<_> = c.drain().collect();
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].flow, f);
        assert_eq!(out[0].drops[0].count, 2);
        assert!(c.portless.is_empty() && c.by_key.is_empty());
    }

    #[test]
    fn established_flow_learns_its_port_from_the_state_change() {
        let mut c = Correlator::new(cfg());
        let portless = key("10.0.0.1:0", "198.51.100.7:1521");
        let f = key("10.0.0.1:40000", "198.51.100.7:1521");
        c.on_state(&state(0, 1, portless, "CLOSE", "SYN_SENT", 0));
        c.on_state(&state(1, 1, f, "SYN_SENT", "ESTABLISHED", 0));
        c.on_retransmit(&retrans(100 * MS, 1, f, "ESTABLISHED", 9));
        c.on_drop(&drop_(100 * MS, f, 0x18, "NETFILTER_DROP"));
        c.on_retransmit(&retrans(400 * MS, 1, f, "ESTABLISHED", 9));
        c.tick(3500 * MS);
        let i = c.drain().next().unwrap();
        assert_eq!(i.outcome, Outcome::DataStalled);
        assert_eq!(i.flow, f);
        assert_eq!(i.drops.len(), 1);
    }

    #[test]
    fn storm_aggregates_with_the_client_end_folded_join_no_attempt() {
        let mut c = Correlator::new(cfg());
        let portless = key("10.0.0.1:0", "198.51.100.7:1521");
        c.on_state(&state(0, 1, portless, "CLOSE", "SYN_SENT", 0));
        // The kernel folded the client end away (address and port): a storm, no attempt.
        assert_eq!(
            c.on_drop(&drop_(
                1,
                key("0.0.0.0:0", "198.51.100.7:1521"),
                0x02,
                "NETFILTER_DROP",
            )),
            Join::None
        );
        assert_eq!(c.tracked(), 1);
        assert!(
            c.portless
                .contains_key(&("10.0.0.1".parse().unwrap(), portless.dst))
        );
    }

    fn oracle_redirect(listener: &str, host: &str, port: u16) -> event::Oracle {
        let l: SocketAddr = listener.parse().unwrap();
        event::Oracle {
            packet: Some("REDIRECT".into()),
            service_name: Some("ORCLPDB1".into()),
            program: Some("sqlplus".into()),
            listener: Some(event::Listener {
                ip: l.ip(),
                port: l.port(),
            }),
            redirect: Some(event::HostPort {
                host: host.into(),
                port,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn second_leg_after_a_redirect_is_linked_to_the_listener() {
        let mut c = Correlator::new(cfg());
        let target: SocketAddr = "10.0.0.9:40123".parse().unwrap();
        c.on_redirect(
            "10.0.0.1".parse().unwrap(),
            target,
            oracle_redirect("10.0.0.2:1521", "10.0.0.9", 40123),
            0,
        );
        let portless = key("10.0.0.1:0", "10.0.0.9:40123");
        let f = key("10.0.0.1:41000", "10.0.0.9:40123");
        c.on_state(&state(MS, 1, portless, "CLOSE", "SYN_SENT", 0));
        c.on_drop(&drop_(2 * MS, f, 0x02, "NETFILTER_DROP"));
        c.on_state(&state(3000 * MS, 1, f, "SYN_SENT", "CLOSE", 0));
        c.tick(3001 * MS);
        let i = c.drain().next().unwrap();
        assert_eq!(i.outcome, Outcome::Timeout);
        assert_eq!(
            i.diagnosis,
            "listener 10.0.0.2:1521 redirected sqlplus to 10.0.0.9:40123; that leg's SYN to \
             10.0.0.9:40123 dropped once on this node by netfilter (NETFILTER_DROP at \
             nft_do_chain) in netns 200"
        );
        assert_eq!(i.oracle.unwrap().redirect.unwrap().port, 40123);
    }

    #[test]
    fn listener_refuse_is_its_own_outcome_not_a_drop() {
        let mut c = Correlator::new(cfg());
        let f = key("10.0.0.1:41000", "10.0.0.2:1521");
        c.on_state(&state(
            0,
            1,
            key("10.0.0.1:0", "10.0.0.2:1521"),
            "CLOSE",
            "SYN_SENT",
            0,
        ));
        c.on_state(&state(MS, 1, f, "SYN_SENT", "ESTABLISHED", 0));
        let mut o = oracle_redirect("10.0.0.2:1521", "x", 1);
        o.redirect = None;
        o.packet = Some("REFUSE".into());
        o.refuse = Some(event::Refuse {
            code: Some(12514),
            text: "(DESCRIPTION=(ERR=12514))".into(),
        });
        c.on_refuse(f, o, 2 * MS);
        let i = c.drain().next().unwrap();
        assert_eq!(i.outcome, Outcome::RefusedByListener);
        assert!(i.owner.is_some(), "the listener leg's process");
        assert_eq!(
            i.diagnosis,
            "listener refused: ORA-12514 service ORCLPDB1 not registered (listener \
             10.0.0.2:1521); a listener answer, not a network drop"
        );
        assert_eq!(c.tracked(), 0);
    }

    #[test]
    fn table_is_bounded_and_counts_evictions() {
        let mut c = Correlator::new(Config {
            capacity: 100,
            ..cfg()
        });
        for p in 0..1000u16 {
            let f = key(&format!("10.0.0.1:{}", 10000 + p), "198.51.100.7:1521");
            c.on_state(&state(
                u64::from(p),
                u64::from(p) + 1,
                f,
                "CLOSE",
                "SYN_SENT",
                0,
            ));
        }
        assert_eq!(c.tracked(), 100);
        assert_eq!(c.evicted, 900);
        assert!(c.by_sk.len() <= 100 && c.by_key.len() <= 100);
    }
}
