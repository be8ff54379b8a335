//! Any byte string through every TNS entry point: packet decode, descriptor parse, and the
//! stream reassembler under several segmentations, capture limits, retransmissions and
//! interleaved directions. The corpus holds raw handshake bytes (corpus/tns), so the
//! segmentations are fixed here rather than taken from the input.
#![no_main]

use droptrace::decode::oracle::descriptor::Descriptor;
use droptrace::decode::oracle::{Direction, Message, Segment, TnsStream, tns};
use libfuzzer_sys::fuzz_target;

/// (segment size, captured prefix per segment)
const CUTS: [(usize, usize); 6] = [
    (usize::MAX, usize::MAX),
    (1, 1),
    (7, 7),
    (37, 16),
    (74, 74),
    (600, 512),
];

fn check(s: &mut TnsStream, msgs: Vec<Message>, malformed: &mut u64) {
    *malformed += msgs
        .iter()
        .filter(|m| matches!(m, Message::Malformed(_)))
        .count() as u64;
    for m in &msgs {
        let _ = m.to_oracle();
    }
    assert_eq!(
        s.stats().malformed,
        *malformed,
        "malformed input must be counted"
    );
}

fuzz_target!(|data: &[u8]| {
    let _ = tns::decode(data);
    let _ = tns::Header::parse_with(data, true);
    let d = Descriptor::parse_bytes(data);
    let _ = (d.service_name(), d.program(), d.addresses(), d.err());

    for (size, cap) in CUTS {
        for variant in 0..3u32 {
            let mut s = TnsStream::new();
            let mut malformed = 0;
            let mut seq = 1000u32;
            for (i, chunk) in data.chunks(size.min(data.len().max(1))).enumerate() {
                let mut g = Segment::truncated(&chunk[..cap.min(chunk.len())], chunk.len());
                let dir = if variant == 2 && i % 2 == 1 {
                    Direction::ToClient
                } else {
                    Direction::ToServer
                };
                if variant == 1 {
                    g = g.with_seq(seq);
                    let m = s.feed(dir, g);
                    check(&mut s, m, &mut malformed);
                    // Retransmit every other segment.
                    if i % 2 == 0 {
                        let m = s.feed(dir, g);
                        check(&mut s, m, &mut malformed);
                    }
                    seq = seq.wrapping_add(chunk.len() as u32);
                    continue;
                }
                let m = s.feed(dir, g);
                check(&mut s, m, &mut malformed);
            }
            let m = s.flush();
            check(&mut s, m, &mut malformed);
        }
    }
});
