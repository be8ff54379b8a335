//! Parser throughput on a realistic handshake mix: what the daemon pays per captured byte.
//!
//! Mix per round: a python-oracledb CONNECT (descriptor in a DATA packet) answered by a
//! split REDIRECT; the redirected CONNECT answered by ACCEPT; a CONNECT with an inline
//! descriptor refused with 12514; a RESEND and the resent CONNECT; and a long descriptor cut by
//! a 512-byte capture limit. Each packet is its own segment, as clients and listeners write them.
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use droptrace::decode::oracle::descriptor::Descriptor;
use droptrace::decode::oracle::tns::{self, FLAG_REDIRECTED_CONNECT, build};
use droptrace::decode::oracle::{Direction, Segment, TnsStream};

const REAL_CONNECT: &[u8] =
    include_bytes!("../tests/fixtures/tns/python-oracledb-26.1.0-connect.bin");
const REAL_REDIRECTED: &[u8] =
    include_bytes!("../tests/fixtures/tns/python-oracledb-26.1.0-connect-redirected.bin");
const REDIRECT: &[u8] = include_bytes!("../tests/fixtures/tns/fake-listener-redirect.bin");

/// One connection: (direction, captured bytes, real segment length) per segment.
type Conn = Vec<(Direction, Vec<u8>, usize)>;

fn seg(dir: Direction, b: &[u8]) -> (Direction, Vec<u8>, usize) {
    (dir, b.to_vec(), b.len())
}

fn mix() -> Vec<Conn> {
    use Direction::{ToClient, ToServer};
    let inline = b"(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME=BILLING)(CID=(PROGRAM=sqlplus)(HOST=pod-1)(USER=app)))(ADDRESS=(PROTOCOL=TCP)(HOST=10.0.0.9)(PORT=1521)))";
    let refuse = build::refuse(
        b"(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR=12514)(ERROR_STACK=(ERROR=(CODE=12514)(EMFI=4))))",
    );
    let long: Vec<u8> = [&REAL_CONNECT[84..], &b" (X=y)".repeat(100)[..]].concat();
    let long = build::connect(&long, FLAG_REDIRECTED_CONNECT);
    vec![
        vec![
            seg(ToServer, &REAL_CONNECT[..74]),
            seg(ToServer, &REAL_CONNECT[74..]),
            seg(ToClient, &REDIRECT[..10]),
            seg(ToClient, &REDIRECT[10..]),
        ],
        vec![
            seg(ToServer, &REAL_REDIRECTED[..74]),
            seg(ToServer, &REAL_REDIRECTED[74..]),
            seg(ToClient, &build::accept(319)),
        ],
        vec![
            seg(ToServer, &build::connect(inline, 0)),
            seg(ToClient, &build::resend()),
            seg(ToServer, &build::connect(inline, 0)),
            seg(ToClient, &refuse),
        ],
        vec![
            seg(ToServer, &long[..74]),
            (ToServer, long[74..74 + 512].to_vec(), long.len() - 74),
        ],
    ]
}

fn bench(c: &mut Criterion) {
    let conns = mix();
    let bytes: usize = conns.iter().flatten().map(|(_, b, _)| b.len()).sum();
    let mut g = c.benchmark_group("tns");
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("stream_mix", |b| {
        b.iter(|| {
            let mut n = 0;
            for conn in &conns {
                let mut s = TnsStream::new();
                for (dir, data, len) in conn {
                    n += s
                        .feed(*dir, Segment::truncated(black_box(data), *len))
                        .len();
                }
                n += s.flush().len();
            }
            n
        })
    });
    g.finish();

    let mut g = c.benchmark_group("tns");
    g.throughput(Throughput::Bytes(REAL_CONNECT.len() as u64));
    g.bench_function("decode_connect", |b| {
        b.iter(|| tns::decode(black_box(REAL_CONNECT)).is_ok())
    });
    let desc = &REAL_CONNECT[84..];
    g.throughput(Throughput::Bytes(desc.len() as u64));
    g.bench_function("descriptor", |b| {
        b.iter(|| {
            Descriptor::parse_bytes(black_box(desc))
                .service_name()
                .is_some()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
