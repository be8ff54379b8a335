//! Loss reports: every discard of an output becomes a `lost` record (`lost.sink` names the
//! output, `lost.reason` the [`Discard`]) for every other sink's stream, and for the sink's
//! own once it catches up (docs/siem.md, "Delivery guarantees").
use std::sync::{Arc, atomic::Ordering};

use super::{
    sink::Record,
    stats::{DISCARDS, Discard, SinkStats},
};
use crate::{
    encode::Format,
    event::{Event, LostSource},
};

/// Makes the `lost` records the output reports itself.
pub(super) struct LostMaker {
    pub(super) format: Format,
    pub(super) node: String,
    /// Some sink speaks OTLP: records carry the OTLP sidecar.
    pub(super) otlp: bool,
}

impl LostMaker {
    pub(super) fn record(&self, sink: &str, why: Discard, count: u64) -> (Event, Arc<Record>) {
        let e = Event::lost(
            &self.node,
            count,
            LostSource::Sink,
            why.as_str(),
            Some(sink),
        );
        let rec = Arc::new(Record::new(self.format, self.otlp, &e, &mut Vec::new()));
        (e, rec)
    }
}

/// `lost` records for the discards not yet announced to the other sinks, with the name of
/// the output that discarded; marks them announced.
pub(super) fn unreported(
    sources: &[(String, Arc<SinkStats>)],
    lost: &LostMaker,
) -> Vec<(String, Arc<Record>)> {
    let mut out = Vec::new();
    for (name, stats) in sources {
        for why in DISCARDS {
            let total = stats.discarded[why as usize].load(Ordering::Relaxed);
            let told = stats.reported_others[why as usize].load(Ordering::Relaxed);
            if total > told {
                stats.reported_others[why as usize].store(total, Ordering::Relaxed);
                out.push((name.clone(), lost.record(name, why, total - told).1));
            }
        }
    }
    out
}
