//! What the default stream carries: problems only. Network drops, stalls, storms, listener
//! refusals and `lost` records; everything else (the host's own socket housekeeping, drops no
//! one can class, successful Oracle handshakes, successful connects, the per-signal records)
//! only behind `--emit`. The summary and the metrics count every event either way.
use std::collections::BTreeMap;

use crate::{
    decode::DropSignal,
    decode::drop_class::DropClass,
    event::{Event, Kind},
    output::OutputSummary,
};

/// `--emit`: the records beyond problems that go into the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Emit {
    /// `all-drops`: drops of every class (`local`, `unknown`), not only `network`.
    pub all_drops: bool,
    /// `tns`: every Oracle Net handshake packet (refusals are stalls either way).
    pub tns: bool,
    /// `connects`: one record per successful connect to a watched port (for
    /// `droptrace explain --flows`).
    pub connects: bool,
    /// `signals`: the per-signal records an incident is built from (tcp_state,
    /// retransmit, conntrack).
    pub signals: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--emit: `{0}` is not one of all-drops, tns, connects, signals, all")]
pub struct EmitError(pub String);

impl Emit {
    pub const NAMES: [&'static str; 5] = ["all-drops", "tns", "connects", "signals", "all"];

    /// Everything (`--raw`, `--emit all`).
    pub fn all() -> Self {
        Self {
            all_drops: true,
            tns: true,
            connects: true,
            signals: true,
        }
    }

    /// A comma-separated list of [`Emit::NAMES`].
    pub fn parse(list: &str) -> Result<Self, EmitError> {
        let mut e = Self::default();
        for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match name {
                "all-drops" => e.all_drops = true,
                "tns" => e.tns = true,
                "connects" => e.connects = true,
                "signals" => e.signals = true,
                "all" => e = Self::all(),
                other => return Err(EmitError(other.to_string())),
            }
        }
        Ok(e)
    }

    pub fn union(self, o: Self) -> Self {
        Self {
            all_drops: self.all_drops || o.all_drops,
            tns: self.tns || o.tns,
            connects: self.connects || o.connects,
            signals: self.signals || o.signals,
        }
    }

    /// Whether any event of this kind can be in the stream.
    pub fn streams_kind(&self, kind: Kind) -> bool {
        match kind {
            Kind::Drop | Kind::Stall | Kind::Storm | Kind::Lost => true,
            Kind::Tns => self.tns,
            Kind::Connect => self.connects,
            Kind::TcpState | Kind::Retransmit | Kind::Conntrack => self.signals,
        }
    }

    /// Whether this event goes into the stream.
    pub fn streams(&self, e: &Event) -> bool {
        match e.kind {
            Kind::Drop => {
                self.all_drops
                    || e.drop
                        .as_ref()
                        .is_some_and(|d| d.class == DropClass::Network)
            }
            // A connect the application gave up on before anything was lost or dropped is
            // not a problem (happy eyeballs, a cancelled request).
            Kind::Stall => {
                self.signals
                    || !(e.attempt.as_ref().is_some_and(|a| a.outcome == "abandoned")
                        && e.drops.as_ref().is_none_or(Vec::is_empty))
            }
            k => self.streams_kind(k),
        }
    }
}

/// Totals printed to stderr at exit. Counts every event, streamed or not.
#[derive(Debug, Default)]
pub struct Summary {
    /// Events in the stream, by kind.
    pub events: BTreeMap<&'static str, u64>,
    /// Events counted but kept out of the stream (see `--emit`), by kind.
    pub held_back: BTreeMap<&'static str, u64>,
    /// Drops (sum of `count`), by reason and by class, whether streamed or not.
    pub drops_by_reason: BTreeMap<String, u64>,
    pub drops_by_class: BTreeMap<DropClass, u64>,
    pub lost_kernel: u64,
    pub undecodable: u64,
    pub evicted: u64,
    pub output: Option<OutputSummary>,
}

fn list<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        return "none".to_string();
    }
    m.iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Summary {
    pub(super) fn count(&mut self, e: &Event, stream: bool) {
        let m = if stream {
            &mut self.events
        } else {
            &mut self.held_back
        };
        *m.entry(e.kind.as_str()).or_default() += 1;
    }

    pub(super) fn drop_seen(&mut self, d: &DropSignal) {
        *self.drops_by_reason.entry(d.reason.clone()).or_default() += d.count;
        *self.drops_by_class.entry(d.class).or_default() += d.count;
    }

    /// Events in the stream.
    pub fn streamed(&self) -> u64 {
        self.events.values().sum()
    }

    pub fn line(&self) -> String {
        let held: u64 = self.held_back.values().sum();
        let mut line = format!(
            "droptrace: {} events ({}), {held} held back ({}; see --emit), {} lost in \
             kernel, {} undecodable, {} attempts evicted; drops by class: {}; drops by \
             reason: {}",
            self.streamed(),
            list(&self.events),
            list(&self.held_back),
            self.lost_kernel,
            self.undecodable,
            self.evicted,
            list(&self.drops_by_class),
            list(&self.drops_by_reason),
        );
        if let Some(o) = &self.output {
            line.push('\n');
            line.push_str(&o.line());
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_lists_parse_and_reject_unknown_names() {
        assert_eq!(Emit::parse("").unwrap(), Emit::default());
        let e = Emit::parse("tns, connects").unwrap();
        assert!(e.tns && e.connects && !e.all_drops && !e.signals);
        assert_eq!(Emit::parse("all").unwrap(), Emit::all());
        assert_eq!(
            Emit::parse("tns,drops").unwrap_err().to_string(),
            "--emit: `drops` is not one of all-drops, tns, connects, signals, all"
        );
    }
}
