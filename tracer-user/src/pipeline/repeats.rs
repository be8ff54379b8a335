//! The userspace half of the in-kernel drop aggregation: the kernel sends the first drop of
//! each (flow, reason, location) as a record and only counts the repeats; this turns the
//! counts the run loop reads from the map into `drop` signals with `count` = repeats since the
//! last flush, so the sum of `count` over the stream equals the number of drops.
//!
//! Each key's first record is remembered: its repeats carry its names and, above all, its
//! conntrack entry, so the repeats of a packet rewritten by a Service DNAT still join the
//! attempt of the address the client dialled.
use std::collections::HashMap;

use tracer_common::DropKey;

pub use crate::collect::drops::AggEntry;
use crate::{collect::Symbols, decode::DropSignal};

struct First {
    signal: DropSignal,
    seen_ns: u64,
}

pub struct Repeats {
    /// Repeats already reported, per key.
    reported: HashMap<DropKey, u64>,
    /// The first record of each key.
    first: HashMap<DropKey, First>,
    /// Keys idle this long after their last report are removed from the kernel map.
    idle_ns: u64,
}

impl Repeats {
    pub fn new(idle_ns: u64) -> Self {
        Self {
            reported: HashMap::new(),
            first: HashMap::new(),
            idle_ns,
        }
    }

    /// Remembers the first record of a key (its own `count` is already in the stream).
    pub fn first(&mut self, key: DropKey, signal: &DropSignal) {
        self.first.entry(key).or_insert_with(|| First {
            signal: signal.clone(),
            seen_ns: signal.ts_ns,
        });
    }

    /// Drops counted in the kernel since the last flush: one signal per key that grew, into
    /// `out`; keys idle long enough (everything they counted reported) into `forget` with the
    /// repeats reported, for the run loop to remove from the kernel map. A key stays known
    /// here until the run loop says it removed it (`forgotten`): one that repeated after this
    /// read is kept in the kernel, and its next flush reports only what is new.
    pub fn flush(
        &mut self,
        now_ns: u64,
        entries: &[AggEntry],
        symbols: &Symbols,
        out: &mut Vec<DropSignal>,
        forget: &mut Vec<(DropKey, u64)>,
    ) {
        for e in entries {
            let done = self.reported.entry(e.key).or_insert(0);
            if e.repeats > *done {
                let delta = e.repeats - *done;
                *done = e.repeats;
                let mut s = match self.first.get(&e.key) {
                    Some(first) => first.signal.clone(),
                    // Its first record never made it (ring buffer full): rebuild from the key.
                    None => {
                        let r = symbols.reason(e.key.reason, e.key.location);
                        DropSignal {
                            ts_ns: e.last_ns,
                            flow: crate::decode::flow_key(&e.key.flow),
                            tcp_flags: crate::decode::TcpFlags(e.tcp_flags),
                            reason: r.name,
                            reason_code: r.code,
                            class: r.class,
                            location: symbols.location(e.key.location),
                            netns: e.netns,
                            ifindex: e.ifindex,
                            count: 0,
                            ct: None,
                            redirected: e.redirected,
                        }
                    }
                };
                s.ts_ns = e.last_ns;
                s.count = delta;
                out.push(s);
            } else if now_ns.saturating_sub(e.last_ns) >= self.idle_ns {
                forget.push((e.key, e.repeats));
            }
        }
        // First records of keys the kernel never kept (its map was full): nothing will
        // repeat them.
        if self.first.len() > self.reported.len() {
            let idle = self.idle_ns;
            let kept: std::collections::HashSet<DropKey> = entries.iter().map(|e| e.key).collect();
            self.first
                .retain(|k, f| kept.contains(k) || now_ns.saturating_sub(f.seen_ns) < idle);
        }
    }

    /// The run loop removed `key` from the kernel map: its next drop is a first record again.
    pub fn forgotten(&mut self, key: &DropKey) {
        self.reported.remove(key);
        self.first.remove(key);
    }

    pub fn tracked(&self) -> usize {
        self.reported.len().max(self.first.len())
    }
}
