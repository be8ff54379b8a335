//! The fake TNS listener against the real python-oracledb thin client, on loopback.
//!
//! Needs python-oracledb (see droptrace_tests::oracle_client): these tests fail, not skip,
//! when it is missing. With DROPTRACE_WRITE_FIXTURES=1 the redirect test also refreshes the
//! captured-bytes fixtures under tracer-user/tests/fixtures/tns/.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use droptrace::decode::oracle::{Direction, Message, Segment, TnsStream};
use droptrace_tests::oracle_client::{Connect, MACHINE, OSUSER, Outcome, PROGRAM};
use droptrace_tests::tns_listener::{Behavior, FakeListener, Sent};

const SERVICE: &str = "ORCLPDB1";
/// A guard against a client that never gives up, not a timing assertion (the client reports
/// its own connect time): python's start alone took over 15 s in a loaded 5.10 VM.
const WAIT: Duration = Duration::from_secs(60);

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn start_client(listener: &FakeListener) -> Connect {
    let host = "127.0.0.1".parse().unwrap();
    Connect::start_here(host, listener.port(), SERVICE, 3.0)
}

/// Waits for the client to finish (killing it after `WAIT`) and returns its outcome.
fn finish(client: Connect) -> Outcome {
    let outcome = client.wait_within(WAIT);
    eprintln!("client outcome: {outcome:?}");
    outcome
}

/// Everything a captured byte run decodes to, fed as one segment.
fn decode(dir: Direction, bytes: &[u8]) -> Vec<Message> {
    let mut s = TnsStream::new();
    let msgs = s.feed(dir, Segment::new(bytes));
    assert_eq!(s.stats().malformed, 0, "{msgs:?}");
    msgs
}

fn fixture(name: &str, bytes: &[u8]) {
    if std::env::var_os("DROPTRACE_WRITE_FIXTURES").is_some() {
        let dir =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tracer-user/tests/fixtures/tns");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

#[test]
fn client_follows_split_redirect_to_second_port() {
    let database = FakeListener::accept_and_hang(loopback()).unwrap();
    let listener = FakeListener::redirect(loopback(), "127.0.0.1", database.port()).unwrap();
    let client = start_client(&listener);

    let db_seen = database.wait_for_connects(1, WAIT);
    let first = listener.seen();
    // Dropping the "database" closes the held socket: the client's deterministic end.
    drop(database);
    let outcome = finish(client);

    assert_eq!(first.connects.len(), 1, "{first:?}");
    let c1 = &first.connects[0];
    assert!(!c1.redirected());
    assert_eq!(c1.service_name(), Some(SERVICE));
    let (host, port, redirect_raw) = first.redirects().next().expect("a REDIRECT was sent");
    assert_eq!(host, "127.0.0.1");

    assert_eq!(
        db_seen.connects.len(),
        1,
        "client did not follow the redirect: {db_seen:?} {outcome:?}"
    );
    let c2 = &db_seen.connects[0];
    assert!(
        c2.redirected(),
        "second-leg CONNECT flags {:#04x}",
        c2.flags
    );
    assert_eq!(c2.service_name(), Some(SERVICE));
    assert!(!outcome.connected);
    assert!(outcome.error.contains("DPY-4011"), "{outcome:?}");

    // The parser on the real client's bytes.
    let msgs = decode(Direction::ToServer, &c1.raw);
    let [Message::Connect(c)] = &msgs[..] else {
        panic!("{msgs:?}")
    };
    assert_eq!(c.service_name.as_deref(), Some(SERVICE));
    assert_eq!(c.program.as_deref(), Some(PROGRAM));
    assert_eq!(c.client_host.as_deref(), Some(MACHINE));
    assert_eq!(c.client_user.as_deref(), Some(OSUSER));
    assert!(!c.redirected && !c.truncated);
    let msgs = decode(Direction::ToServer, &c2.raw);
    assert!(
        matches!(&msgs[..], [Message::Connect(c)] if c.redirected),
        "{msgs:?}"
    );
    let msgs = decode(Direction::ToClient, redirect_raw);
    let [Message::Redirect(r)] = &msgs[..] else {
        panic!("{msgs:?}")
    };
    assert_eq!((r.host.as_deref(), r.port), (Some("127.0.0.1"), Some(port)));
    assert!(r.split);

    fixture("python-oracledb-26.1.0-connect.bin", &c1.raw);
    fixture("python-oracledb-26.1.0-connect-redirected.bin", &c2.raw);
    fixture("fake-listener-redirect.bin", redirect_raw);
}

#[test]
fn refuse_12514_fails_immediately_with_dpy_6001() {
    let listener = FakeListener::refuse(loopback(), 12514).unwrap();
    let outcome = finish(start_client(&listener));
    assert!(!outcome.connected);
    assert!(outcome.error.contains("DPY-6001"), "{outcome:?}");
    assert!(
        outcome.elapsed < Duration::from_secs(2),
        "took {:?}",
        outcome.elapsed
    );

    let seen = listener.seen();
    assert_eq!(seen.connects.len(), 1);
    let Some(Sent::Refuse { raw, .. }) = seen.sent.first() else {
        panic!("{seen:?}")
    };
    let msgs = decode(Direction::ToClient, raw);
    assert!(
        matches!(&msgs[..], [Message::Refuse(r)] if r.code == Some(12514)),
        "{msgs:?}"
    );
}

#[test]
fn resend_makes_client_resend_and_go_on() {
    let listener = FakeListener::resend_then(loopback(), Behavior::Refuse { err: 12505 }).unwrap();
    let outcome = finish(start_client(&listener));
    let seen = listener.seen();
    assert_eq!(
        seen.accepted, 1,
        "the resent CONNECT must use the same socket"
    );
    assert_eq!(seen.connects.len(), 2, "{seen:?}");
    assert_eq!(seen.connects[0].raw, seen.connects[1].raw);
    assert!(matches!(
        seen.sent[..],
        [Sent::Resend, Sent::Refuse { err: 12505, .. }]
    ));
    // The client ends on the next behaviour (REFUSE 12505 -> DPY-6003), not on the RESEND.
    assert!(!outcome.connected);
    assert!(outcome.error.contains("DPY-6003"), "{outcome:?}");
    assert!(
        outcome.elapsed < Duration::from_secs(2),
        "took {:?}",
        outcome.elapsed
    );
}
