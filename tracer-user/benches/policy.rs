//! NetworkPolicy evaluation on a synthetic cluster: 10k pods in 100 namespaces, 2k policies
//! (20 per namespace: a default deny, cross-namespace allows, ipBlocks, named ports,
//! matchExpressions). `cargo bench -p tracer-user --bench policy`.
use std::{hint::black_box, time::Duration};

use criterion::{Criterion, criterion_group, criterion_main};
use droptrace::{
    enrich::k8s::{Cluster, EnrichOptions, FlowQuery, Object, enrich, evaluate_flow},
    enrich::model::{Protocol, now},
    event::{Event, Family, Flow, Kind, Tcp},
};

#[path = "synthetic.rs"]
mod synthetic;
use synthetic::{NAMESPACES, PODS_PER_NAMESPACE, POLICIES_PER_NAMESPACE, pod_ip};

fn objects() -> Vec<Object> {
    synthetic::values()
        .into_iter()
        .map(|v| Object::try_from(v).unwrap())
        .collect()
}

fn build_cluster(objects: &[Object]) -> Cluster {
    let mut c = Cluster::default();
    let t = now();
    for o in objects {
        c.apply(o, t).unwrap();
    }
    c
}

fn bench(c: &mut Criterion) {
    let objects = objects();
    let cluster = build_cluster(&objects);
    assert_eq!(cluster.pod_count(), NAMESPACES * PODS_PER_NAMESPACE);
    assert_eq!(
        cluster.policies().len(),
        NAMESPACES * POLICIES_PER_NAMESPACE
    );

    let denied = FlowQuery {
        src: pod_ip(3, 1),
        dst: pod_ip(57, 3),
        protocol: Protocol::Tcp,
        port: 1521,
        at: None,
    };
    // ns-4 app-1 (web) -> ns-4 app-4 (web) on sql: egress p-3, ingress p-4 (team-4, web).
    let allowed = FlowQuery {
        src: pod_ip(4, 1),
        dst: pod_ip(4, 4),
        protocol: Protocol::Tcp,
        port: 1521,
        at: None,
    };
    assert!(!evaluate_flow(&cluster, &denied, &[]).verdict.allowed());
    assert!(evaluate_flow(&cluster, &allowed, &[]).verdict.allowed());
    c.bench_function("evaluate_flow denied (with fix)", |b| {
        b.iter(|| evaluate_flow(black_box(&cluster), black_box(&denied), &[]))
    });
    c.bench_function("evaluate_flow allowed", |b| {
        b.iter(|| evaluate_flow(black_box(&cluster), black_box(&allowed), &[]))
    });
    let mut event = Event::new(Kind::Drop, "2026-11-25T12:00:00.000000Z".into(), "node-1");
    event.flow = Some(Flow {
        proto: "tcp".into(),
        family: Family::Ipv4,
        src_ip: denied.src,
        src_port: 40000,
        dst_ip: denied.dst,
        dst_port: 1521,
        community_id: None,
    });
    event.tcp = Some(Tcp {
        flags: "SYN".into(),
    });
    let opts = EnrichOptions::default();
    c.bench_function("enrich drop event", |b| {
        b.iter(|| {
            let mut e = event.clone();
            enrich(black_box(&cluster), &mut e, &opts);
            e
        })
    });
    c.bench_function("pod_at lookup", |b| {
        b.iter(|| cluster.pod_at(black_box(denied.dst), None).is_some())
    });
    let mut group = c.benchmark_group("build");
    group.sample_size(10);
    group.bench_function("apply 10k pods + 2k policies", |b| {
        b.iter(|| build_cluster(black_box(&objects)))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
