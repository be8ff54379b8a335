//! What the flow table hands out: incidents (one per attempt that went wrong), successful
//! connects, where a drop joined, and the table's configuration. Plain data: the state
//! machine that fills them is in `mod.rs`, their words in `diagnosis.rs`.
use std::net::SocketAddr;

use crate::{
    decode::drop_class::DropClass,
    decode::{CtSnapshot, DropSignal, FlowKey, Owner},
    event,
};

#[derive(Debug, Clone)]
pub struct Config {
    /// Report an attempt still connecting after this long (and a stuck established flow).
    pub stall_after_ns: u64,
    /// Attempts seen only through drops (no local socket) end after this much silence.
    pub idle_final_ns: u64,
    /// Forget attempts with no signal for this long (their close was not seen).
    pub max_age_ns: u64,
    /// Bound on tracked attempts; the oldest is evicted (and counted) beyond it.
    pub capacity: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            stall_after_ns: 3_000_000_000,
            idle_final_ns: 10_000_000_000,
            max_age_ns: 600_000_000_000,
            capacity: 65_536,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// SYNs unanswered until the kernel (ETIMEDOUT) or the application gave up.
    Timeout,
    /// RST: nothing listening.
    Refused,
    /// ICMP unreachable.
    Unreachable,
    /// Connected, but only after retransmits or drops.
    EstablishedLate,
    /// The application closed the connect before any retransmit.
    Abandoned,
    /// An established flow's data retransmits stopped being acknowledged.
    DataStalled,
    /// Still connecting after --stall-after; a final record follows.
    InProgress,
    /// The Oracle listener answered with REFUSE: a listener answer, not a network drop.
    RefusedByListener,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Timeout => "timeout",
            Outcome::Refused => "refused",
            Outcome::Unreachable => "unreachable",
            Outcome::EstablishedLate => "established_late",
            Outcome::Abandoned => "abandoned",
            Outcome::DataStalled => "data_stalled",
            Outcome::InProgress => "in_progress",
            Outcome::RefusedByListener => "refused_by_listener",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DropTally {
    pub reason: String,
    pub class: DropClass,
    pub location: String,
    pub netns: u32,
    pub count: u64,
    /// What was dropped: "SYN", "SYN-ACK" or "data".
    pub packet: &'static str,
    /// The dropped packet's tuple (after NAT when it was rewritten).
    pub flow: FlowKey,
}

impl DropTally {
    pub fn of(d: &DropSignal) -> Self {
        Self {
            reason: d.reason.clone(),
            class: d.class,
            location: d.location.clone(),
            netns: d.netns,
            count: d.count,
            packet: if d.is_syn() {
                "SYN"
            } else if d.is_syn_ack() {
                "SYN-ACK"
            } else {
                "data"
            },
            flow: d.flow,
        }
    }

    /// Same reason, place and kind of packet: counted together.
    pub fn same_place(&self, o: &DropTally) -> bool {
        self.reason == o.reason
            && self.location == o.location
            && self.netns == o.netns
            && self.packet == o.packet
    }
}

/// One record to emit.
#[derive(Debug, Clone)]
pub struct Incident {
    pub id: u64,
    /// Client view, before NAT: src = client, dst = the address it connected to.
    pub flow: FlowKey,
    pub owner: Option<Owner>,
    pub netns: u32,
    pub started_ns: u64,
    pub at_ns: u64,
    pub syn_retransmits: u32,
    pub data_retransmits: u32,
    pub outcome: Outcome,
    pub drops: Vec<DropTally>,
    pub ct: Option<CtSnapshot>,
    pub diagnosis: String,
    /// sk_err at the end, when the kernel gave one.
    pub errno: Option<i32>,
    pub oracle: Option<event::Oracle>,
    /// A storm toward the same destination this attempt ran into (set by the pipeline).
    pub storm: Option<u64>,
}

/// A connect that succeeded (for `--emit connects`): client view, src = client.
#[derive(Debug, Clone)]
pub struct Connected {
    pub id: u64,
    pub flow: FlowKey,
    /// Which end of the connection is on this node.
    pub side: Side,
    pub owner: Option<Owner>,
    pub netns: u32,
    pub started_ns: u64,
    pub at_ns: u64,
    pub syn_retransmits: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// Where a drop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// Into the attempt of a socket on this node.
    Local(u64),
    /// Into an attempt seen only through drops (client elsewhere, or routed through here).
    DropOnly(u64),
    /// Into a new attempt seen only through drops: its first SYN.
    NewDropOnly(u64),
    /// Into nothing: not a packet of a tracked attempt, or the host's own housekeeping.
    None,
}

/// What an attempt seen only through drops left when a storm took it over.
#[derive(Debug, Clone)]
pub struct Absorbed {
    pub client: SocketAddr,
    pub drops: Vec<DropTally>,
}
