//! `--format text`: the terminal view. One line per event, readable at a glance (as
//! `hubble observe` prints flows):
//!
//! ```text
//! Nov 25 10:00:05.250 STALL   shop/checkout-7d9f:43512 -> data/oracle-0:1521 timeout 5.2s, 3 SYN retransmits; 4x NETFILTER_DROP at nft_do_chain+0x3c4; DENIED egress by shop/default-deny
//!     SYNs dropped by netfilter in the client's namespace
//!     fix: ...
//! ```
//!
//! An incident's diagnosis, suggested fix and fix check follow on indented lines (the fix
//! under the final record of an attempt, not under its `in_progress` one). Colour (ANSI)
//! when the caller asks for it: `--format text` on a terminal.
use std::fmt::Write as _;

use super::{message, rfc3339_nanos};
use crate::event::{Endpoint, Event, Kind};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

struct Style {
    on: bool,
}

impl Style {
    fn paint(&self, code: &str, s: &str) -> String {
        if self.on {
            format!("\x1b[{code}m{s}\x1b[0m")
        } else {
            s.to_string()
        }
    }
}

const RED: &str = "1;31";
const YELLOW: &str = "1;33";
const CYAN: &str = "36";
const GREEN: &str = "32";
const DIM: &str = "2";

/// `Nov 25 10:00:05.250` (UTC) from the event's RFC 3339 time; the time as is if it does not
/// parse.
fn short_time(t: &str) -> String {
    // Normalised to UTC `YYYY-MM-DDTHH:MM:SS.ffffffZ` first.
    let Some(utc) = rfc3339_nanos(t).map(crate::clock::rfc3339) else {
        return t.to_string();
    };
    let month = utc
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)));
    match (month, utc.get(8..10), utc.get(11..23)) {
        (Some(m), Some(d), Some(hms)) => format!("{m} {d} {hms}"),
        _ => t.to_string(),
    }
}

/// `ns/pod`, `service ns/name`, or the address; with the port.
fn end(ep: Option<&Endpoint>, ip: std::net::IpAddr, port: u16) -> String {
    let addr = match ip {
        std::net::IpAddr::V6(a) => format!("[{a}]"),
        a => a.to_string(),
    };
    let name = ep.and_then(|e| match (&e.namespace, &e.pod, &e.service) {
        (Some(ns), Some(pod), _) => Some(format!("{ns}/{pod}")),
        (Some(ns), None, Some(svc)) => Some(format!("{ns}/{svc} ({addr})")),
        _ => None,
    });
    format!("{}:{port}", name.unwrap_or(addr))
}

fn verdict(kind: Kind) -> (&'static str, &'static str) {
    match kind {
        Kind::Stall => ("STALL", RED),
        Kind::Drop => ("DROPPED", RED),
        Kind::Lost => ("LOST", YELLOW),
        Kind::Tns => ("TNS", CYAN),
        Kind::TcpState => ("STATE", DIM),
        Kind::Retransmit => ("RETRANS", DIM),
        Kind::Conntrack => ("CT", DIM),
        Kind::Storm => ("STORM", RED),
        Kind::Connect => ("CONNECT", GREEN),
    }
}

fn plural(n: u32, what: &str) -> String {
    format!("{n} {what}{}", if n == 1 { "" } else { "s" })
}

/// One event as text (no trailing newline; incidents span several lines).
pub fn encode(e: &Event, color: bool, buf: &mut Vec<u8>) {
    buf.clear();
    let st = Style { on: color };
    let (word, code) = verdict(e.kind);
    let mut line = format!(
        "{} {}",
        st.paint(DIM, &short_time(&e.time)),
        st.paint(code, &format!("{word:<7}"))
    );
    let flow = e.flow.as_ref().map(|f| {
        format!(
            "{} -> {}",
            end(e.source.as_deref(), f.src_ip, f.src_port),
            end(e.destination.as_deref(), f.dst_ip, f.dst_port)
        )
    });
    let mut what = Vec::new();
    match e.kind {
        Kind::Drop => {
            if let Some(t) = e.tcp.as_ref().filter(|t| !t.flags.is_empty()) {
                what.push(t.flags.names());
            }
            if let Some(d) = &e.drop {
                let n = if e.count > 1 {
                    format!("{}x ", e.count)
                } else {
                    String::new()
                };
                what.push(format!("{n}{} at {}", d.reason, d.location));
            }
        }
        Kind::Stall => {
            if let Some(a) = &e.attempt {
                let mut s = format!(
                    "{} {:.1}s",
                    a.outcome.replace('_', " "),
                    a.duration_ms as f64 / 1000.0
                );
                if a.syn_retransmits > 0 {
                    let _ = write!(s, ", {}", plural(a.syn_retransmits, "SYN retransmit"));
                }
                if a.data_retransmits > 0 {
                    let _ = write!(s, ", {}", plural(a.data_retransmits, "data retransmit"));
                }
                what.push(s);
            }
            for d in e.drops.iter().flatten() {
                what.push(format!("{}x {} at {}", d.count, d.reason, d.location));
            }
            if e.drops.as_ref().is_none_or(|d| d.is_empty()) {
                what.push("no drop seen on this node".into());
            }
        }
        Kind::Tns => {
            if let Some(o) = &e.oracle {
                what.push(o.packet.clone().unwrap_or_else(|| "packet".into()));
                if let Some(s) = o.service_name.as_ref().or(o.sid.as_ref()) {
                    what.push(format!("service {s}"));
                }
                if let Some(r) = &o.redirect {
                    what.push(format!("redirected to {}:{}", r.host, r.port));
                }
                if let Some(r) = &o.refuse {
                    what.push(r.text.clone());
                }
            }
        }
        // The rest read well as their one-line summary.
        _ => {
            line.push(' ');
            line.push_str(&message(e));
            buf.extend_from_slice(line.as_bytes());
            return;
        }
    }
    if let Some(f) = flow {
        line.push(' ');
        line.push_str(&f);
    }
    if let Some(p) = &e.policy {
        let names: Vec<String> = p
            .policies
            .iter()
            .map(|r| format!("{}/{}", r.namespace, r.name))
            .collect();
        let v = if p.verdict == "denied" {
            st.paint(
                RED,
                &format!("DENIED {} by {}", p.direction, names.join(", ")),
            )
        } else if names.is_empty() {
            "policy allows".to_string()
        } else {
            format!("allowed by {}", names.join(", "))
        };
        what.push(v);
    }
    if !what.is_empty() {
        line.push(' ');
        line.push_str(&what.join("; "));
    }
    if e.kind == Kind::Stall {
        let mut under = Vec::new();
        if let Some(d) = &e.diagnosis {
            under.push(d.clone());
        }
        if let Some(r) = e.oracle.as_ref().and_then(|o| o.remedy.as_ref()) {
            under.push(format!("oracle remedy: {r}"));
        }
        // The fix goes under the final record of an attempt, not its interim ones.
        let interim = e
            .attempt
            .as_ref()
            .is_some_and(|a| a.outcome == "in_progress");
        if let Some(p) = e.policy.as_ref().filter(|_| !interim)
            && let Some(fix) = &p.suggested_fix
        {
            under.push(st.paint(GREEN, "suggested fix (kubectl apply -f -):"));
            for l in fix.lines() {
                under.push(st.paint(GREEN, &format!("  {l}")));
            }
            if let Some(c) = &p.fix_check {
                let mut s = if c.allows_flow {
                    "fix check: allows this flow".to_string()
                } else {
                    "fix check: does NOT allow this flow".to_string()
                };
                for d in &c.still_denied {
                    let _ = write!(s, "; still denies {}/{}", d.protocol, d.port);
                }
                if c.newly_allowed.is_empty() {
                    s.push_str("; allows nothing else");
                } else {
                    let others: Vec<String> = c
                        .newly_allowed
                        .iter()
                        .map(|a| format!("{} -> {} {}/{}", a.from, a.to, a.protocol, a.port))
                        .collect();
                    let _ = write!(
                        s,
                        "; also allows {}{} more: {}",
                        others.len(),
                        if c.truncated { "+" } else { "" },
                        others.join(", ")
                    );
                }
                under.push(s);
            }
        }
        for u in under {
            line.push_str("\n    ");
            line.push_str(&u);
        }
    }
    buf.extend_from_slice(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_times() {
        assert_eq!(
            short_time("2026-11-25T10:00:05.250000Z"),
            "Nov 25 10:00:05.250"
        );
        assert_eq!(
            short_time("2024-02-29T23:59:59.999999Z"),
            "Feb 29 23:59:59.999"
        );
        assert_eq!(short_time("bad"), "bad");
    }

    #[test]
    fn the_fix_goes_under_the_final_record_only() {
        use crate::event::{Attempt, Policy, Shared};
        let mut e = Event::new(Kind::Stall, "2026-01-01T00:00:00.000000Z".into(), "n");
        e.attempt = Some(Attempt {
            id: 1,
            started: e.time.clone(),
            syn_retransmits: 2,
            duration_ms: 3000,
            outcome: "in_progress".into(),
            data_retransmits: 0,
            side: None,
            storm: None,
        });
        e.diagnosis = Some("still connecting".into());
        e.policy = Some(Shared::new(Policy {
            verdict: "denied".into(),
            direction: "egress".into(),
            policies: Vec::new(),
            explanation: String::new(),
            suggested_fix: Some("kind: NetworkPolicy".into()),
            fix_check: None,
        }));
        let text = |e: &Event| {
            let mut buf = Vec::new();
            encode(e, false, &mut buf);
            String::from_utf8(buf).unwrap()
        };
        let interim = text(&e);
        assert!(interim.contains("\n    still connecting") && !interim.contains("suggested fix"));
        e.attempt.as_mut().unwrap().outcome = "timeout".into();
        assert!(
            text(&e)
                .contains("\n    suggested fix (kubectl apply -f -):\n      kind: NetworkPolicy")
        );
        // A listener with dynamic ports: its Oracle-side remedy under the diagnosis.
        e.oracle = Some(Box::new(crate::event::Oracle {
            redirect_ports: vec![40123, 40200],
            remedy: Some("set USE_SHARED_SOCKET=TRUE".into()),
            ..Default::default()
        }));
        assert!(
            text(&e).contains(
                "\n    still connecting\n    oracle remedy: set USE_SHARED_SOCKET=TRUE\n    suggested fix"
            ),
            "{}",
            text(&e)
        );
    }

    #[test]
    fn colour_only_when_asked() {
        let e = Event::new(Kind::Lost, "2026-01-01T00:00:00.000000Z".into(), "n");
        let mut plain = Vec::new();
        encode(&e, false, &mut plain);
        assert!(!plain.contains(&0x1b));
        let mut color = Vec::new();
        encode(&e, true, &mut color);
        assert!(String::from_utf8(color).unwrap().contains("\x1b[1;33mLOST"));
    }
}
