//! Conntrack removals from ctnetlink DESTROY events, where tracing `nf_ct_delete` is refused
//! (kernels that forbid fentry, e.g. under lockdown, or lack BPF trampolines).
//!
//! The kernel multicasts every destroyed entry of a network namespace to NETLINK_NETFILTER
//! listeners of NFNLGRP_CONNTRACK_DESTROY; a TCP entry that never saw a reply is the same
//! signal the fentry program reports. Unlike it, this sees only the daemon's own network
//! namespace (a node's host namespace, where kube-proxy's DNAT entries live), and entries the
//! kernel could not deliver (socket buffer overrun, ENOBUFS) are counted, not named.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use super::CtNames;
use crate::decode::{CtSignal, CtSnapshot, FlowKey};

const NETLINK_NETFILTER: i32 = 12;
/// Group bit of NFNLGRP_CONNTRACK_DESTROY (group 3) for `bind`.
const NF_NETLINK_CONNTRACK_DESTROY: u32 = 1 << 2;
/// (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
const CT_DELETE: u16 = (1 << 8) | 2;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_TYPE_MASK: u16 = !((1 << 15) | (1 << 14));

// enum ctattr_type / ctattr_tuple / ctattr_ip / ctattr_l4proto (uapi nfnetlink_conntrack.h)
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_MARK: u16 = 8;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const IPPROTO_TCP: u8 = 6;

/// Which removed entries are worth a signal: TCP, unreplied, to a watched port.
#[derive(Debug, Clone)]
pub struct Filter {
    pub ports: Vec<u16>,
    pub all_tcp: bool,
}

impl Filter {
    fn watches(&self, dport: u16) -> bool {
        self.all_tcp || self.ports.contains(&dport)
    }
}

/// A subscribed ctnetlink socket (non-blocking).
pub struct CtDestroyEvents {
    fd: OwnedFd,
    names: CtNames,
    filter: Filter,
    netns: u32,
    /// IPS_SEEN_REPLY of this kernel (0 when BTF does not name it: every entry then counts).
    seen_reply: u32,
    buf: Vec<u8>,
    /// Times the kernel reported it had to drop messages for this socket (ENOBUFS).
    pub overruns: u64,
    /// Messages that did not parse as a conntrack entry.
    pub malformed: u64,
}

impl CtDestroyEvents {
    /// Subscribes to DESTROY events of the caller's network namespace.
    pub fn open(names: CtNames, filter: Filter) -> io::Result<Self> {
        // SAFETY: plain syscalls on a descriptor we own; the address is a valid sockaddr_nl.
        let fd = unsafe {
            let raw = libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                NETLINK_NETFILTER,
            );
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
            addr.nl_groups = NF_NETLINK_CONNTRACK_DESTROY;
            let rc = libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            );
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            // A burst of removals (conntrack flush, GC after a storm) must not overrun us.
            let size: libc::c_int = 4 << 20;
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const size).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            );
            fd
        };
        let netns = std::fs::metadata("/proc/self/ns/net")
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m) as u32)
            .unwrap_or(0);
        Ok(Self {
            fd,
            seen_reply: names.bit("SEEN_REPLY").map_or(0, |b| 1 << b),
            names,
            filter,
            netns,
            buf: vec![0; 64 << 10],
            overruns: 0,
            malformed: 0,
        })
    }

    /// Reads everything queued (until EAGAIN) and hands each unreplied watched entry to `f`.
    pub fn drain(&mut self, ts_ns: u64, mut f: impl FnMut(CtSignal)) {
        loop {
            // SAFETY: buf is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            };
            if n < 0 {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::ENOBUFS) => {
                        self.overruns += 1;
                        continue;
                    }
                    Some(libc::EINTR) => continue,
                    _ => return,
                }
            }
            if n == 0 {
                return;
            }
            // Most removals on a node were answered or are for other ports: decided on the raw
            // status and tuple, before any name is looked up.
            let wanted = |status: u32, original: &FlowKey| {
                status & self.seen_reply == 0 && self.filter.watches(original.dst.port())
            };
            for msg in messages(&self.buf[..n as usize]) {
                match parse_destroy(msg, &self.names, wanted) {
                    Ok(Some(ct)) => {
                        f(CtSignal {
                            ts_ns,
                            ct,
                            netns: self.netns,
                        });
                    }
                    Ok(None) => {}
                    Err(_) => self.malformed += 1,
                }
            }
        }
    }
}

impl AsRawFd for CtDestroyEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("truncated {0}")]
    Truncated(&'static str),
    #[error("missing {0}")]
    Missing(&'static str),
}

/// The netlink messages in one datagram (nlmsghdr.len, 4-byte aligned); stops at anything
/// that does not fit.
fn messages(mut buf: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if buf.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(buf[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return None;
        }
        let msg = &buf[..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some(msg)
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// (type, payload) of each attribute in `buf`.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = Result<(u16, &[u8]), ParseError>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        if buf.len() < 4 {
            buf = &[];
            return Some(Err(ParseError::Truncated("attribute header")));
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > buf.len() {
            buf = &[];
            return Some(Err(ParseError::Truncated("attribute")));
        }
        let payload = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some(Ok((ty, payload)))
    })
}

fn be16(p: &[u8]) -> Result<u16, ParseError> {
    p.get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(ParseError::Truncated("u16"))
}

fn be32(p: &[u8]) -> Result<u32, ParseError> {
    p.get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(ParseError::Truncated("u32"))
}

/// A CTA_TUPLE_* nest: (protocol, flow).
fn tuple(nest: &[u8]) -> Result<(u8, FlowKey), ParseError> {
    let (mut src, mut dst) = (None, None);
    let (mut proto, mut sport, mut dport) = (None, 0, 0);
    for a in attrs(nest) {
        match a? {
            (CTA_TUPLE_IP, ip) => {
                for a in attrs(ip) {
                    let (ty, p) = a?;
                    let addr = match ty {
                        CTA_IP_V4_SRC | CTA_IP_V4_DST => IpAddr::V4(Ipv4Addr::from(
                            <[u8; 4]>::try_from(p).map_err(|_| ParseError::Truncated("IPv4"))?,
                        )),
                        CTA_IP_V6_SRC | CTA_IP_V6_DST => IpAddr::V6(Ipv6Addr::from(
                            <[u8; 16]>::try_from(p).map_err(|_| ParseError::Truncated("IPv6"))?,
                        )),
                        _ => continue,
                    };
                    if matches!(ty, CTA_IP_V4_SRC | CTA_IP_V6_SRC) {
                        src = Some(addr);
                    } else {
                        dst = Some(addr);
                    }
                }
            }
            (CTA_TUPLE_PROTO, p) => {
                for a in attrs(p) {
                    match a? {
                        (CTA_PROTO_NUM, n) => {
                            proto = Some(*n.first().ok_or(ParseError::Truncated("proto"))?)
                        }
                        (CTA_PROTO_SRC_PORT, v) => sport = be16(v)?,
                        (CTA_PROTO_DST_PORT, v) => dport = be16(v)?,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let proto = proto.ok_or(ParseError::Missing("CTA_PROTO_NUM"))?;
    let src = src.ok_or(ParseError::Missing("source address"))?;
    let dst = dst.ok_or(ParseError::Missing("destination address"))?;
    Ok((
        proto,
        FlowKey {
            src: SocketAddr::new(src, sport),
            dst: SocketAddr::new(dst, dport),
        },
    ))
}

/// A ctnetlink DELETE message as a removed-entry snapshot; `None` for other messages,
/// non-TCP entries and those `wanted(status, original tuple)` turns down.
pub fn parse_destroy(
    msg: &[u8],
    names: &CtNames,
    wanted: impl Fn(u32, &FlowKey) -> bool,
) -> Result<Option<CtSnapshot>, ParseError> {
    if msg.len() < NLMSG_HDRLEN + NFGENMSG_LEN {
        return Err(ParseError::Truncated("message header"));
    }
    let ty = u16::from_ne_bytes([msg[4], msg[5]]);
    if ty != CT_DELETE {
        return Ok(None);
    }
    let (mut original, mut reply) = (None, None);
    let (mut status, mut mark, mut zone) = (0u32, 0u32, 0u16);
    for a in attrs(&msg[NLMSG_HDRLEN + NFGENMSG_LEN..]) {
        match a? {
            (CTA_TUPLE_ORIG, t) => original = Some(tuple(t)?),
            (CTA_TUPLE_REPLY, t) => reply = Some(tuple(t)?),
            (CTA_STATUS, v) => status = be32(v)?,
            (CTA_MARK, v) => mark = be32(v)?,
            (CTA_ZONE, v) => zone = be16(v)?,
            _ => {}
        }
    }
    let (proto, original) = original.ok_or(ParseError::Missing("CTA_TUPLE_ORIG"))?;
    let (_, reply) = reply.ok_or(ParseError::Missing("CTA_TUPLE_REPLY"))?;
    if proto != IPPROTO_TCP || !wanted(status, &original) {
        return Ok(None);
    }
    Ok(Some(CtSnapshot {
        state: "UNREPLIED".to_string(),
        status: names.status(u64::from(status)),
        original,
        reply,
        mark,
        zone,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&ty.to_ne_bytes());
        v.extend_from_slice(payload);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | (1 << 15), &parts.concat())
    }

    fn tuple_attr(ty: u16, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
        nested(
            ty,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &src), attr(CTA_IP_V4_DST, &dst)],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[6]),
                        attr(CTA_PROTO_SRC_PORT, &sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    /// A DELETE message as the kernel sends it (ctnetlink_conntrack_event layout).
    fn destroy_message(status: u32) -> Vec<u8> {
        let body = [
            tuple_attr(
                CTA_TUPLE_ORIG,
                [10, 96, 0, 10],
                40000,
                [10, 96, 0, 20],
                1521,
            ),
            tuple_attr(
                CTA_TUPLE_REPLY,
                [10, 244, 1, 7],
                1521,
                [10, 96, 0, 10],
                40000,
            ),
            attr(CTA_STATUS, &status.to_be_bytes()),
            attr(CTA_MARK, &7u32.to_be_bytes()),
        ]
        .concat();
        let mut m = Vec::new();
        m.extend_from_slice(&((NLMSG_HDRLEN + NFGENMSG_LEN + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&CT_DELETE.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
        m.extend_from_slice(&body);
        m
    }

    fn all(_: u32, _: &FlowKey) -> bool {
        true
    }

    fn names() -> CtNames {
        super::super::tests::names()
    }

    #[test]
    fn decodes_an_unreplied_dnat_entry() {
        // CONFIRMED | DST_NAT | DST_NAT_DONE, no SEEN_REPLY
        let msg = destroy_message((1 << 3) | (1 << 5) | (1 << 8));
        let ct = parse_destroy(&msg, &names(), all).unwrap().unwrap();
        assert_eq!(ct.original.dst, "10.96.0.20:1521".parse().unwrap());
        assert_eq!(ct.reply.src, "10.244.1.7:1521".parse().unwrap());
        assert_eq!(ct.nat(), "dnat");
        assert_eq!(ct.mark, 7);
        assert!(ct.status.contains(&"DNAT".to_string()), "{:?}", ct.status);
        assert!(!ct.status.contains(&"SEEN_REPLY".to_string()));
    }

    #[test]
    fn entries_turned_down_by_status_or_tuple_are_not_built() {
        let names = names();
        let replied = destroy_message((1 << 1) | (1 << 3));
        let seen_reply = 1 << 1;
        let unreplied = |status: u32, _: &FlowKey| status & seen_reply == 0;
        assert_eq!(parse_destroy(&replied, &names, unreplied), Ok(None));
        let other_port = |_: u32, o: &FlowKey| o.dst.port() == 1522;
        assert_eq!(
            parse_destroy(&destroy_message(0), &names, other_port),
            Ok(None)
        );
    }

    #[test]
    fn datagram_with_several_messages_splits() {
        let one = destroy_message(0);
        let both = [one.clone(), one.clone()].concat();
        assert_eq!(messages(&both).count(), 2);
    }

    #[test]
    fn truncated_and_random_bytes_are_errors_not_panics() {
        let names = names();
        let msg = destroy_message(0);
        for cut in 0..msg.len() {
            let _ = parse_destroy(&msg[..cut], &names, all);
        }
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..2000 {
            let mut m = msg.clone();
            for _ in 0..4 {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let i = x as usize % m.len();
                m[i] = (x >> 8) as u8;
            }
            let _ = parse_destroy(&m, &names, all);
            let _ = messages(&m).count();
        }
        assert!(parse_destroy(&msg[..10], &names, all).is_err());
    }
}
