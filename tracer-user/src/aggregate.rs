//! Userspace side of the in-kernel drop aggregation: the kernel sends the first drop of each
//! (flow, reason, location) as a record and only counts the repeats; this flushes the counts
//! as `drop` records with `count` = drops since the last flush, so the sum of `count` over the
//! stream equals the number of drops.
use std::collections::HashMap;

use aya::maps::{MapData, PerCpuHashMap};
use tracer_common::{DropAgg, DropEvent, DropKey};

use crate::{
    collectors::Symbols,
    signal::{self, DropSignal},
};

pub struct DropAggregator {
    map: PerCpuHashMap<MapData, DropKey, DropAgg>,
    /// Repeats already reported, per key.
    reported: HashMap<DropKey, u64>,
    /// The first record of each key: flushes repeat its names and conntrack entry.
    first: HashMap<DropKey, DropSignal>,
    /// Entries idle this long after their last report are removed from the kernel map.
    idle_ns: u64,
    keys: Vec<DropKey>,
}

pub fn key_of(rec: &DropEvent) -> DropKey {
    DropKey {
        flow: rec.flow,
        reason: rec.reason,
        _pad: 0,
        location: rec.location,
    }
}

impl DropAggregator {
    pub fn new(map: PerCpuHashMap<MapData, DropKey, DropAgg>, idle_ns: u64) -> Self {
        Self {
            map,
            reported: HashMap::new(),
            first: HashMap::new(),
            idle_ns,
            keys: Vec::new(),
        }
    }

    /// Remembers the first record of a key (its own `count` is already in the stream).
    pub fn first(&mut self, rec: &DropEvent, signal: &DropSignal) {
        self.first
            .entry(key_of(rec))
            .or_insert_with(|| signal.clone());
    }

    /// Drops counted in the kernel since the last flush, one signal per key that grew.
    /// Idle keys are removed from the kernel map once everything they counted is reported.
    pub fn flush(&mut self, now_ns: u64, symbols: &Symbols, out: &mut Vec<DropSignal>) {
        self.keys.clear();
        self.keys.extend(self.map.keys().filter_map(Result::ok));
        let mut idle = Vec::new();
        for key in &self.keys {
            let Ok(per_cpu) = self.map.get(key, 0) else {
                continue;
            };
            let mut repeats = 0u64;
            let mut last_ns = 0u64;
            let mut netns = 0;
            let mut ifindex = 0;
            let mut flags = 0;
            for v in per_cpu.iter() {
                repeats += v.repeats;
                last_ns = last_ns.max(v.last_ns);
                if v.netns != 0 {
                    (netns, ifindex, flags) = (v.netns, v.ifindex, v.tcp_flags);
                }
            }
            let done = self.reported.entry(*key).or_insert(0);
            if repeats > *done {
                let delta = repeats - *done;
                *done = repeats;
                let mut s = match self.first.get(key) {
                    Some(first) => first.clone(),
                    // Its first record never made it (ring buffer full): rebuild from the key.
                    None => DropSignal {
                        ts_ns: last_ns,
                        flow: signal::flow_key(&key.flow),
                        tcp_flags: flags,
                        reason: symbols.drop_reason(key.reason),
                        reason_code: key.reason,
                        location: symbols.location(key.location),
                        netns,
                        ifindex,
                        count: 0,
                        ct: None,
                    },
                };
                s.ts_ns = last_ns;
                s.count = delta;
                out.push(s);
            } else if now_ns.saturating_sub(last_ns) >= self.idle_ns {
                idle.push(*key);
            }
        }
        for key in idle {
            // A drop landing between the read above and this removal would be missed; the
            // entry has been idle for `idle_ns`, so that window is not hit in practice.
            let _ = self.map.remove(&key);
            self.reported.remove(&key);
            self.first.remove(&key);
        }
    }

    pub fn tracked(&self) -> usize {
        self.reported.len().max(self.first.len())
    }
}
