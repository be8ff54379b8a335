//! Prometheus metrics (`--metrics ADDR`): the registry, rendered in the text exposition
//! format, served by `server` at `/metrics`, with `/healthz` (200 while the process serves)
//! and `/readyz` (200 once tracing is attached). It reads the sinks' counters
//! ([`SinkStats`]) and knows nothing else of the outputs.
//!
//! Updates come from the event path, so they are one uncontended mutex and a few map
//! operations per event. Label sets are bounded: the first `max_pods` (namespace, pod)
//! pairs and the first `MAX_PORTS` ports seen get their own series; later ones are counted
//! under "other". Labels are never taken back, so every counter stays monotonic (a
//! re-ranked top-N would make "other" go down, which Prometheus reads as a reset).
use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use super::stats::SinkStats;
use crate::event::{Event, Kind, LostSource};

mod server;

pub(crate) use server::{parse_addr, serve};

pub(crate) const DEFAULT_MAX_PODS: usize = 100;
const MAX_PORTS: usize = 100;
const MAX_REASONS: usize = 512;
const MAX_OUTCOMES: usize = 32;
const OTHER: &str = "other";

pub(crate) struct Metrics {
    ready: AtomicBool,
    max_pods: usize,
    inner: Mutex<Inner>,
    sinks: Mutex<Vec<(String, Arc<SinkStats>)>>,
}

#[derive(Default)]
struct Inner {
    events: BTreeMap<&'static str, u64>,
    /// (reason, class, namespace, pod, port) -> drops
    drops: BTreeMap<(String, &'static str, String, String, String), u64>,
    pods: HashSet<(String, String)>,
    ports: HashSet<u16>,
    reasons: HashSet<String>,
    stalls: BTreeMap<String, u64>,
    kernel_lost: u64,
    /// The kernel programs' own counters, as last read (tracer_common::counter).
    kernel: Vec<(&'static str, u64)>,
}

impl Metrics {
    pub(crate) fn new(max_pods: usize) -> Self {
        Self {
            ready: AtomicBool::new(false),
            max_pods,
            inner: Mutex::new(Inner::default()),
            sinks: Mutex::new(Vec::new()),
        }
    }

    /// `/readyz` answers 200 from now on (the daemon calls it once programs are attached).
    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    pub(crate) fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub(crate) fn register_sink(&self, name: &str, stats: Arc<SinkStats>) {
        if let Ok(mut s) = self.sinks.lock() {
            s.push((name.to_string(), stats));
        }
    }

    /// Counts one event leaving the daemon.
    pub(crate) fn observe(&self, e: &Event) {
        let Ok(mut m) = self.inner.lock() else {
            return;
        };
        *m.events.entry(e.kind.as_str()).or_default() += 1;
        match e.kind {
            Kind::Drop => {
                let class = e.drop.as_ref().map_or("unknown", |d| d.class.as_str());
                let reason = e.drop.as_ref().map_or("UNKNOWN", |d| d.reason.as_str());
                let reason = admit(&mut m.reasons, reason.to_string(), MAX_REASONS)
                    .unwrap_or_else(|| OTHER.to_string());
                let (ns, pod) = [e.source.as_ref(), e.destination.as_ref()]
                    .into_iter()
                    .flatten()
                    .find(|ep| ep.pod.is_some())
                    .map(|ep| {
                        (
                            ep.namespace.clone().unwrap_or_default(),
                            ep.pod.clone().unwrap_or_default(),
                        )
                    })
                    .unwrap_or_default();
                let (ns, pod) = if ns.is_empty() && pod.is_empty() {
                    (ns, pod)
                } else {
                    let max = self.max_pods;
                    admit(&mut m.pods, (ns, pod), max)
                        .unwrap_or_else(|| (OTHER.to_string(), OTHER.to_string()))
                };
                let port = match e.flow.as_ref().map(|f| f.dst_port) {
                    Some(p) => admit(&mut m.ports, p, MAX_PORTS)
                        .map_or_else(|| OTHER.to_string(), |p| p.to_string()),
                    None => String::new(),
                };
                *m.drops.entry((reason, class, ns, pod, port)).or_default() += e.count;
            }
            Kind::Stall => {
                let outcome = e.attempt.as_ref().map_or("unknown", |a| a.outcome.as_str());
                let key = if m.stalls.contains_key(outcome) || m.stalls.len() < MAX_OUTCOMES {
                    outcome.to_string()
                } else {
                    OTHER.to_string()
                };
                *m.stalls.entry(key).or_default() += 1;
            }
            Kind::Lost => {
                if e.lost
                    .as_ref()
                    .is_some_and(|l| l.source == LostSource::Kernel)
                {
                    m.kernel_lost += e.count;
                }
            }
            Kind::Tns
            | Kind::TcpState
            | Kind::Retransmit
            | Kind::Conntrack
            | Kind::Storm
            | Kind::Connect => {}
        }
    }

    /// The kernel programs' counters, read by the run loop every second.
    pub(crate) fn kernel_counters(&self, counters: &[(&'static str, u64)]) {
        if let Ok(mut m) = self.inner.lock() {
            m.kernel = counters.to_vec();
        }
    }

    /// The text exposition format, version 0.0.4.
    pub(crate) fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        family_line(
            &mut out,
            "droptrace_build_info",
            "gauge",
            "droptrace version (value is always 1).",
        );
        let _ = writeln!(
            out,
            "droptrace_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        if let Ok(m) = self.inner.lock() {
            family_line(
                &mut out,
                "droptrace_events_total",
                "counter",
                "Events produced, by kind (in the stream or held back by --emit).",
            );
            for kind in [
                "drop",
                "lost",
                "stall",
                "storm",
                "tns",
                "connect",
                "tcp_state",
                "retransmit",
                "conntrack",
            ] {
                let n = m.events.get(kind).copied().unwrap_or(0);
                let _ = writeln!(out, "droptrace_events_total{{kind=\"{kind}\"}} {n}");
            }
            family_line(
                &mut out,
                "droptrace_drops_total",
                "counter",
                "Packets dropped on watched flows (aggregated drop records count each packet).",
            );
            for ((reason, class, ns, pod, port), n) in &m.drops {
                let _ = writeln!(
                    out,
                    "droptrace_drops_total{{reason=\"{}\",class=\"{class}\",namespace=\"{}\",pod=\"{}\",port=\"{}\"}} {n}",
                    esc(reason),
                    esc(ns),
                    esc(pod),
                    esc(port)
                );
            }
            family_line(
                &mut out,
                "droptrace_stalls_total",
                "counter",
                "Stalled connection attempts, by outcome.",
            );
            for (outcome, n) in &m.stalls {
                let _ = writeln!(
                    out,
                    "droptrace_stalls_total{{outcome=\"{}\"}} {n}",
                    esc(outcome)
                );
            }
            family_line(
                &mut out,
                "droptrace_kernel_lost_total",
                "counter",
                "Events the kernel could not queue (ring buffer full).",
            );
            let _ = writeln!(out, "droptrace_kernel_lost_total {}", m.kernel_lost);
            family_line(
                &mut out,
                "droptrace_kernel_counter_total",
                "counter",
                "The kernel programs' own counters: kfree_skb hits seen, drops merged into an \
                 aggregate, folded into a storm, delivered alone because the aggregation map was \
                 full, records that could not be read or queued.",
            );
            for (name, n) in &m.kernel {
                let _ = writeln!(
                    out,
                    "droptrace_kernel_counter_total{{counter=\"{name}\"}} {n}"
                );
            }
        }
        let sinks = self.sinks.lock().map(|s| s.clone()).unwrap_or_default();
        let sink_family = |out: &mut String,
                           name: &str,
                           kind: &str,
                           help: &str,
                           get: &dyn Fn(&SinkStats) -> u64| {
            family_line(out, name, kind, help);
            for (sink, stats) in &sinks {
                let _ = writeln!(out, "{name}{{sink=\"{}\"}} {}", esc(sink), get(stats));
            }
        };
        sink_family(
            &mut out,
            "droptrace_sink_sent_total",
            "counter",
            "Events the sink accepted.",
            &|s| s.sent(),
        );
        sink_family(
            &mut out,
            "droptrace_sink_errors_total",
            "counter",
            "Failed delivery attempts (connect, write, HTTP errors).",
            &|s| s.errors(),
        );
        sink_family(
            &mut out,
            "droptrace_sink_up",
            "gauge",
            "1 while the receiver answers, 0 since a connect or delivery failed (also at start).",
            &|s| u64::from(s.up()),
        );
        sink_family(
            &mut out,
            "droptrace_sink_spooled",
            "gauge",
            "Events waiting in the sink's on-disk spool.",
            &|s| s.spooled(),
        );
        sink_family(
            &mut out,
            "droptrace_sink_discarded_total",
            "counter",
            "Events the sink discarded (queue full without spool, spool full, rejected by the receiver).",
            &|s| s.discarded(),
        );
        out
    }
}

fn family_line(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// `Some(value)` when it has (or now gets) its own label.
fn admit<T: std::hash::Hash + Eq + Clone>(set: &mut HashSet<T>, v: T, max: usize) -> Option<T> {
    if set.contains(&v) {
        return Some(v);
    }
    if set.len() < max {
        set.insert(v.clone());
        return Some(v);
    }
    None
}

/// Label value escaping: backslash, double quote and newline.
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Drop, Endpoint, Family, Flow};

    fn drop_event(pod: &str, port: u16) -> Event {
        let mut e = Event::new(Kind::Drop, "2026-01-01T00:00:00.000000Z".into(), "n");
        e.count = 2;
        e.drop = Some(Drop {
            reason: "NETFILTER_DROP".into(),
            reason_code: Some(1),
            class: crate::decode::drop_class::DropClass::Network,
            location: "x".into(),
            storm: None,
        });
        e.flow = Some(Flow {
            proto: "tcp".into(),
            family: Family::Ipv4,
            src_ip: "10.0.0.1".parse().unwrap(),
            src_port: 40000,
            dst_ip: "10.0.0.2".parse().unwrap(),
            dst_port: port,
            community_id: None,
        });
        e.source = Some(crate::event::Shared::new(Endpoint {
            namespace: Some("ns".into()),
            pod: Some(pod.into()),
            ..Default::default()
        }));
        e
    }

    #[test]
    fn bounded_labels_and_render() {
        let m = Metrics::new(2);
        for pod in ["a", "b", "c", "d", "a"] {
            m.observe(&drop_event(pod, 1521));
        }
        let text = m.render();
        assert!(text.contains("droptrace_drops_total{reason=\"NETFILTER_DROP\",class=\"network\",namespace=\"ns\",pod=\"a\",port=\"1521\"} 4"), "{text}");
        assert!(text.contains("pod=\"other\",port=\"1521\"} 4"), "{text}");
        assert!(text.contains("droptrace_events_total{kind=\"drop\"} 5"));
        m.kernel_counters(&[("skb_seen", 12), ("tcp_unreadable", 1)]);
        let text = m.render();
        assert!(
            text.contains("droptrace_kernel_counter_total{counter=\"skb_seen\"} 12"),
            "{text}"
        );
        assert!(text.contains("droptrace_kernel_counter_total{counter=\"tcp_unreadable\"} 1"));
        assert!(text.contains("droptrace_build_info{version="));
    }
}
