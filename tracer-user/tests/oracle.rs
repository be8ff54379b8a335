//! TNS parser properties (never panics, malformed input is counted, segmentation does not
//! change the result) and the bytes captured from the real python-oracledb client.
//!
//! Everything sits in `mod oracle` so `cargo test -p tracer-user oracle` selects it.
mod oracle {
    use droptrace::decode::oracle::descriptor::Descriptor;
    use droptrace::decode::oracle::tns::{self, FLAG_REDIRECTED_CONNECT, build};
    use droptrace::decode::oracle::{Direction, Message, Segment, TnsStream};
    use proptest::prelude::*;

    /// python-oracledb 26.1.0's CONNECT (74 bytes) and the DATA packet with its 231-byte
    /// descriptor, as read by the fake listener (tests/tests/tns_listener.rs).
    const REAL_CONNECT: &[u8] = include_bytes!("fixtures/tns/python-oracledb-26.1.0-connect.bin");
    /// The same client's CONNECT to the address the REDIRECT named (flag 0x04).
    const REAL_REDIRECTED: &[u8] =
        include_bytes!("fixtures/tns/python-oracledb-26.1.0-connect-redirected.bin");
    /// The split-form REDIRECT the fake listener sent (and python-oracledb followed).
    const FAKE_REDIRECT: &[u8] = include_bytes!("fixtures/tns/fake-listener-redirect.bin");

    /// Messages and the malformed count, flushing at the end like a daemon at flow end.
    fn run(dir: Direction, segs: &[Segment<'_>]) -> (Vec<Message>, u64) {
        let mut s = TnsStream::new();
        let mut msgs: Vec<Message> = segs.iter().flat_map(|g| s.feed(dir, *g)).collect();
        msgs.extend(s.flush());
        let malformed = msgs
            .iter()
            .filter(|m| matches!(m, Message::Malformed(_)))
            .count() as u64;
        assert_eq!(
            s.stats().malformed,
            malformed,
            "every malformed is both yielded and counted"
        );
        (msgs, malformed)
    }

    fn whole(dir: Direction, bytes: &[u8]) -> Vec<Message> {
        let (msgs, malformed) = run(dir, &[Segment::new(bytes)]);
        assert_eq!(malformed, 0, "{msgs:?}");
        msgs
    }

    /// Cuts `bytes` at the given (sorted, deduplicated) points.
    fn split_at<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        points.dedup();
        points.windows(2).map(|w| &bytes[w[0]..w[1]]).collect()
    }

    #[test]
    fn real_python_connect_fixture() {
        let msgs = whole(Direction::ToServer, REAL_CONNECT);
        let [Message::Connect(c)] = &msgs[..] else {
            panic!("{msgs:?}")
        };
        assert_eq!(c.version, 319);
        assert_eq!(c.service_name.as_deref(), Some("ORCLPDB1"));
        assert_eq!(c.program.as_deref(), Some("sqlplus"));
        assert_eq!(c.client_host.as_deref(), Some("app-7d9f8-x2x7q"));
        assert_eq!(c.client_user.as_deref(), Some("oracle"));
        assert!(!c.redirected && !c.truncated);
        // The descriptor went in a separate DATA packet, as the notes say.
        let (h, tns::Packet::Connect(p)) = tns::decode(REAL_CONNECT).unwrap() else {
            panic!()
        };
        assert_eq!(h.length, 74);
        assert!(p.data_follows() && usize::from(p.data_len) > tns::MAX_INLINE_CONNECT_DATA);

        let msgs = whole(Direction::ToServer, REAL_REDIRECTED);
        assert!(matches!(&msgs[..], [Message::Connect(c)] if c.redirected
            && c.service_name.as_deref() == Some("ORCLPDB1")));

        let msgs = whole(Direction::ToClient, FAKE_REDIRECT);
        let [Message::Redirect(r)] = &msgs[..] else {
            panic!("{msgs:?}")
        };
        assert_eq!(r.host.as_deref(), Some("127.0.0.1"));
        assert!(r.port.is_some() && r.split);
        assert_eq!(r.service_name.as_deref(), Some("ORCLPDB1"));
        let o = msgs[0].to_oracle().unwrap();
        assert_eq!(o.packet.as_deref(), Some("REDIRECT"));
        assert_eq!(o.redirect.unwrap().host, "127.0.0.1");
    }

    #[test]
    fn real_connect_every_two_way_split_and_every_capture_cut() {
        let expect = whole(Direction::ToServer, REAL_CONNECT);
        let mut first_connect = None;
        for cut in 0..=REAL_CONNECT.len() {
            let (a, b) = REAL_CONNECT.split_at(cut);
            let (msgs, _) = run(Direction::ToServer, &[Segment::new(a), Segment::new(b)]);
            assert_eq!(msgs, expect, "cut at {cut}");
            // Kernel capture limit: the first `cut` bytes of one segment.
            let (msgs, _) = run(
                Direction::ToServer,
                &[Segment::truncated(a, REAL_CONNECT.len())],
            );
            // A capture cut inside the DATA packet that carries the descriptor also reports
            // that packet as malformed; the CONNECT is still there.
            let connect = msgs.iter().find_map(|m| match m {
                Message::Connect(c) => Some(c),
                _ => None,
            });
            if let Some(c) = connect {
                first_connect.get_or_insert(cut);
                if let Some(s) = &c.service_name {
                    assert_eq!(s, "ORCLPDB1");
                }
                assert_eq!(c.truncated, cut < REAL_CONNECT.len(), "cut at {cut}");
            } else {
                assert!(
                    first_connect.is_none(),
                    "a {cut}-byte capture lost the CONNECT"
                );
            }
        }
        // From the fixed part of a CONNECT (header and fields before the descriptor) on,
        // every capture gives it.
        let first = first_connect.expect("some capture gives the CONNECT");
        assert!(first <= 64, "the CONNECT needed {first} bytes");
        // A 512-byte capture limit leaves this exchange whole.
        let (msgs, _) = run(
            Direction::ToServer,
            &[Segment::truncated(
                &REAL_CONNECT[..REAL_CONNECT.len().min(512)],
                REAL_CONNECT.len(),
            )],
        );
        assert_eq!(msgs, expect);
    }

    #[test]
    fn descriptor_fixture_text() {
        let data = &REAL_CONNECT[84..];
        let d = Descriptor::parse_bytes(data);
        assert_eq!(d.find("TRANSPORT_CONNECT_TIMEOUT"), Some("3"));
        assert_eq!(
            d.first_address().unwrap().host.as_deref(),
            Some("127.0.0.1")
        );
    }

    /// A plausible handshake packet sequence in one direction, with what it should yield.
    fn handshake() -> impl Strategy<Value = (Direction, Vec<u8>)> {
        let name = "[A-Za-z0-9_.-]{1,40}";
        let client = (name, name, name, name, proptest::bool::ANY, 0usize..300).prop_map(
            |(svc, prog, host, user, redirected, pad)| {
                let desc = format!(
                    "(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME={svc})(CID=(PROGRAM={prog})\
                     (HOST={host})(USER={user}))(CONNECTION_ID={}))\
                     (ADDRESS=(PROTOCOL=tcp)(HOST=db)(PORT=1521)))",
                    "x".repeat(pad)
                );
                let flags = if redirected {
                    FLAG_REDIRECTED_CONNECT
                } else {
                    0
                };
                let mut wire = build::connect(desc.as_bytes(), flags);
                // A RESEND makes clients send the same CONNECT again.
                wire.extend_from_slice(&build::connect(desc.as_bytes(), flags));
                (Direction::ToServer, wire)
            },
        );
        let server =
            (name, any::<u16>(), 0u32..100_000, 0u8..5).prop_map(|(host, port, err, kind)| {
                let redirect =
                    format!("(ADDRESS=(PROTOCOL=TCP)(HOST={host})(PORT={port}))\0(DESCRIPTION=)");
                let wire = match kind {
                    0 => build::redirect_split(redirect.as_bytes()),
                    1 => build::redirect_inline(redirect.as_bytes()),
                    2 => build::refuse(format!("(DESCRIPTION=(TMP=)(ERR={err}))").as_bytes()),
                    3 => [build::resend(), build::refuse(b"(ERR=12514)")].concat(),
                    _ => [build::resend(), build::accept(319), vec![0xff; 64]].concat(),
                };
                (Direction::ToClient, wire)
            });
        prop_oneof![client, server]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..1200),
            cuts in proptest::collection::vec(any::<usize>(), 0..8),
            caps in proptest::collection::vec(any::<usize>(), 8),
            seq in proptest::option::of(any::<u32>()),
        ) {
            let _ = tns::decode(&bytes);
            let _ = Descriptor::parse_bytes(&bytes);
            for dir in [Direction::ToServer, Direction::ToClient] {
                let mut s = TnsStream::new();
                let mut next = seq;
                for (i, part) in split_at(&bytes, &cuts).into_iter().enumerate() {
                    let cap = caps[i % caps.len()] % (part.len() + 1);
                    let mut g = Segment::truncated(&part[..cap], part.len());
                    if let Some(n) = next {
                        g = g.with_seq(n);
                        // Replay some segments as retransmissions.
                        next = Some(if cap % 3 == 0 { n } else { n.wrapping_add(part.len() as u32) });
                    }
                    let _ = s.feed(dir, g);
                }
                let _ = s.flush();
            }
        }

        #[test]
        fn segmentation_does_not_change_messages(
            (dir, wire) in handshake(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let expect = whole(dir, &wire);
            prop_assert!(!expect.is_empty());
            let segs: Vec<Segment<'_>> = split_at(&wire, &cuts).into_iter().map(Segment::new).collect();
            let (msgs, malformed) = run(dir, &segs);
            prop_assert_eq!(malformed, 0);
            prop_assert_eq!(msgs, expect);
        }

        #[test]
        fn retransmits_with_seq_do_not_change_messages(
            (dir, wire) in handshake(),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
            replay in proptest::collection::vec(any::<bool>(), 12),
            isn in any::<u32>(),
        ) {
            let expect = whole(dir, &wire);
            let mut segs = Vec::new();
            let mut at = 0u32;
            for (i, part) in split_at(&wire, &cuts).into_iter().enumerate() {
                let g = Segment::new(part).with_seq(isn.wrapping_add(at));
                segs.push(g);
                if replay[i % replay.len()] {
                    segs.push(g);
                }
                at += part.len() as u32;
            }
            let (msgs, malformed) = run(dir, &segs);
            prop_assert_eq!(malformed, 0);
            prop_assert_eq!(msgs, expect);
        }

        #[test]
        fn truncations_of_valid_packets(
            (dir, wire) in handshake(),
            cut in any::<usize>(),
            cap in any::<usize>(),
        ) {
            let cut = cut % (wire.len() + 1);
            // The stream simply ends early ...
            let _ = run(dir, &[Segment::new(&wire[..cut])]);
            // ... or the capture stops early within a segment of known length.
            let cap = cap % (wire.len() + 1);
            let (msgs, _) = run(dir, &[Segment::truncated(&wire[..cap], wire.len())]);
            // Whatever is not flagged as cut short must be exactly what the full capture gives.
            let expect = whole(dir, &wire);
            for m in &msgs {
                let cut_short = match m {
                    Message::Connect(c) => c.truncated,
                    Message::Refuse(r) => r.truncated,
                    Message::Redirect(r) => r.truncated,
                    Message::Malformed(_) => true,
                    Message::Accept { .. } | Message::Resend => false,
                };
                prop_assert!(cut_short || expect.contains(m), "{:?} not in {:?}", m, expect);
            }
        }

        #[test]
        fn oversized_and_mutated_packets(
            (dir, wire) in handshake(),
            length in any::<u16>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cuts in proptest::collection::vec(any::<usize>(), 0..4),
        ) {
            let mut oversized = wire.clone();
            oversized[..2].copy_from_slice(&length.to_be_bytes());
            let mut mutated = wire.clone();
            for (at, b) in &flips {
                let i = at % mutated.len();
                mutated[i] = *b;
            }
            for bytes in [&oversized, &mutated] {
                let segs: Vec<Segment<'_>> = split_at(bytes, &cuts).into_iter().map(Segment::new).collect();
                let _ = run(dir, &segs);
                let _ = tns::decode(bytes);
            }
        }

        #[test]
        fn descriptor_fields_roundtrip(
            svc in "[A-Za-z0-9_.-]{1,30}",
            prog in "[A-Za-z0-9_./ -]{1,30}",
            host in "[a-z0-9.-]{1,30}",
            port in any::<u16>(),
            spaces in "[ \t\n]{0,2}",
        ) {
            let s = &spaces;
            let text = format!(
                "({s}description{s}={s}(address_list=(ADDRESS=(PROTOCOL=TCP)(HOST={s}{host}{s})(PORT={port})))\
                 (CONNECT_DATA=(Service_Name=\"{svc}\")(CID=(PROGRAM={prog})(HOST=h)(USER=u))))"
            );
            let d = Descriptor::parse(&text);
            prop_assert_eq!(d.service_name(), Some(svc.as_str()));
            prop_assert_eq!(d.program(), Some(prog.trim()).filter(|p| !p.is_empty()));
            let a = d.first_address().unwrap();
            prop_assert_eq!(a.host.as_deref(), Some(host.as_str()));
            prop_assert_eq!(a.port, Some(port));
        }
    }
}
