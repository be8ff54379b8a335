//! The userspace pipeline per kernel record: decode -> correlate -> enrich -> encode.
//! `cargo bench -p tracer-user --bench pipeline`; throughput in records per second on one
//! core (the daemon runs it on one thread).
//!
//! The records are drops of 256 distinct flows between pods of the synthetic 10k-pod /
//! 2k-policy cluster, cycled: what a node under a mix of stalled connections sees.
use std::{hint::black_box, time::Duration};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use droptrace::{
    clock::Clock,
    collect::{Symbols, drops},
    encode::{self, Format},
    enrich::identity::Identity,
    enrich::k8s::{Cluster, Object},
    enrich::model::now,
    kernel::kallsyms::Kallsyms,
    pipeline::report,
    pipeline::{self, Pipeline},
};
use tracer_common::{AF_INET, DropEvent, EventHeader, Flow, IPPROTO_TCP, kind};

#[path = "synthetic.rs"]
mod synthetic;

const FLOWS: usize = 256;

fn records() -> Vec<Vec<u8>> {
    (0..FLOWS)
        .map(|i| {
            let src = synthetic::pod_ip(i % 100, i % 97);
            let dst = synthetic::pod_ip((i * 7) % 100, (i * 3) % 100);
            let mut flow = Flow {
                sport: 40000 + i as u16,
                dport: 1521,
                family: AF_INET,
                proto: IPPROTO_TCP,
                ..Flow::default()
            };
            if let (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) = (src, dst) {
                flow.saddr[..4].copy_from_slice(&s.octets());
                flow.daddr[..4].copy_from_slice(&d.octets());
            }
            let rec = DropEvent {
                hdr: EventHeader {
                    kind: kind::DROP,
                    ts_ns: 1_000_000 + i as u64,
                    ..EventHeader::default()
                },
                location: 0xffffffff81f81c50 + 0x46f,
                flow,
                reason: 12,
                len: 60,
                netns: 4026532246,
                ifindex: 5,
                tcp_flags: 0x02,
                count: 1,
                ..DropEvent::default()
            };
            // SAFETY: plain data, read back as the daemon reads ring buffer bytes.
            unsafe {
                std::slice::from_raw_parts((&raw const rec).cast::<u8>(), size_of::<DropEvent>())
            }
            .to_vec()
        })
        .collect()
}

fn symbols() -> Symbols {
    Symbols {
        kallsyms: Kallsyms::parse(
            "ffffffff81f81c50 T nft_do_chain\nffffffff81f82000 T nf_hook_slow\n",
        ),
        drop_reasons: [(12, "NETFILTER_DROP".to_string())].into_iter().collect(),
        ..Symbols::default()
    }
}

fn decode(bytes: &[u8]) -> DropEvent {
    // SAFETY: the length is that of DropEvent (built above).
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<DropEvent>()) }
}

fn cluster() -> Cluster {
    let mut c = Cluster::default();
    let t = now();
    for v in synthetic::values() {
        let o = Object::try_from(v).unwrap();
        c.apply(&o, t).unwrap();
    }
    c
}

fn bench(c: &mut Criterion) {
    let recs = records();
    let symbols = symbols();
    let clock = Clock::new();
    let mut buf = Vec::with_capacity(2048);
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(recs.len() as u64));
    g.measurement_time(Duration::from_secs(5));

    g.bench_function("decode+encode (native)", |b| {
        b.iter(|| {
            for r in &recs {
                let d = drops::decode(&decode(r), &symbols);
                let e = report::drop_event(&d, &clock, "node-1");
                encode::encode(Format::Native, &e, &mut buf);
                black_box(&buf);
            }
        })
    });
    g.bench_function("decode+encode (ecs)", |b| {
        b.iter(|| {
            for r in &recs {
                let d = drops::decode(&decode(r), &symbols);
                let e = report::drop_event(&d, &clock, "node-1");
                encode::encode(Format::Ecs, &e, &mut buf);
                black_box(&buf);
            }
        })
    });

    // The daemon's own core, as the run loop drives it: raw records in, events out.
    let mut identity = Identity::from_cluster(cluster());
    let mut core = Pipeline::new(
        pipeline::Config::new("node-1", &[1521]),
        clock,
        self::symbols(),
        Box::new(pipeline::Procfs),
    );
    g.bench_function(
        "decode+correlate+enrich+encode (10k pods, 2k policies)",
        |b| {
            b.iter(|| {
                for r in &recs {
                    core.record(r);
                    for o in core.drain() {
                        let mut e = o.event;
                        identity.enrich(&mut e);
                        encode::encode(Format::Native, &e, &mut buf);
                        black_box(&buf);
                    }
                }
            })
        },
    );
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
