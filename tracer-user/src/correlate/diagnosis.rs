//! The diagnosis: one sentence that says what happened to an attempt, from its outcome, its
//! drops, its conntrack entry and its Oracle context. Text only; the state machine is in
//! the parent module.
use std::net::SocketAddr;

use super::{DropTally, Incident, Outcome};

/// "listener 10.0.0.2:1521 redirected sqlplus to 10.0.0.9:40123" for a second leg.
pub(super) fn redirected_leg(inc: &Incident) -> Option<String> {
    let o = inc.oracle.as_ref()?;
    let r = o.redirect.as_ref()?;
    if inc.outcome == Outcome::RefusedByListener {
        return None;
    }
    let l = o.listener.as_ref()?;
    let who = o.program.as_deref().unwrap_or("the client");
    Some(format!(
        "listener {} redirected {who} to {}",
        SocketAddr::new(l.ip, l.port),
        if r.host.contains(':') {
            format!("[{}]:{}", r.host, r.port)
        } else {
            format!("{}:{}", r.host, r.port)
        }
    ))
}

/// Functions that free what a netfilter rule dropped.
const NETFILTER_FUNCTIONS: [&str; 3] = ["nf_hook_slow", "nft_do_chain", "ipt_do_table"];

/// What dropped it, in words: "netfilter (NETFILTER_DROP at nf_hook_slow)". Where the kernel
/// gives no reason (before 5.17: UNAVAILABLE), the dropping function still names netfilter.
fn mechanism(t: &DropTally) -> String {
    let func = t.location.split('+').next().unwrap_or(&t.location);
    let by = match t.reason.as_str() {
        "NETFILTER_DROP" => "netfilter",
        "TC_INGRESS" | "TC_EGRESS" => "a tc filter",
        "NO_SOCKET" => "the TCP stack (no socket)",
        "XDP" => "an XDP program",
        r if r.starts_with("QDISC") => "a qdisc",
        r if r.starts_with("NEIGH") => "neighbour resolution",
        crate::decode::drop_class::UNAVAILABLE | "NOT_SPECIFIED"
            if NETFILTER_FUNCTIONS.contains(&func) =>
        {
            "netfilter"
        }
        _ => "the kernel",
    };
    format!("{by} ({} at {func})", t.reason)
}

fn times(n: u64) -> String {
    if n == 1 {
        "once".into()
    } else {
        format!("{n} times")
    }
}

fn target(inc: &Incident) -> String {
    let dst = inc.flow.dst;
    match &inc.ct {
        Some(ct) if ct.nat() == "dnat" || ct.nat() == "both" => {
            format!("{dst} (DNAT to {})", ct.reply.src)
        }
        _ => dst.to_string(),
    }
}

fn drop_clause(inc: &Incident) -> Option<String> {
    if inc.drops.is_empty() {
        return None;
    }
    let parts: Vec<String> = inc
        .drops
        .iter()
        .map(|t| {
            let what = match t.packet {
                "SYN" if inc.oracle.as_ref().is_some_and(|o| o.redirect.is_some()) => {
                    format!("that leg's SYN to {}", target(inc))
                }
                "SYN" => format!("SYN to {}", target(inc)),
                "SYN-ACK" => format!("SYN-ACK from {}", t.flow.src),
                _ => format!("data to {}", t.flow.dst),
            };
            format!(
                "{what} dropped {} on this node by {} in netns {}",
                times(t.count),
                mechanism(t),
                t.netns
            )
        })
        .collect();
    Some(parts.join("; "))
}

fn retransmits(n: u32) -> String {
    match n {
        0 => "no retransmit".into(),
        1 => "1 retransmit".into(),
        n => format!("{n} retransmits"),
    }
}

pub(super) fn diagnose(inc: &Incident, server_saw_syn: bool) -> String {
    let dst = target(inc);
    let drops = drop_clause(inc);
    match inc.outcome {
        Outcome::RefusedByListener => {
            let o = inc.oracle.as_ref();
            let refuse = o.and_then(|o| o.refuse.as_ref());
            let code = refuse.and_then(|r| r.code);
            let what = match (code, o) {
                (Some(12514), Some(o)) => format!(
                    "service {} not registered",
                    o.service_name.as_deref().unwrap_or("(unnamed)")
                ),
                (Some(12505), Some(o)) => {
                    format!("SID {} not known", o.sid.as_deref().unwrap_or("(unnamed)"))
                }
                (Some(c), _) => crate::decode::oracle::descriptor::tns_error_text(c)
                    .unwrap_or("refused")
                    .to_string(),
                (None, _) => refuse.map(|r| r.text.clone()).unwrap_or_default(),
            };
            let ora = code.map(|c| format!("ORA-{c} ")).unwrap_or_default();
            format!(
                "listener refused: {ora}{what} (listener {}); a listener answer, not a network drop",
                inc.flow.dst
            )
        }
        Outcome::Refused => format!(
            "connection refused: {dst} answered with RST, nothing listens on that port; \
             the port is closed, not dropped"
        ),
        Outcome::Unreachable => format!(
            "{dst} unreachable (ICMP error {}): a router or firewall rejected the SYN",
            inc.errno.unwrap_or(0)
        ),
        Outcome::Abandoned => format!(
            "the client gave up on {dst} before any retransmit; nothing dropped on this node"
        ),
        Outcome::EstablishedLate => match drops {
            Some(d) => format!("connected after {}: {d}", retransmits(inc.syn_retransmits)),
            None => format!(
                "connected after {} with no drop seen on this node: loss on the path",
                retransmits(inc.syn_retransmits)
            ),
        },
        Outcome::DataStalled => {
            let stuck = format!(
                "established flow to {} stopped making progress: {} unacknowledged",
                inc.flow.dst,
                retransmits(inc.data_retransmits)
            );
            match drops {
                Some(d) => format!("{stuck}; {d}"),
                None => format!(
                    "{stuck}; no drop seen on this node: suspect a policy on the destination node or the path"
                ),
            }
        }
        Outcome::Timeout | Outcome::InProgress => {
            let waiting = if inc.outcome == Outcome::InProgress {
                "still connecting; "
            } else {
                ""
            };
            match drops {
                Some(d) => format!("{waiting}{d}"),
                None if server_saw_syn => format!(
                    "{waiting}the server on this node received the SYN but the client never \
                     got an answer: its reply was lost"
                ),
                None if inc.ct.as_ref().is_some_and(|c| c.state == "UNREPLIED")
                    && inc.owner.is_none() =>
                {
                    format!(
                        "{waiting}no drop seen on this node; the conntrack entry for {} -> {dst} \
                     expired without a reply: suspect a policy on the destination node or the path",
                        inc.flow.src
                    )
                }
                None => format!(
                    "{waiting}no drop seen on this node; SYN unanswered after {}: suspect a \
                     policy on the destination node or the path",
                    retransmits(inc.syn_retransmits)
                ),
            }
        }
    }
}

/// "SYN flood to 10.0.0.2:1521 from 3412 sources over 8.0 s (peak 231000/s): 812345 SYNs
/// dropped on this node by netfilter (NETFILTER_DROP at nft_do_chain) in netns 4026532246".
pub(super) fn storm(s: &super::storm::StormIncident) -> String {
    let syn_only = !s.drops.is_empty() && s.drops.iter().all(|t| t.packet == "SYN");
    let what = if syn_only { "SYN flood" } else { "drop storm" };
    let sources = match (s.distinct_sources, s.other_sources) {
        (n, true) => format!("more than {n} sources"),
        (1, false) => "1 source".to_string(),
        (n, false) => format!("{n} sources"),
    };
    let secs = s.at_ns.saturating_sub(s.started_ns) as f64 / 1e9;
    let parts: Vec<String> = s
        .drops
        .iter()
        .map(|t| {
            let noun = match t.packet {
                "SYN" => "SYNs",
                "SYN-ACK" => "SYN-ACKs",
                _ => "packets",
            };
            format!(
                "{} {noun} dropped on this node by {} in netns {}",
                t.count,
                mechanism(t),
                t.netns
            )
        })
        .collect();
    let waiting = if s.outcome == super::storm::StormOutcome::InProgress {
        "still going; "
    } else {
        ""
    };
    format!(
        "{waiting}{what} to {} from {sources} over {secs:.1} s (peak {}/s): {}",
        s.server,
        s.peak_per_sec,
        parts.join("; ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::drop_class::DropClass;

    fn tally(reason: &str, location: &str) -> DropTally {
        DropTally {
            reason: reason.into(),
            class: DropClass::Network,
            location: location.into(),
            netns: 1,
            count: 1,
            packet: "SYN",
            flow: crate::decode::FlowKey {
                src: "10.0.0.1:40000".parse().unwrap(),
                dst: "10.0.0.2:1521".parse().unwrap(),
            },
        }
    }

    #[test]
    fn a_reasonless_kernel_still_names_netfilter_by_its_function() {
        assert_eq!(
            mechanism(&tally("UNAVAILABLE", "nf_hook_slow+0x93")),
            "netfilter (UNAVAILABLE at nf_hook_slow)"
        );
        assert_eq!(
            mechanism(&tally("NETFILTER_DROP", "nf_hook_slow+0x9c")),
            "netfilter (NETFILTER_DROP at nf_hook_slow)"
        );
        assert_eq!(
            mechanism(&tally("UNAVAILABLE", "tcp_v4_rcv+0x1a")),
            "the kernel (UNAVAILABLE at tcp_v4_rcv)"
        );
    }
}
