//! A healthy Oracle Net client for the tests: python-oracledb's real CONNECT bytes (captured
//! from python-oracledb 26.1.0), the listener's ACCEPT, DATA round trips, and a clean close
//! by the client. What a busy, healthy database client does all day, and what must leave the
//! default stream empty.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::{netns::Netns, tns_listener::data_wide};

/// python-oracledb 26.1.0's CONNECT (and the DATA packet carrying its descriptor).
const CONNECT: &[u8] =
    include_bytes!("../../tracer-user/tests/fixtures/tns/python-oracledb-26.1.0-connect.bin");

/// Runs `n` sessions one after the other from inside `ns` to `server` (a listener with
/// `Behavior::Session`), each with `round_trips` DATA exchanges. Returns how many completed.
pub fn run_sessions(
    ns: &Netns,
    server: SocketAddr,
    n: usize,
    round_trips: usize,
) -> io::Result<usize> {
    let path = format!("/var/run/netns/{}", ns.name);
    std::thread::spawn(move || -> io::Result<usize> {
        let f = std::fs::File::open(&path)?;
        // SAFETY: a valid netns fd; only this thread switches namespace, and it ends here.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut done = 0;
        for i in 0..n {
            session(server, round_trips, i)?;
            done += 1;
        }
        Ok(done)
    })
    .join()
    .map_err(|_| io::Error::other("session thread panicked"))?
}

fn session(server: SocketAddr, round_trips: usize, i: usize) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&server, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_nodelay(true)?;
    s.write_all(CONNECT)?;
    let mut head = [0u8; 8];
    s.read_exact(&mut head)?;
    if head[4] != 2 {
        return Err(io::Error::other(format!(
            "session {i}: expected ACCEPT, got packet type {}",
            head[4]
        )));
    }
    let mut rest = vec![0u8; usize::from(u16::from_be_bytes([head[0], head[1]])) - 8];
    s.read_exact(&mut rest)?;
    for r in 0..round_trips {
        let payload = format!("select {r} from dual /* session {i} */").into_bytes();
        let pkt = data_wide(&payload);
        s.write_all(&pkt)?;
        let mut back = vec![0u8; pkt.len()];
        s.read_exact(&mut back)?;
        if back != pkt {
            return Err(io::Error::other(format!("session {i}: echo differs")));
        }
    }
    // The client closes first, as sqlplus does on exit; the listener then closes too.
    s.shutdown(std::net::Shutdown::Write)?;
    let mut tail = Vec::new();
    s.read_to_end(&mut tail)?;
    Ok(())
}
