//! A fake Oracle Net listener for tests: speaks just enough TNS to make a real client (the
//! python-oracledb thin driver) REDIRECT, fail on a REFUSE, resend on a RESEND, or wait on a
//! "database" that never answers. It records what it received and sent.
//!
//! It frames packets itself, independently of droptrace's parser, so tests that feed its
//! captures to the parser check the parser against bytes it had no part in producing.
//!
//! Threads, not async: one accept thread per listener and one thread per connection, all
//! polling a stop flag (sockets have short timeouts), so dropping the listener stops and joins
//! everything within ~100 ms. The listening socket may be created by the caller (e.g. inside a
//! network namespace, via [`FakeListener::from_listener`]): sockets keep the namespace they were
//! made in, whichever thread later uses them.
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const TYPE_CONNECT: u8 = 1;
const TYPE_ACCEPT: u8 = 2;
const TYPE_REFUSE: u8 = 4;
const TYPE_REDIRECT: u8 = 5;
const TYPE_DATA: u8 = 6;
const TYPE_RESEND: u8 = 11;
/// REDIRECT header flag: the data is `address\0connect-data`.
const FLAG_REDIRECT_DATA: u8 = 0x02;
/// CONNECT header flag: sent after a REDIRECT.
pub const FLAG_REDIRECTED_CONNECT: u8 = 0x04;

/// How often blocked threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

/// What the listener answers to a CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// REDIRECT (split form) to `host:port`, echoing the client's connect data after the NUL as
    /// real listeners do; then wait for the client to close.
    Redirect { host: String, port: u16 },
    /// A listener handing out dynamic ports (Windows without USE_SHARED_SOCKET, shared-server
    /// dispatchers): the n-th accepted connection is REDIRECTed to `ports[n % len]`.
    RedirectEach { host: String, ports: Vec<u16> },
    /// REFUSE with `(DESCRIPTION=(TMP=)(VSNNUM=...)(ERR=err)(ERROR_STACK=...))`, then close.
    Refuse { err: u32 },
    /// RESEND, then treat the resent CONNECT with the inner behaviour.
    ResendThen(Box<Behavior>),
    /// Record the CONNECT and never answer; the socket is held until the client closes it or
    /// the listener is dropped. A client (python-oracledb has no read timeout here) then fails
    /// with DPY-4011 exactly when the test drops the listener, which keeps tests deterministic.
    AcceptAndHang,
    /// A healthy session: ACCEPT (version 319, laid out as python-oracledb thin reads it),
    /// then echo every DATA packet until the client closes, then close.
    Session,
}

impl Behavior {
    pub fn redirect(host: &str, port: u16) -> Self {
        Self::Redirect {
            host: host.to_string(),
            port,
        }
    }
}

/// One CONNECT as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedConnect {
    pub peer: SocketAddr,
    /// The CONNECT packet followed by the DATA packet carrying the connect data when the client
    /// sent it separately: exactly the bytes read from the socket.
    pub raw: Vec<u8>,
    /// CONNECT header flags (0x04: sent after a REDIRECT).
    pub flags: u8,
    pub connect_data: String,
}

impl ReceivedConnect {
    pub fn redirected(&self) -> bool {
        self.flags & FLAG_REDIRECTED_CONNECT != 0
    }

    /// SERVICE_NAME from the connect data (a plain substring match, case-insensitive key).
    pub fn service_name(&self) -> Option<&str> {
        let upper = self.connect_data.to_ascii_uppercase();
        let at = upper.find("(SERVICE_NAME=")? + "(SERVICE_NAME=".len();
        let rest = self.connect_data.get(at..)?;
        rest.get(..rest.find(')')?)
    }
}

/// What the listener sent in answer, packet bytes as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    Redirect {
        host: String,
        port: u16,
        /// The REDIRECT packet and the DATA packet after it.
        raw: Vec<u8>,
    },
    Refuse {
        err: u32,
        raw: Vec<u8>,
    },
    Resend,
    Accept,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Seen {
    /// TCP connections accepted.
    pub accepted: usize,
    pub connects: Vec<ReceivedConnect>,
    pub sent: Vec<Sent>,
    /// I/O and protocol errors on the listener's side (a client closing early shows up here).
    pub errors: Vec<String>,
}

impl Seen {
    pub fn redirects(&self) -> impl Iterator<Item = (&str, u16, &[u8])> {
        self.sent.iter().filter_map(|s| match s {
            Sent::Redirect { host, port, raw } => Some((host.as_str(), *port, raw.as_slice())),
            _ => None,
        })
    }
}

#[derive(Default)]
struct Shared {
    seen: Mutex<Seen>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn record(&self, f: impl FnOnce(&mut Seen)) {
        f(&mut lock(&self.seen));
        self.changed.notify_all();
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// A poisoned lock only means a connection thread panicked; what it recorded is still valid.
fn lock(m: &Mutex<Seen>) -> MutexGuard<'_, Seen> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fake listener; stops (closing every socket it holds) when dropped.
pub struct FakeListener {
    addr: SocketAddr,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl FakeListener {
    pub fn redirect(bind: SocketAddr, to_host: &str, to_port: u16) -> io::Result<Self> {
        Self::bind(bind, Behavior::redirect(to_host, to_port))
    }

    pub fn refuse(bind: SocketAddr, err: u32) -> io::Result<Self> {
        Self::bind(bind, Behavior::Refuse { err })
    }

    pub fn resend_then(bind: SocketAddr, next: Behavior) -> io::Result<Self> {
        Self::bind(bind, Behavior::ResendThen(Box::new(next)))
    }

    pub fn accept_and_hang(bind: SocketAddr) -> io::Result<Self> {
        Self::bind(bind, Behavior::AcceptAndHang)
    }

    pub fn bind(bind: SocketAddr, behavior: Behavior) -> io::Result<Self> {
        Self::from_listener(TcpListener::bind(bind)?, behavior)
    }

    /// Serves on a socket the caller bound (e.g. in another network namespace).
    pub fn from_listener(listener: TcpListener, behavior: Behavior) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let s = Arc::clone(&shared);
        let thread = thread::Builder::new()
            .name(format!("tns-listener-{}", addr.port()))
            .spawn(move || accept_loop(&listener, &behavior, &s))?;
        Ok(Self {
            addr,
            shared,
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A snapshot of everything recorded so far.
    pub fn seen(&self) -> Seen {
        lock(&self.shared.seen).clone()
    }

    /// Waits until `n` CONNECTs were recorded or `timeout` passed, and returns the snapshot
    /// either way (the caller asserts on it).
    pub fn wait_for_connects(&self, n: usize, timeout: Duration) -> Seen {
        self.wait_until(timeout, |s| s.connects.len() >= n)
    }

    /// Waits until `done` holds for the recorded state or `timeout` passed.
    pub fn wait_until(&self, timeout: Duration, done: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = Instant::now() + timeout;
        let mut seen = lock(&self.shared.seen);
        while !done(&seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            seen = match self.shared.changed.wait_timeout(seen, left) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        seen.clone()
    }
}

impl Drop for FakeListener {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, behavior: &Behavior, shared: &Arc<Shared>) {
    let mut conns = Vec::new();
    let mut accepted = 0usize;
    while !shared.stopping() {
        match listener.accept() {
            Ok((stream, peer)) => {
                shared.record(|s| s.accepted += 1);
                let b = match behavior {
                    Behavior::RedirectEach { host, ports } if !ports.is_empty() => {
                        Behavior::redirect(host, ports[accepted % ports.len()])
                    }
                    other => other.clone(),
                };
                accepted += 1;
                let s = Arc::clone(shared);
                let spawned = thread::Builder::new()
                    .name(format!("tns-conn-{}", peer.port()))
                    .spawn(move || {
                        if let Err(e) = serve(stream, peer, b, &s) {
                            s.record(|seen| seen.errors.push(format!("{peer}: {e}")));
                        }
                    });
                match spawned {
                    Ok(h) => conns.push(h),
                    Err(e) => shared.record(|s| s.errors.push(format!("spawn: {e}"))),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => thread::sleep(POLL / 5),
            Err(e) => {
                shared.record(|s| s.errors.push(format!("accept: {e}")));
                thread::sleep(POLL);
            }
        }
    }
    for h in conns {
        let _ = h.join();
    }
}

fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    mut behavior: Behavior,
    shared: &Shared,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(POLL))?;
    stream.set_nodelay(true)?;
    loop {
        let Some(connect) = read_connect(&mut stream, peer, shared)? else {
            return Ok(());
        };
        let connect_data = connect.connect_data.clone();
        shared.record(|s| s.connects.push(connect));
        match behavior {
            Behavior::Redirect { host, port } => {
                return send_redirect(&mut stream, host, port, &connect_data, shared);
            }
            // Behind a RESEND: the first port (the accept loop rotates only the outer one).
            Behavior::RedirectEach { host, ports } => {
                let port = ports.first().copied().unwrap_or_default();
                return send_redirect(&mut stream, host, port, &connect_data, shared);
            }
            Behavior::Refuse { err } => {
                let raw = refuse(err)?;
                stream.write_all(&raw)?;
                shared.record(|s| s.sent.push(Sent::Refuse { err, raw }));
                // Half-close and drain: closing with unread input would send a RST that can
                // overtake the REFUSE.
                stream.shutdown(Shutdown::Write)?;
                return hold(&mut stream, shared);
            }
            Behavior::ResendThen(next) => {
                stream.write_all(&packet(TYPE_RESEND, 0, &[])?)?;
                shared.record(|s| s.sent.push(Sent::Resend));
                behavior = *next;
            }
            Behavior::AcceptAndHang => return hold(&mut stream, shared),
            Behavior::Session => {
                stream.write_all(&accept())?;
                shared.record(|s| s.sent.push(Sent::Accept));
                return echo(&mut stream, shared);
            }
        }
    }
}

/// REDIRECT to `host:port` with the client's connect data, then wait for the client to close.
fn send_redirect(
    stream: &mut TcpStream,
    host: String,
    port: u16,
    connect_data: &str,
    shared: &Shared,
) -> io::Result<()> {
    let data = format!("(ADDRESS=(PROTOCOL=TCP)(HOST={host})(PORT={port}))\0{connect_data}");
    let raw = redirect_split(data.as_bytes())?;
    stream.write_all(&raw)?;
    shared.record(|s| s.sent.push(Sent::Redirect { host, port, raw }));
    hold(stream, shared)
}

/// Echoes DATA packets (the 4-byte length form a version >= 315 ACCEPT switches to) until
/// the peer closes or the listener stops.
fn echo(stream: &mut TcpStream, shared: &Shared) -> io::Result<()> {
    loop {
        let mut pkt = vec![0u8; 8];
        if !read_full(stream, &mut pkt, shared)? {
            return Ok(());
        }
        let len = u32::from_be_bytes([pkt[0], pkt[1], pkt[2], pkt[3]]) as usize;
        if !(8..=65_536).contains(&len) {
            return Err(io::Error::other(format!("packet length {len}")));
        }
        pkt.resize(len, 0);
        if !read_full(stream, &mut pkt[8..], shared)? {
            return Ok(());
        }
        stream.write_all(&pkt)?;
    }
}

/// Reads (and discards) until the peer closes or the listener stops.
fn hold(stream: &mut TcpStream, shared: &Shared) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    while !shared.stopping() {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            // The peer resetting a connection we are done with is not our error.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The next CONNECT and, when its connect data did not fit in it, the DATA packet with it.
/// `None` when the peer closed or the listener stopped first.
fn read_connect(
    stream: &mut TcpStream,
    peer: SocketAddr,
    shared: &Shared,
) -> io::Result<Option<ReceivedConnect>> {
    let Some(pkt) = read_packet(stream, shared)? else {
        return Ok(None);
    };
    let (ptype, flags) = (byte(&pkt, 4), byte(&pkt, 5));
    if ptype != TYPE_CONNECT {
        return Err(io::Error::other(format!(
            "expected CONNECT, got packet type {ptype}"
        )));
    }
    let cd_len = usize::from(be16(&pkt, 24));
    let cd_off = usize::from(be16(&pkt, 26));
    let mut raw = pkt.clone();
    let connect_data = if cd_len > 0 && pkt.len() <= cd_off {
        let Some(data) = read_packet(stream, shared)? else {
            return Ok(None);
        };
        if byte(&data, 4) != TYPE_DATA {
            return Err(io::Error::other(
                "CONNECT without inline data not followed by DATA",
            ));
        }
        raw.extend_from_slice(&data);
        data.get(10..).unwrap_or_default().to_vec()
    } else {
        pkt.get(cd_off..).unwrap_or_default().to_vec()
    };
    let connect_data = connect_data.get(..cd_len).unwrap_or(&connect_data);
    Ok(Some(ReceivedConnect {
        peer,
        raw,
        flags,
        connect_data: String::from_utf8_lossy(connect_data).into_owned(),
    }))
}

/// One packet (2-byte length form, used until the ACCEPT).
fn read_packet(stream: &mut TcpStream, shared: &Shared) -> io::Result<Option<Vec<u8>>> {
    let mut pkt = vec![0u8; 8];
    if !read_full(stream, &mut pkt, shared)? {
        return Ok(None);
    }
    let len = usize::from(be16(&pkt, 0));
    if len < 8 {
        return Err(io::Error::other(format!("packet length {len}")));
    }
    pkt.resize(len, 0);
    if !read_full(stream, &mut pkt[8..], shared)? {
        return Ok(None);
    }
    Ok(Some(pkt))
}

/// `read_exact` that keeps checking the stop flag; false on EOF or stop.
fn read_full(stream: &mut TcpStream, mut buf: &mut [u8], shared: &Shared) -> io::Result<bool> {
    while !buf.is_empty() {
        if shared.stopping() {
            return Ok(false);
        }
        match stream.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if is_timeout(&e) || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn byte(p: &[u8], at: usize) -> u8 {
    p.get(at).copied().unwrap_or(0)
}

fn be16(p: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([byte(p, at), byte(p, at + 1)])
}

fn packet(ptype: u8, flags: u8, body: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16_len(8 + body.len())?;
    let mut p = Vec::with_capacity(8 + body.len());
    p.extend_from_slice(&len.to_be_bytes());
    p.extend_from_slice(&[0, 0, ptype, flags, 0, 0]);
    p.extend_from_slice(body);
    Ok(p)
}

/// Packets before the ACCEPT have a 2-byte length; a client can send connect data that
/// would not fit once echoed in a REDIRECT.
fn u16_len(n: usize) -> io::Result<u16> {
    u16::try_from(n).map_err(|_| io::Error::other(format!("{n} bytes do not fit a TNS packet")))
}

/// REDIRECT `00 0A 00 00 05 02 00 00 N_hi N_lo`, then DATA `L_hi L_lo 00 00 06 00 00 00 00 00`
/// + data: the form real listeners send and the only one python-oracledb reads.
pub fn redirect_split(data: &[u8]) -> io::Result<Vec<u8>> {
    let n = u16_len(data.len())?;
    let mut p = packet(TYPE_REDIRECT, FLAG_REDIRECT_DATA, &n.to_be_bytes())?;
    let mut body = vec![0, 0];
    body.extend_from_slice(data);
    p.extend_from_slice(&packet(TYPE_DATA, 0, &body)?);
    Ok(p)
}

/// ACCEPT of protocol version 319, as python-oracledb thin parses it: version, service
/// options, SDU/TDU (16-bit), byte order, accept data length and offset, NSI flags (NA not
/// required), then the 32-bit SDU and TDU and, from version 315, the second flag word.
pub fn accept() -> Vec<u8> {
    let mut p = vec![0u8; 45];
    p[0..2].copy_from_slice(&45u16.to_be_bytes());
    p[4] = TYPE_ACCEPT;
    p[8..10].copy_from_slice(&319u16.to_be_bytes());
    p[10..12].copy_from_slice(&0x0001u16.to_be_bytes());
    p[12..14].copy_from_slice(&8192u16.to_be_bytes());
    p[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
    p[16..18].copy_from_slice(&0x0100u16.to_be_bytes());
    p[20..22].copy_from_slice(&45u16.to_be_bytes());
    p[22] = 0x04;
    p[23] = 0x04;
    p[32..36].copy_from_slice(&8192u32.to_be_bytes());
    p[36..40].copy_from_slice(&0xffffu32.to_be_bytes());
    p
}

/// A DATA packet after the ACCEPT (4-byte length), data flags 0.
pub fn data_wide(payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(10 + payload.len()).unwrap_or(u32::MAX);
    let mut p = len.to_be_bytes().to_vec();
    p.extend_from_slice(&[TYPE_DATA, 0, 0, 0, 0, 0]);
    p.extend_from_slice(payload);
    p
}

/// REFUSE as a listener sends it for an unknown service (12514) or SID (12505).
pub fn refuse(err: u32) -> io::Result<Vec<u8>> {
    let text = format!(
        "(DESCRIPTION=(TMP=)(VSNNUM=318767104)(ERR={err})(ERROR_STACK=(ERROR=(CODE={err})(EMFI=4))))"
    );
    let n = u16_len(text.len())?;
    // The reason bytes are informational; python-oracledb reads only the text.
    let mut body = vec![0x22, 0];
    body.extend_from_slice(&n.to_be_bytes());
    body.extend_from_slice(text.as_bytes());
    packet(TYPE_REFUSE, 0, &body)
}
