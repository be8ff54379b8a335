//! Per-connection reassembly of the TNS handshake from captured TCP segment payloads.
//!
//! The kernel hands over each segment's payload, or only a bounded prefix of it, per direction.
//! A [`TnsStream`] frames TNS packets across and within segments, joins the two-packet forms
//! (CONNECT + DATA with the descriptor, REDIRECT + DATA with the address), and yields one
//! [`Message`] per meaningful packet. Missing bytes (a truncated capture, a segment the kernel
//! never reported) are tracked as gaps: a packet cut by one is decoded from what was captured,
//! and when a gap swallows a packet boundary the stream resynchronises on the next segment
//! that starts with a plausible header. Once the server ACCEPTs, the handshake is over and the
//! stream ignores everything after (those packets are session traffic, framed differently).
use std::mem;

use super::descriptor::{self, Address, Descriptor};
use super::tns::{self, Header, Packet, TnsError};
use crate::event;

/// Bytes of one unfinished packet kept per direction. Handshake packets are a few hundred bytes;
/// a longer one is decoded from this prefix and the rest skipped, which bounds memory per flow.
pub const MAX_PACKET_PREFIX: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client to listener/database.
    ToServer,
    /// Listener/database to client.
    ToClient,
}

/// One TCP segment's payload as captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment<'a> {
    /// The captured bytes: the whole payload or a prefix of it.
    pub data: &'a [u8],
    /// The payload's real length (at least `data.len()`); the difference is a gap.
    pub len: usize,
    /// TCP sequence number of the first payload byte. With it, retransmitted bytes are dropped
    /// and segments the capture missed become gaps; without it, segments are taken as
    /// contiguous.
    pub seq: Option<u32>,
}

impl<'a> Segment<'a> {
    /// A completely captured payload.
    pub fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            len: data.len(),
            seq: None,
        }
    }

    /// A payload of `len` bytes of which `data` is the captured prefix.
    pub fn truncated(data: &'a [u8], len: usize) -> Self {
        Self {
            data,
            len: len.max(data.len()),
            seq: None,
        }
    }

    pub fn with_seq(self, seq: u32) -> Self {
        Self {
            seq: Some(seq),
            ..self
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConnectInfo {
    pub version: u16,
    /// Flag 0x04: this CONNECT follows a REDIRECT (the second leg).
    pub redirected: bool,
    pub service_name: Option<String>,
    pub sid: Option<String>,
    pub program: Option<String>,
    pub client_host: Option<String>,
    pub client_user: Option<String>,
    /// The connect data as captured (lossy UTF-8).
    pub descriptor: String,
    /// The connect data was cut short (capture limit or a gap), or never arrived.
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RefuseInfo {
    pub user_reason: u8,
    pub system_reason: u8,
    /// ERR=NNNNN, e.g. 12514 (service not known to the listener).
    pub code: Option<u32>,
    /// The refuse data as captured (lossy UTF-8).
    pub text: String,
    pub truncated: bool,
}

impl RefuseInfo {
    /// The TNS message for `code`, when it is one of the well-known listener errors.
    pub fn message(&self) -> Option<&'static str> {
        self.code.and_then(descriptor::tns_error_text)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RedirectInfo {
    /// From the first ADDRESS: where the client goes next.
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Every ADDRESS in the redirect data.
    pub addresses: Vec<Address>,
    /// SERVICE_NAME of the connect data after the NUL, if any.
    pub service_name: Option<String>,
    /// Data came in a following DATA packet (what real listeners send).
    pub split: bool,
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Connect(ConnectInfo),
    Accept {
        version: u16,
    },
    Refuse(RefuseInfo),
    Redirect(RedirectInfo),
    Resend,
    /// Bytes that could not be decoded; also tallied in [`Stats::malformed`].
    Malformed(TnsError),
}

impl Message {
    /// The droptrace.v1 `oracle` section for this message (the caller adds `listener`);
    /// `None` for [`Message::Malformed`].
    pub fn to_oracle(&self) -> Option<event::Oracle> {
        let mut o = event::Oracle::default();
        let packet = match self {
            Message::Connect(c) => {
                o.service_name.clone_from(&c.service_name);
                o.sid.clone_from(&c.sid);
                o.program.clone_from(&c.program);
                o.client_host.clone_from(&c.client_host);
                o.client_user.clone_from(&c.client_user);
                tns::PacketType::Connect
            }
            Message::Accept { .. } => tns::PacketType::Accept,
            Message::Refuse(r) => {
                o.refuse = Some(event::Refuse {
                    code: r.code,
                    text: r.text.clone(),
                });
                tns::PacketType::Refuse
            }
            Message::Redirect(r) => {
                o.service_name.clone_from(&r.service_name);
                o.redirect = r
                    .host
                    .clone()
                    .zip(r.port)
                    .map(|(host, port)| event::HostPort { host, port });
                tns::PacketType::Redirect
            }
            Message::Resend => tns::PacketType::Resend,
            Message::Malformed(_) => return None,
        };
        o.packet = Some(packet.as_str().to_string());
        Some(o)
    }
}

/// Counters over the life of a stream; `malformed` is what the daemon reports as lost input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// TNS packets framed (complete or cut).
    pub packets: u64,
    /// Packets or byte runs that could not be decoded.
    pub malformed: u64,
    /// Packets decoded from a prefix because the rest was not captured.
    pub truncated: u64,
    /// Runs of payload bytes that were never captured.
    pub gaps: u64,
    /// Retransmitted payload bytes dropped (only with [`Segment::seq`]).
    pub retransmitted_bytes: u64,
}

/// Reassembly state of one TCP connection (both directions).
#[derive(Debug, Default)]
pub struct TnsStream {
    to_server: Half,
    to_client: Half,
    accepted: bool,
    stats: Stats,
}

impl TnsStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next segment of `dir` and returns the messages it completed (usually none or
    /// one).
    pub fn feed(&mut self, dir: Direction, seg: Segment<'_>) -> Vec<Message> {
        let mut out = Out {
            msgs: Vec::new(),
            stats: &mut self.stats,
            accepted: self.accepted,
        };
        if !out.accepted {
            let half = match dir {
                Direction::ToServer => &mut self.to_server,
                Direction::ToClient => &mut self.to_client,
            };
            half.feed(seg, &mut out);
        }
        self.accepted = out.accepted;
        out.msgs
    }

    /// Gives up waiting for the DATA packet a CONNECT or REDIRECT announced (call it when the
    /// flow ends or is reported as stalled): a CONNECT comes out without its descriptor and
    /// `truncated`, a REDIRECT as malformed.
    pub fn flush(&mut self) -> Vec<Message> {
        let mut out = Out {
            msgs: Vec::new(),
            stats: &mut self.stats,
            accepted: self.accepted,
        };
        for half in [&mut self.to_server, &mut self.to_client] {
            if let Some(p) = half.pending.take() {
                p.abandon("end of stream", &mut out);
            }
        }
        out.msgs
    }

    /// The server sent ACCEPT: the handshake is over and further input is ignored.
    pub fn accepted(&self) -> bool {
        self.accepted
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }
}

/// Where messages go while a segment is processed.
struct Out<'s> {
    msgs: Vec<Message>,
    stats: &'s mut Stats,
    accepted: bool,
}

impl Out<'_> {
    fn push(&mut self, m: Message) {
        if matches!(m, Message::Malformed(_)) {
            self.stats.malformed += 1;
        }
        self.msgs.push(m);
    }
}

/// A packet that announced its data in the next DATA packet.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Connect {
        version: u16,
        redirected: bool,
        data_len: u16,
    },
    Redirect {
        data_len: u16,
    },
}

impl Pending {
    fn complete(self, payload: &[u8], out: &mut Out<'_>) {
        match self {
            Pending::Connect {
                version,
                redirected,
                data_len,
            } => out.push(Message::Connect(connect_info(
                version, redirected, payload, data_len,
            ))),
            Pending::Redirect { data_len } => out.push(redirect_message(payload, data_len, true)),
        }
    }

    /// The DATA did not come: `next` names what came instead.
    fn abandon(self, next: &'static str, out: &mut Out<'_>) {
        match self {
            Pending::Connect {
                version,
                redirected,
                ..
            } => out.push(Message::Connect(ConnectInfo {
                version,
                redirected,
                truncated: true,
                ..ConnectInfo::default()
            })),
            Pending::Redirect { .. } => {
                out.push(Message::Malformed(TnsError::RedirectDataMissing(next)))
            }
        }
    }
}

/// One direction of a connection.
#[derive(Debug, Default)]
struct Half {
    /// Bytes of an unfinished packet, starting at its header.
    buf: Vec<u8>,
    /// Bytes still to come of a packet already decoded from its prefix.
    skip: usize,
    /// The position of the next packet boundary is unknown.
    lost: bool,
    next_seq: Option<u32>,
    pending: Option<Pending>,
}

impl Half {
    fn feed(&mut self, seg: Segment<'_>, out: &mut Out<'_>) {
        let mut data = seg.data;
        let mut len = seg.len.max(data.len());
        if let Some(seq) = seg.seq {
            let mut first = seq;
            if let Some(next) = self.next_seq {
                // Serial-number arithmetic: TCP sequence numbers wrap.
                let ahead = seq.wrapping_sub(next) as i32;
                if ahead < 0 {
                    let dup = ahead.unsigned_abs() as usize;
                    let dropped = dup.min(len);
                    out.stats.retransmitted_bytes += dropped as u64;
                    if dup >= len {
                        return;
                    }
                    data = data.get(dup..).unwrap_or_default();
                    len -= dup;
                    first = next;
                } else if ahead > 0 {
                    self.gap(ahead.unsigned_abs() as usize, out);
                }
            }
            let end = first.wrapping_add(u32::try_from(len).unwrap_or(u32::MAX));
            self.next_seq = Some(end);
        }
        if len == 0 {
            return;
        }
        self.bytes(data, out);
        let missing = len - data.len();
        if missing > 0 {
            self.gap(missing, out);
        }
    }

    /// Captured bytes that follow the stream so far.
    fn bytes(&mut self, mut data: &[u8], out: &mut Out<'_>) {
        if data.is_empty() {
            return;
        }
        if self.lost {
            // Segments usually start with a packet, so the first one after a loss that looks like
            // a clean header is taken as a boundary. Checksums are always 0 before the ACCEPT,
            // which makes garbage unlikely to pass.
            match Header::parse(data) {
                Ok(h) if h.packet_checksum == 0 && h.header_checksum == 0 => self.lost = false,
                Ok(_) => return out.push(Message::Malformed(TnsError::Checksum)),
                Err(e) => return out.push(Message::Malformed(e)),
            }
        }
        let skipped = self.skip.min(data.len());
        self.skip -= skipped;
        data = data.get(skipped..).unwrap_or_default();
        if data.is_empty() {
            return;
        }
        if self.buf.is_empty() {
            // Common case: the segment starts with a packet; frame it without copying.
            let used = self.frame(data, out);
            if !self.lost {
                self.buf
                    .extend_from_slice(data.get(used..).unwrap_or_default());
            }
        } else {
            let mut buf = mem::take(&mut self.buf);
            buf.extend_from_slice(data);
            let used = self.frame(&buf, out);
            if self.lost {
                buf.clear();
            } else {
                buf.drain(..used.min(buf.len()));
            }
            self.buf = buf;
        }
    }

    /// Decodes the complete packets at the start of `bytes` and returns how many bytes they
    /// took; an oversized unfinished packet is decoded from its prefix and all of it is taken.
    fn frame(&mut self, bytes: &[u8], out: &mut Out<'_>) -> usize {
        let mut at = 0;
        while let Some(rest) = bytes.get(at..).filter(|r| r.len() >= tns::HEADER_LEN) {
            if out.accepted {
                // Session traffic follows; nothing more to frame.
                return bytes.len();
            }
            let h = match Header::parse(rest) {
                Ok(h) => h,
                Err(e) => {
                    out.push(Message::Malformed(e));
                    self.lose();
                    return bytes.len();
                }
            };
            if let Some(pkt) = rest.get(..h.length) {
                self.packet(pkt, true, out);
                at += h.length;
            } else if rest.len() >= MAX_PACKET_PREFIX {
                self.packet(rest, false, out);
                self.skip = h.length - rest.len();
                return bytes.len();
            } else {
                break;
            }
        }
        at
    }

    /// `n` payload bytes that were never captured.
    fn gap(&mut self, n: usize, out: &mut Out<'_>) {
        let skipped = self.skip.min(n);
        self.skip -= skipped;
        let n = n - skipped;
        if n == 0 {
            return;
        }
        out.stats.gaps += 1;
        if self.lost {
            return;
        }
        if self.buf.is_empty() {
            // The gap starts a packet whose header nobody saw.
            return self.lose();
        }
        let buf = mem::take(&mut self.buf);
        match Header::parse(&buf) {
            Ok(h) => {
                let remaining = h.length.saturating_sub(buf.len());
                self.packet(&buf, false, out);
                if n < remaining {
                    self.skip = remaining - n;
                } else if n > remaining {
                    self.lose();
                }
                // Reuse the allocation.
                self.buf = buf;
                self.buf.clear();
            }
            Err(e) => {
                out.push(Message::Malformed(e));
                self.lose();
            }
        }
    }

    fn lose(&mut self) {
        self.buf.clear();
        self.skip = 0;
        self.lost = true;
    }

    /// One framed packet; `complete` is false when only a prefix was captured.
    fn packet(&mut self, pkt: &[u8], complete: bool, out: &mut Out<'_>) {
        if out.accepted {
            return;
        }
        out.stats.packets += 1;
        if !complete {
            out.stats.truncated += 1;
        }
        let packet = match tns::decode(pkt) {
            Ok((_, p)) => p,
            Err(e) => return out.push(Message::Malformed(e)),
        };
        if let Some(p) = self.pending.take() {
            if let Packet::Data(d) = packet {
                return p.complete(d.payload, out);
            }
            p.abandon(packet_name(&packet), out);
        }
        match packet {
            Packet::Connect(c) if c.data_follows() => {
                self.pending = Some(Pending::Connect {
                    version: c.version,
                    redirected: c.redirected(),
                    data_len: c.data_len,
                })
            }
            Packet::Connect(c) => out.push(Message::Connect(connect_info(
                c.version,
                c.redirected(),
                c.data.unwrap_or_default(),
                c.data_len,
            ))),
            Packet::Accept(a) => {
                out.push(Message::Accept { version: a.version });
                out.accepted = true;
            }
            Packet::Refuse(r) => {
                let d = Descriptor::parse_bytes(r.data);
                out.push(Message::Refuse(RefuseInfo {
                    user_reason: r.user_reason,
                    system_reason: r.system_reason,
                    code: d.err().or_else(|| descriptor::scan_err(r.data)),
                    text: String::from_utf8_lossy(r.data).into_owned(),
                    truncated: r.data.len() < usize::from(r.data_len),
                }))
            }
            Packet::Redirect(r) => match r.data {
                Some(d) => out.push(redirect_message(d, r.data_len, false)),
                None => {
                    self.pending = Some(Pending::Redirect {
                        data_len: r.data_len,
                    })
                }
            },
            Packet::Resend => out.push(Message::Resend),
            // DATA outside the two-packet forms and framing-only packets carry nothing for us.
            Packet::Data(_) | Packet::Other(_) => {}
        }
    }
}

fn packet_name(p: &Packet<'_>) -> &'static str {
    use tns::PacketType as T;
    match p {
        Packet::Connect(_) => T::Connect,
        Packet::Accept(_) => T::Accept,
        Packet::Refuse(_) => T::Refuse,
        Packet::Redirect(_) => T::Redirect,
        Packet::Resend => T::Resend,
        Packet::Data(_) => T::Data,
        Packet::Other(t) => *t,
    }
    .as_str()
}

/// Connect data as captured; `declared` is the length the CONNECT announced.
fn connect_info(version: u16, redirected: bool, data: &[u8], declared: u16) -> ConnectInfo {
    let data = data.get(..usize::from(declared)).unwrap_or(data);
    let d = Descriptor::parse_bytes(data);
    let own = |s: Option<&str>| s.map(str::to_string);
    ConnectInfo {
        version,
        redirected,
        service_name: own(d.service_name()),
        sid: own(d.sid()),
        program: own(d.program()),
        client_host: own(d.client_host()),
        client_user: own(d.client_user()),
        descriptor: String::from_utf8_lossy(data).into_owned(),
        truncated: data.len() < usize::from(declared),
    }
}

/// Redirect data: `address\0connect-data` (the NUL and connect data may be absent).
fn redirect_message(data: &[u8], declared: u16, split: bool) -> Message {
    let data = data.get(..usize::from(declared)).unwrap_or(data);
    let (addr, connect_data) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (
            data.get(..nul).unwrap_or_default(),
            data.get(nul + 1..).unwrap_or_default(),
        ),
        None => (data, &[][..]),
    };
    let addresses = Descriptor::parse_bytes(addr).addresses();
    let Some(first) = addresses
        .iter()
        .find(|a| a.host.is_some() || a.port.is_some())
        .cloned()
    else {
        return Message::Malformed(TnsError::RedirectWithoutAddress);
    };
    Message::Redirect(RedirectInfo {
        host: first.host,
        port: first.port,
        addresses,
        service_name: Descriptor::parse_bytes(connect_data)
            .service_name()
            .map(str::to_string),
        split,
        truncated: data.len() < usize::from(declared),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::oracle::tns::{FLAG_REDIRECTED_CONNECT, build};

    /// What python-oracledb sends for `127.0.0.1:1521/ORCLPDB1` (232 bytes: goes in a DATA
    /// packet).
    const DESC: &[u8] = b"(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME=ORCLPDB1)(CID=(PROGRAM=sqlplus)\
(HOST=app-5f7c9d-x2x7q.orders.svc.cluster.local)(USER=oracle))(CONNECTION_ID=Zm9vYmFyYmF6cXV4cXV1eA==Zm9vYmFy))\
(ADDRESS=(PROTOCOL=tcp)(HOST=10.96.14.3)(PORT=1521)))";
    const REDIRECT: &[u8] =
        b"(ADDRESS=(PROTOCOL=TCP)(HOST=10.2.0.17)(PORT=40211))\0(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME=ORCLPDB1)))";

    fn feed_all(s: &mut TnsStream, dir: Direction, segs: &[&[u8]]) -> Vec<Message> {
        segs.iter()
            .flat_map(|d| s.feed(dir, Segment::new(d)))
            .collect()
    }

    fn connect_of(msgs: &[Message]) -> &ConnectInfo {
        match msgs {
            [Message::Connect(c)] => c,
            other => panic!("expected one CONNECT, got {other:?}"),
        }
    }

    #[test]
    fn connect_with_descriptor_in_data_packet() {
        assert!(DESC.len() > tns::MAX_INLINE_CONNECT_DATA);
        let wire = build::connect(DESC, 0);
        // One segment, the two writes as two segments, and byte by byte.
        let whole = feed_all(&mut TnsStream::new(), Direction::ToServer, &[&wire]);
        let two = feed_all(
            &mut TnsStream::new(),
            Direction::ToServer,
            &[&wire[..74], &wire[74..]],
        );
        let bytes: Vec<&[u8]> = wire.chunks(1).collect();
        let mut s = TnsStream::new();
        let single = feed_all(&mut s, Direction::ToServer, &bytes);
        assert_eq!(whole, two);
        assert_eq!(whole, single);
        assert_eq!(s.stats().malformed, 0);
        let c = connect_of(&whole);
        assert_eq!(c.service_name.as_deref(), Some("ORCLPDB1"));
        assert_eq!(c.program.as_deref(), Some("sqlplus"));
        assert_eq!(
            c.client_host.as_deref(),
            Some("app-5f7c9d-x2x7q.orders.svc.cluster.local")
        );
        assert_eq!(c.client_user.as_deref(), Some("oracle"));
        assert_eq!((c.version, c.redirected, c.truncated), (319, false, false));
        let o = whole[0].to_oracle().unwrap();
        assert_eq!(o.packet.as_deref(), Some("CONNECT"));
        assert_eq!(o.service_name.as_deref(), Some("ORCLPDB1"));
    }

    #[test]
    fn short_connect_inline_and_redirected_flag() {
        let wire = build::connect(
            b"(DESCRIPTION=(CONNECT_DATA=(SID=XE)))",
            FLAG_REDIRECTED_CONNECT,
        );
        let msgs = TnsStream::new().feed(Direction::ToServer, Segment::new(&wire));
        let c = connect_of(&msgs);
        assert_eq!((c.sid.as_deref(), c.redirected), (Some("XE"), true));
    }

    #[test]
    fn redirect_split_and_inline() {
        let split = build::redirect_split(REDIRECT);
        for segs in [vec![&split[..]], vec![&split[..10], &split[10..]]] {
            let msgs = feed_all(&mut TnsStream::new(), Direction::ToClient, &segs);
            let [Message::Redirect(r)] = &msgs[..] else {
                panic!("{msgs:?}")
            };
            assert_eq!(
                (r.host.as_deref(), r.port),
                (Some("10.2.0.17"), Some(40211))
            );
            assert_eq!(r.service_name.as_deref(), Some("ORCLPDB1"));
            assert!(r.split && !r.truncated);
            let o = msgs[0].to_oracle().unwrap();
            assert_eq!(
                o.redirect,
                Some(event::HostPort {
                    host: "10.2.0.17".into(),
                    port: 40211
                })
            );
        }
        let msgs = TnsStream::new().feed(
            Direction::ToClient,
            Segment::new(&build::redirect_inline(REDIRECT)),
        );
        assert!(matches!(&msgs[..], [Message::Redirect(r)] if !r.split && r.port == Some(40211)));
    }

    #[test]
    fn refuse_resend_accept() {
        let mut s = TnsStream::new();
        let refuse = build::refuse(
            b"(DESCRIPTION=(TMP=)(VSNNUM=0)(ERR=12514)(ERROR_STACK=(ERROR=(CODE=12514)(EMFI=4))))",
        );
        let msgs = s.feed(Direction::ToClient, Segment::new(&refuse));
        let [Message::Refuse(r)] = &msgs[..] else {
            panic!("{msgs:?}")
        };
        assert_eq!(r.code, Some(12514));
        assert!(r.message().unwrap().contains("service requested"));

        let mut s = TnsStream::new();
        let connect = build::connect(DESC, 0);
        assert_eq!(s.feed(Direction::ToServer, Segment::new(&connect)).len(), 1);
        assert_eq!(
            s.feed(Direction::ToClient, Segment::new(&build::resend())),
            [Message::Resend]
        );
        assert_eq!(s.feed(Direction::ToServer, Segment::new(&connect)).len(), 1);
        let accept = build::accept(319);
        let mut after = accept.clone();
        after.extend_from_slice(&[0xde; 40]);
        assert_eq!(
            s.feed(Direction::ToClient, Segment::new(&after)),
            [Message::Accept { version: 319 }]
        );
        assert!(s.accepted());
        // Session traffic after the ACCEPT is not framed (it may use 4-byte lengths).
        assert!(
            s.feed(Direction::ToServer, Segment::new(&[0xff; 100]))
                .is_empty()
        );
        assert_eq!(s.stats().malformed, 0);
    }

    #[test]
    fn truncated_capture_reports_prefix_and_stays_in_sync() {
        // A descriptor too long for the capture: 600 bytes in the DATA packet.
        let long: Vec<u8> = [DESC, &b"(X=".repeat(120)[..], &b")".repeat(120)[..]].concat();
        let wire = build::connect(&long, 0);
        let mut s = TnsStream::new();
        let mut msgs = s.feed(Direction::ToServer, Segment::truncated(&wire[..74], 74));
        msgs.extend(s.feed(
            Direction::ToServer,
            Segment::truncated(&wire[74..74 + 512], wire.len() - 74),
        ));
        let c = connect_of(&msgs);
        assert!(c.truncated);
        assert_eq!(c.service_name.as_deref(), Some("ORCLPDB1"));
        assert_eq!(s.stats().truncated, 1);
        // The gap ended exactly at the packet's end: the next packet decodes.
        let again = build::connect(DESC, 0);
        assert!(!connect_of(&s.feed(Direction::ToServer, Segment::new(&again))).truncated);
        assert_eq!(s.stats().malformed, 0);
    }

    #[test]
    fn gap_over_a_boundary_resyncs_on_next_segment() {
        let refuse = build::refuse(b"(DESCRIPTION=(ERR=12505))");
        let mut both = build::resend();
        both.extend_from_slice(&refuse);
        let mut s = TnsStream::new();
        // Captured only the RESEND and 3 bytes of the REFUSE; then 1000 bytes of unknown payload.
        let msgs = s.feed(
            Direction::ToClient,
            Segment::truncated(&both[..11], both.len() + 1000),
        );
        assert!(
            matches!(
                &msgs[..],
                [
                    Message::Resend,
                    Message::Malformed(TnsError::Short { have: 3, .. })
                ]
            ),
            "header cut by the gap: {msgs:?}"
        );
        let msgs = s.feed(Direction::ToClient, Segment::new(&refuse));
        assert!(matches!(&msgs[..], [Message::Refuse(r)] if r.code == Some(12505)));
    }

    #[test]
    fn sequence_numbers_drop_retransmits_and_notice_holes() {
        let wire = build::connect(DESC, 0);
        let (a, b) = wire.split_at(74);
        let seq = u32::MAX - 10; // wraps inside the stream
        let mut s = TnsStream::new();
        let mut msgs = s.feed(Direction::ToServer, Segment::new(a).with_seq(seq));
        msgs.extend(s.feed(Direction::ToServer, Segment::new(a).with_seq(seq)));
        let second = seq.wrapping_add(74);
        msgs.extend(s.feed(Direction::ToServer, Segment::new(b).with_seq(second)));
        msgs.extend(s.feed(Direction::ToServer, Segment::new(b).with_seq(second)));
        msgs.extend(s.feed(Direction::ToServer, Segment::new(&wire).with_seq(seq)));
        assert_eq!(connect_of(&msgs).service_name.as_deref(), Some("ORCLPDB1"));
        assert_eq!(
            s.stats().retransmitted_bytes,
            74 + b.len() as u64 + wire.len() as u64
        );

        // A missed segment (the DATA) then a new CONNECT: the gap loses the boundary, the next
        // segment resyncs, and the first CONNECT is given up as truncated.
        let mut s = TnsStream::new();
        s.feed(Direction::ToServer, Segment::new(a).with_seq(1));
        let next = 1 + wire.len() as u32;
        let msgs = s.feed(Direction::ToServer, Segment::new(&wire).with_seq(next));
        assert_eq!(s.stats().gaps, 1);
        let [Message::Connect(first), Message::Connect(second)] = &msgs[..] else {
            panic!("{msgs:?}")
        };
        assert!(first.truncated && first.service_name.is_none());
        assert_eq!(second.service_name.as_deref(), Some("ORCLPDB1"));
    }

    #[test]
    fn pending_and_flush() {
        let wire = build::connect(DESC, 0);
        let mut s = TnsStream::new();
        assert!(
            s.feed(Direction::ToServer, Segment::new(&wire[..74]))
                .is_empty()
        );
        let msgs = s.flush();
        assert!(connect_of(&msgs).truncated);
        let mut s = TnsStream::new();
        assert!(
            s.feed(
                Direction::ToClient,
                Segment::new(&build::redirect_split(REDIRECT)[..10])
            )
            .is_empty()
        );
        assert!(matches!(
            &s.flush()[..],
            [Message::Malformed(TnsError::RedirectDataMissing(_))]
        ));
        assert_eq!(s.stats().malformed, 1);
    }

    #[test]
    fn garbage_is_counted() {
        let mut s = TnsStream::new();
        let msgs = s.feed(
            Direction::ToServer,
            Segment::new(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        );
        assert!(matches!(&msgs[..], [Message::Malformed(_)]));
        // Still lost: garbage keeps being counted, a real packet resyncs.
        s.feed(
            Direction::ToServer,
            Segment::new(&[1, 2, 3, 4, 5, 6, 7, 8, 9]),
        );
        assert_eq!(s.stats().malformed, 2);
        let msgs = s.feed(Direction::ToServer, Segment::new(&build::connect(DESC, 0)));
        assert_eq!(connect_of(&msgs).program.as_deref(), Some("sqlplus"));
        let redirect_without_address = build::redirect_split(b"\0(DESCRIPTION=)");
        let msgs =
            TnsStream::new().feed(Direction::ToClient, Segment::new(&redirect_without_address));
        assert_eq!(msgs, [Message::Malformed(TnsError::RedirectWithoutAddress)]);
    }
}
