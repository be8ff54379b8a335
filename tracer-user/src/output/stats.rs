//! Per-output counters: what each sink sent, failed, spooled and discarded (and why),
//! shared by the sink's tasks, the loss reports and the metrics endpoint; and the run's
//! per-sink summary. Plain atomics: nothing here knows how the counters are filled or read.
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Why events were discarded; each is reported in `lost.reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Discard {
    /// Memory queue full and no spool (or the spool could not keep up).
    QueueFull,
    /// `--spool-max` reached (or the spool could not be written).
    SpoolFull,
    /// The receiver refused them for good (HTTP 4xx, ES bulk item errors).
    Rejected,
    /// Still in memory at the end of `--flush-timeout` with no spool to keep them.
    Shutdown,
    /// Over the per-node write rate (`--k8s-events`).
    RateLimited,
}

pub(super) const DISCARDS: [Discard; 5] = [
    Discard::QueueFull,
    Discard::SpoolFull,
    Discard::Rejected,
    Discard::Shutdown,
    Discard::RateLimited,
];

impl Discard {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Discard::QueueFull => "queue_full",
            Discard::SpoolFull => "spool_full",
            Discard::Rejected => "rejected",
            Discard::Shutdown => "shutdown",
            Discard::RateLimited => "rate_limited",
        }
    }
}

/// Counters of one sink, shared by `Output::send`, its tasks and the metrics endpoint.
#[derive(Debug, Default)]
pub(crate) struct SinkStats {
    pub(super) sent: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) spooled: AtomicU64,
    /// The last connect or delivery failed (set at start too, when the receiver is not up).
    pub(super) down: AtomicBool,
    pub(super) discarded: [AtomicU64; 5],
    /// Discards already announced to the other sinks / to this sink itself.
    pub(super) reported_others: [AtomicU64; 5],
    pub(super) reported_self: [AtomicU64; 5],
}

impl SinkStats {
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Events in the spool now.
    pub(crate) fn spooled(&self) -> u64 {
        self.spooled.load(Ordering::Relaxed)
    }

    /// Whether the receiver answered the last connect or delivery.
    pub(crate) fn up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    pub(crate) fn discarded(&self) -> u64 {
        self.discarded
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .sum()
    }

    pub(super) fn discard(&self, why: Discard, n: u64) {
        if n > 0 {
            self.discarded[why as usize].fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// What one sink did over the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSummary {
    pub(crate) name: String,
    pub(crate) sent: u64,
    pub(crate) errors: u64,
    pub(crate) discarded: u64,
    /// Left in the spool for the next run.
    pub(crate) spooled: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutputSummary {
    pub(crate) sinks: Vec<SinkSummary>,
    /// The flush deadline passed before every sink caught up.
    pub(crate) timed_out: bool,
}

impl OutputSummary {
    pub fn line(&self) -> String {
        let sinks: Vec<_> = self
            .sinks
            .iter()
            .map(|s| {
                format!(
                    "{}: {} sent, {} errors, {} discarded, {} left in spool",
                    s.name, s.sent, s.errors, s.discarded, s.spooled
                )
            })
            .collect();
        format!(
            "droptrace: outputs{}: {}",
            if self.timed_out {
                " (flush timed out)"
            } else {
                ""
            },
            sinks.join("; ")
        )
    }
}
