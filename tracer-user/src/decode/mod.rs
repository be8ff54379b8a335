//! Decoded kernel records: the "decode" stage's output and the correlator's input. Numbers are
//! already names here (drop reasons, TCP states, conntrack bits), resolved from this kernel.
pub mod cgroup;
pub mod drop_class;
pub mod oracle;
pub mod process;

use std::net::{IpAddr, SocketAddr};

/// A connection's two ends, as one side sees it (src = that side).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

impl FlowKey {
    pub fn reversed(self) -> Self {
        Self {
            src: self.dst,
            dst: self.src,
        }
    }

    /// One end is unspecified (address and port zero): the kernel folded a storm of flows
    /// into one record per destination.
    pub fn is_folded(&self) -> bool {
        let unspecified = |a: SocketAddr| a.ip().is_unspecified() && a.port() == 0;
        unspecified(self.src) || unspecified(self.dst)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub pid: u32,
    pub tgid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    /// From the process's cgroup path when it runs in a container (filled by the daemon).
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
}

/// The TCP states droptrace reasons about, from the kernel's names (their numbers come from
/// the running kernel's tracepoint table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Established,
    SynSent,
    SynRecv,
    FinWait1,
    FinWait2,
    TimeWait,
    Close,
    CloseWait,
    LastAck,
    Listen,
    Closing,
    NewSynRecv,
    /// A state this table does not know (a newer kernel's).
    Other,
}

impl State {
    /// From the kernel's name without `TCP_` ("SYN_SENT").
    pub fn from_name(name: &str) -> Self {
        match name {
            "ESTABLISHED" => State::Established,
            "SYN_SENT" => State::SynSent,
            "SYN_RECV" => State::SynRecv,
            "FIN_WAIT1" => State::FinWait1,
            "FIN_WAIT2" => State::FinWait2,
            "TIME_WAIT" => State::TimeWait,
            "CLOSE" => State::Close,
            "CLOSE_WAIT" => State::CloseWait,
            "LAST_ACK" => State::LastAck,
            "LISTEN" => State::Listen,
            "CLOSING" => State::Closing,
            "NEW_SYN_RECV" => State::NewSynRecv,
            _ => State::Other,
        }
    }
}

/// A TCP state number with this kernel's name for it ("SYN_SENT", ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpState {
    pub value: u32,
    /// The kernel's name, as events write it.
    pub name: String,
    pub state: State,
}

impl TcpState {
    pub fn new(value: u32, name: String) -> Self {
        Self {
            value,
            state: State::from_name(&name),
            name,
        }
    }
}

/// The TCP flags byte of a packet (CWR ECE URG ACK PSH RST SYN FIN, FIN = bit 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct TcpFlags(pub u8);

impl TcpFlags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
    /// Wire bit order names (FIN is bit 0).
    const NAMES: [&str; 8] = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];

    /// A connection request: SYN without ACK.
    pub fn is_syn(self) -> bool {
        self.0 & Self::SYN != 0 && self.0 & Self::ACK == 0
    }

    pub fn is_syn_ack(self) -> bool {
        self.0 & (Self::SYN | Self::ACK) == Self::SYN | Self::ACK
    }

    /// "SYN", "SYN|ACK", ... in a fixed, readable order (SYN first); "" when none.
    pub fn names(self) -> String {
        const ORDER: [usize; 8] = [1, 4, 0, 2, 3, 5, 6, 7];
        let mut out = String::new();
        for i in ORDER {
            if self.0 & (1 << i) != 0 {
                if !out.is_empty() {
                    out.push('|');
                }
                out.push_str(Self::NAMES[i]);
            }
        }
        out
    }

    /// From "SYN|ACK" (unknown names are ignored).
    pub fn parse(names: &str) -> Self {
        Self(
            names
                .split('|')
                .filter_map(|f| Self::NAMES.iter().position(|n| *n == f))
                .fold(0, |acc, bit| acc | (1 << bit)),
        )
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl From<&str> for TcpFlags {
    fn from(names: &str) -> Self {
        Self::parse(names)
    }
}

impl std::fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.names())
    }
}

/// In events, flags are their names joined by '|' ("SYN|ACK"; "" when none), the wire
/// format of droptrace.v1; in memory they stay the flags byte.
impl serde::Serialize for TcpFlags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.names())
    }
}

impl<'de> serde::Deserialize<'de> for TcpFlags {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let names = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Ok(Self::parse(&names))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtSnapshot {
    /// NEW, ESTABLISHED, RELATED, UNTRACKED (from the skb's ctinfo), or for removals UNREPLIED.
    pub state: String,
    pub status: Vec<String>,
    pub original: FlowKey,
    pub reply: FlowKey,
    pub mark: u32,
    pub zone: u16,
}

impl CtSnapshot {
    /// "dnat", "snat", "both" or "none": what the reply tuple says was rewritten.
    pub fn nat(&self) -> &'static str {
        let dnat = self.original.dst != self.reply.src;
        let snat = self.original.src != self.reply.dst;
        match (dnat, snat) {
            (true, true) => "both",
            (true, false) => "dnat",
            (false, true) => "snat",
            (false, false) => "none",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DropSignal {
    pub ts_ns: u64,
    pub flow: FlowKey,
    pub tcp_flags: TcpFlags,
    /// The kernel's name without SKB_DROP_REASON_, or `UNAVAILABLE` before Linux 5.17.
    pub reason: String,
    /// This kernel's number for it (None where the kernel has no reasons).
    pub reason_code: Option<u32>,
    pub class: crate::decode::drop_class::DropClass,
    pub location: String,
    pub netns: u32,
    pub ifindex: u32,
    pub count: u64,
    pub ct: Option<CtSnapshot>,
    /// Kept by the kernel only because it is a SYN from a client a watched listener had just
    /// REDIRECTed, to a port not watched yet: a drop of the redirected leg when it goes to the
    /// REDIRECT's target (learned from the REDIRECT, earlier in the ring buffer), otherwise
    /// not of a watched flow.
    pub redirected: bool,
}

impl DropSignal {
    pub fn is_syn(&self) -> bool {
        self.tcp_flags.is_syn()
    }

    pub fn is_syn_ack(&self) -> bool {
        self.tcp_flags.is_syn_ack()
    }
}

#[derive(Debug, Clone)]
pub struct StateSignal {
    pub ts_ns: u64,
    pub sk: u64,
    /// Local end as src.
    pub flow: FlowKey,
    pub old: TcpState,
    pub new: TcpState,
    pub sk_err: i32,
    pub netns: u32,
    pub owner: Option<Owner>,
}

#[derive(Debug, Clone)]
pub struct RetransmitSignal {
    pub ts_ns: u64,
    pub sk: u64,
    /// Local end as src.
    pub flow: FlowKey,
    pub state: TcpState,
    pub snd_una: u32,
    pub netns: u32,
    pub owner: Option<Owner>,
}

#[derive(Debug, Clone)]
pub struct CtSignal {
    pub ts_ns: u64,
    pub ct: CtSnapshot,
    pub netns: u32,
}

pub fn ip(family: u8, addr: &[u8; 16]) -> IpAddr {
    if family == tracer_common::AF_INET6 {
        IpAddr::from(*addr)
    } else {
        IpAddr::from([addr[0], addr[1], addr[2], addr[3]])
    }
}

pub fn flow_key(f: &tracer_common::Flow) -> FlowKey {
    FlowKey {
        src: SocketAddr::new(ip(f.family, &f.saddr), f.sport),
        dst: SocketAddr::new(ip(f.family, &f.daddr), f.dport),
    }
}

pub fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Builders for tests: one place for every module's synthetic signals.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn key(src: &str, dst: &str) -> FlowKey {
        FlowKey {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    /// A drop of `flow` for `reason` (classed as the kernel's table says) at nft_do_chain.
    pub(crate) fn drop(ts: u64, flow: FlowKey, flags: u8, reason: &str) -> DropSignal {
        let location = "nft_do_chain+0x46f";
        DropSignal {
            ts_ns: ts,
            flow,
            tcp_flags: TcpFlags(flags),
            reason: reason.into(),
            reason_code: Some(12),
            class: crate::decode::drop_class::classify(Some(reason), location),
            location: location.into(),
            netns: 200,
            ifindex: 2,
            count: 1,
            ct: None,
            redirected: false,
        }
    }
}
