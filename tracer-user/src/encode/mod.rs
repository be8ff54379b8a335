//! Event -> bytes. `native` is the droptrace.v1 JSON as documented in docs/events.md; `ecs`
//! and `ocsf` reshape it for SIEMs (docs/siem.md has the mappings field by field).
use std::{fmt, str::FromStr};

use serde::Serialize;

use crate::event::{
    Attempt, Conntrack, Drop, DropSummary, Endpoint, Event, Flow, Kind, Lost, Oracle, Policy,
    Shared, Storm, Tcp,
};

pub mod community_id;
mod ecs;
mod json;
mod ocsf;
pub mod text;

/// The wire format of every line, chosen once for all sinks (`--format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Native,
    Ecs,
    Ocsf,
    /// The terminal view (docs/events.md, "--format text").
    Text,
    /// The terminal view with ANSI colours (`--format text` on a terminal).
    TextColor,
}

impl Format {
    /// The JSON formats (one schema each).
    pub const ALL: [Format; 3] = [Format::Native, Format::Ecs, Format::Ocsf];

    pub fn as_str(self) -> &'static str {
        match self {
            Format::Native => "native",
            Format::Ecs => "ecs",
            Format::Ocsf => "ocsf",
            Format::Text | Format::TextColor => "text",
        }
    }

    pub fn is_text(self) -> bool {
        matches!(self, Format::Text | Format::TextColor)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL
            .into_iter()
            .chain([Format::Text])
            .find(|f| f.as_str() == s)
            .ok_or_else(|| format!("unknown format `{s}` (expected native, ecs, ocsf or text)"))
    }
}

/// One NDJSON line (without the newline) in `format`; for text, one line, and for an
/// incident the indented lines under it.
pub fn encode(format: Format, event: &Event, buf: &mut Vec<u8>) {
    match format {
        Format::Text => text::encode(event, false, buf),
        Format::TextColor => text::encode(event, true, buf),
        Format::Native => native(event, buf),
        Format::Ecs => ecs::write(event, buf),
        Format::Ocsf => ocsf::write(event, buf),
    }
}

/// One NDJSON line (without the newline).
pub fn native(event: &Event, buf: &mut Vec<u8>) {
    buf.clear();
    // Records made by the daemon carry their Community ID; replayed or hand-made ones get it
    // here, so every native line with a flow has it.
    if event
        .flow
        .as_ref()
        .is_some_and(|f| f.community_id.is_none() && !f.is_folded())
    {
        let mut e = event.clone();
        if let Some(f) = e.flow.as_mut() {
            f.community_id = community_id(f);
        }
        if serde_json::to_writer(&mut *buf, &e).is_err() {
            buf.clear();
        }
        return;
    }
    // Writing plain structs of strings and numbers into a Vec cannot fail; if it ever did,
    // an empty line is caught by every consumer instead of a panic in the tracing loop.
    if serde_json::to_writer(&mut *buf, event).is_err() {
        buf.clear();
    }
}

/// The pod the event is about (for single-pod fields like ECS `orchestrator.*`): the
/// endpoint that is a pod on this node, else the first that is a pod at all; source first.
pub(crate) fn subject(e: &Event) -> Option<(Side, &Endpoint)> {
    let sides = [
        (Side::Source, e.source.as_deref()),
        (Side::Destination, e.destination.as_deref()),
    ];
    let pods = || {
        sides
            .iter()
            .filter_map(|(s, ep)| ep.filter(|ep| ep.pod.is_some()).map(|ep| (*s, ep)))
    };
    pods()
        .find(|(_, ep)| ep.node.as_deref() == Some(e.node.as_str()))
        .or_else(|| pods().next())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Destination,
}

/// "ingress" | "egress" relative to the subject pod: the policy verdict's direction when a
/// policy was evaluated, else the side the subject pod is on.
fn direction(e: &Event) -> Option<&'static str> {
    match e.policy.as_ref().map(|p| p.direction.as_str()) {
        Some("ingress") => Some("ingress"),
        Some("egress") => Some("egress"),
        _ => subject(e).map(|(side, _)| match side {
            Side::Source => "egress",
            Side::Destination => "ingress",
        }),
    }
}

/// The droptrace.v1 sections a SIEM schema has no place for, under their native names and
/// types (ECS `droptrace.*`, OCSF `unmapped.droptrace`), so one parser serves every format.
/// `count` goes to OCSF's own `count`, `node` to ECS `host.name`. Serialised straight from
/// the event (borrowed, no JSON tree): it is most of the bytes of a line.
#[derive(Serialize)]
struct Sections<'a> {
    schema: &'a str,
    kind: Kind,
    #[serde(skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    node: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<&'a Tcp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drop: Option<&'a Drop>,
    #[serde(skip_serializing_if = "Option::is_none")]
    netns: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ifindex: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lost: Option<&'a Lost>,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<CgroupOnly>,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempt: Option<&'a Attempt>,
    #[serde(skip_serializing_if = "Option::is_none")]
    drops: Option<&'a Vec<DropSummary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conntrack: Option<&'a Conntrack>,
    #[serde(skip_serializing_if = "Option::is_none")]
    diagnosis: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'a Shared<Endpoint>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    destination: Option<&'a Shared<Endpoint>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<&'a Shared<Policy>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oracle: Option<&'a Oracle>,
    #[serde(skip_serializing_if = "Option::is_none")]
    storm: Option<&'a Storm>,
}

/// `process` minus what the SIEM format already maps (pid, name, container id).
#[derive(Serialize)]
struct CgroupOnly {
    cgroup_id: u64,
}

impl<'a> Sections<'a> {
    fn of(e: &'a Event, ocsf: bool) -> Self {
        Self {
            schema: &e.schema,
            kind: e.kind,
            count: (!ocsf).then_some(e.count),
            node: ocsf.then_some(e.node.as_str()),
            tcp: e.tcp.as_ref(),
            drop: e.drop.as_ref(),
            netns: e.netns,
            ifindex: e.ifindex,
            lost: e.lost.as_ref(),
            process: e.process.as_ref().map(|p| CgroupOnly {
                cgroup_id: p.cgroup_id,
            }),
            attempt: e.attempt.as_ref(),
            drops: e.drops.as_ref(),
            conntrack: e.conntrack.as_deref(),
            diagnosis: e.diagnosis.as_deref(),
            // The shared sections, so their JSON written once per flow is reused here too.
            source: e.source.as_ref(),
            destination: e.destination.as_ref(),
            policy: e.policy.as_ref(),
            oracle: e.oracle.as_deref(),
            storm: e.storm.as_deref(),
        }
    }
}

/// `namespace/name` of each policy, comma-separated (ECS `rule.name`, OCSF `policy.name`).
fn policy_names(policies: &[crate::event::PolicyRef]) -> String {
    let mut names = String::new();
    for (i, r) in policies.iter().enumerate() {
        if i > 0 {
            names.push(',');
        }
        names.push_str(&r.namespace);
        names.push('/');
        names.push_str(&r.name);
    }
    names
}

fn community_id(f: &Flow) -> Option<String> {
    f.community_id_or_compute()
}

thread_local! {
    /// The `message` buffer of the encoding thread.
    static MESSAGE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// A one-line human summary, the `message` of ECS and OCSF.
fn message(e: &Event) -> String {
    let mut m = String::new();
    write_message(e, &mut m);
    m
}

/// [`message`] into `m` (cleared first): the SIEM encoders reuse one buffer.
fn write_message(e: &Event, m: &mut String) {
    use std::fmt::Write as _;
    m.clear();
    // Writing into a String cannot fail.
    let flow = |m: &mut String| {
        if let Some(f) = e.flow.as_ref() {
            m.push(' ');
            write_endpoints(m, f.src_ip, f.src_port, f.dst_ip, f.dst_port);
        }
    };
    let why = |m: &mut String| {
        if let Some(d) = e.diagnosis.as_ref() {
            m.push_str(": ");
            m.push_str(d);
        }
    };
    match e.kind {
        Kind::Drop => {
            m.push_str("TCP");
            if let Some(t) = e.tcp.as_ref().filter(|t| !t.flags.is_empty()) {
                m.push(' ');
                m.push_str(&t.flags.names());
            }
            flow(m);
            let reason = e.drop.as_ref().map_or("UNKNOWN", |d| d.reason.as_str());
            let _ = write!(m, " dropped: {reason} (x{})", e.count);
        }
        Kind::Stall => {
            let outcome = e.attempt.as_ref().map_or("unknown", |a| a.outcome.as_str());
            m.push_str("TCP connection");
            flow(m);
            let _ = write!(m, " stalled ({outcome})");
            why(m);
        }
        Kind::Tns => {
            let packet = e
                .oracle
                .as_ref()
                .and_then(|o| o.packet.as_deref())
                .unwrap_or("packet");
            m.push_str("Oracle TNS ");
            m.push_str(packet);
            flow(m);
        }
        Kind::TcpState => {
            m.push_str("TCP state");
            if let Some(s) = e.tcp_state.as_ref() {
                let _ = write!(m, " {} -> {}", s.old, s.new);
            }
            flow(m);
        }
        Kind::Retransmit => {
            let state = e.retransmit.as_ref().map_or("", |r| r.state.as_str());
            let _ = write!(m, "TCP retransmit ({state})");
            flow(m);
        }
        Kind::Conntrack => {
            m.push_str("conntrack entry");
            flow(m);
            m.push_str(" removed without a reply");
        }
        Kind::Storm => {
            m.push_str("TCP drop storm");
            flow(m);
            why(m);
        }
        Kind::Connect => {
            m.push_str("TCP connection");
            flow(m);
            m.push_str(" established");
        }
        Kind::Lost => {
            let reason = e.lost.as_ref().map_or("unknown", |l| l.reason.as_str());
            let _ = write!(m, "{} events lost ", e.count);
            match e.lost.as_ref() {
                Some(l) => match (&l.source, &l.sink) {
                    (crate::event::LostSource::Sink, Some(sink)) => {
                        let _ = write!(m, "by sink {sink}");
                    }
                    (source, _) => {
                        let _ = write!(m, "in {}", lost_source(source));
                    }
                },
                None => m.push_str("in droptrace"),
            }
            let _ = write!(m, " ({reason})");
        }
    }
}

fn lost_source(s: &crate::event::LostSource) -> &'static str {
    match s {
        crate::event::LostSource::Kernel => "the kernel",
        crate::event::LostSource::Sink => "a sink",
        crate::event::LostSource::Input => "the input",
        crate::event::LostSource::Correlation => "the flow table",
    }
}

fn write_endpoints(m: &mut String, sip: std::net::IpAddr, sp: u16, dip: std::net::IpAddr, dp: u16) {
    use std::fmt::Write as _;
    // A storm's folded end stands for many addresses.
    let end = |m: &mut String, ip: std::net::IpAddr, p: u16| {
        match ip {
            _ if ip.is_unspecified() && p == 0 => m.push_str("(many sources)"),
            // Written digit by digit: `{a}` (formatting machinery per octet) was a visible
            // part of encoding a message.
            std::net::IpAddr::V4(a) => {
                for (i, o) in a.octets().into_iter().enumerate() {
                    if i > 0 {
                        m.push('.');
                    }
                    push_decimal(m, o.into());
                }
                m.push(':');
                push_decimal(m, p);
            }
            std::net::IpAddr::V6(a) => {
                let _ = write!(m, "[{a}]:");
                push_decimal(m, p);
            }
        }
    };
    end(m, sip, sp);
    m.push_str(" -> ");
    end(m, dip, dp);
}

/// `n` in decimal.
fn push_decimal(m: &mut String, n: u16) {
    m.push_str(itoa::Buffer::new().format(n));
}

/// Unix milliseconds of an RFC 3339 timestamp (`Z` or `±hh:mm` offset, any fraction).
/// `None` if it does not parse; callers then fall back to 0 rather than fail the event.
pub fn rfc3339_millis(s: &str) -> Option<i64> {
    rfc3339_nanos(s).map(|ns| ns.div_euclid(1_000_000) as i64)
}

/// Unix nanoseconds of an RFC 3339 timestamp (digits past the ninth are ignored).
pub fn rfc3339_nanos(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos = 0i64;
    if b.get(i) == Some(&b'.') {
        let start = i + 1;
        i = start;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 9)];
        nanos = frac.parse::<i64>().ok()? * 10i64.pow(9 - frac.len() as u32);
    }
    let offset_min = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let m = num(i + 1..i + 3)? * 60 + num(i + 4..i + 6)?;
            if *sign == b'+' { m } else { -m }
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(i128::from(secs) * 1_000_000_000 + i128::from(nanos))
}

/// Howard Hinnant's civil-to-days (the inverse of clock.rs's days-to-civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_written_as_display_writes_them() {
        let mut m = String::new();
        for (sip, sp, dip, dp) in [
            ("10.0.0.1", 40000, "255.255.255.255", 65535),
            ("0.0.0.0", 0, "1.2.3.4", 0),
            ("fd00::1", 1521, "10.200.0.9", 9),
            ("0.0.0.0", 7, "::", 0),
        ] {
            let (a, b): (std::net::IpAddr, std::net::IpAddr) =
                (sip.parse().unwrap(), dip.parse().unwrap());
            m.clear();
            write_endpoints(&mut m, a, sp, b, dp);
            let show = |ip: std::net::IpAddr, p: u16| match ip {
                _ if ip.is_unspecified() && p == 0 => "(many sources)".to_string(),
                std::net::IpAddr::V4(a) => format!("{a}:{p}"),
                std::net::IpAddr::V6(a) => format!("[{a}]:{p}"),
            };
            assert_eq!(m, format!("{} -> {}", show(a, sp), show(b, dp)));
        }
    }

    #[test]
    fn parses_rfc3339() {
        assert_eq!(rfc3339_millis("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            rfc3339_millis("2024-02-29T23:59:59.500000Z"),
            Some(1_709_251_199_500)
        );
        assert_eq!(
            rfc3339_millis("2026-11-25T09:00:00.000001Z"),
            Some(1_795_597_200_000)
        );
        assert_eq!(rfc3339_millis("1970-01-01T01:00:00+01:00"), Some(0));
        for bad in [
            "",
            "x",
            "2024-13-01T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00Zjunk",
            "２０２４-01-01T00:00:00Z",
        ] {
            assert_eq!(rfc3339_millis(bad), None, "{bad}");
        }
    }
}
