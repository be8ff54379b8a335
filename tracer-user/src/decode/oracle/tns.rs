//! Oracle Net (TNS) packet framing and decoders for the packets of connection setup (everything
//! up to the ACCEPT). Layouts as Wireshark's epan/dissectors/packet-tns.c and python-oracledb's
//! src/oracledb/impl/thin/messages/connect.pyx read them.
//!
//! Decoders take one packet's bytes as captured: possibly fewer than the header's length (the
//! kernel copies a bounded prefix). They decode what the captured bytes hold, return borrowed
//! slices clipped to both the declared and the captured length, and fail with [`TnsError`] only
//! when a field they need is missing or impossible.
use thiserror::Error;

pub const HEADER_LEN: usize = 8;

/// Above this many bytes of connect data a CONNECT carries none inline and the descriptor
/// follows in a DATA packet (python-oracledb, node-oracledb, go-ora and JDBC thin all use it).
pub const MAX_INLINE_CONNECT_DATA: usize = 230;

/// Header flag on a REDIRECT: its data is `address\0connect-data`.
pub const FLAG_REDIRECT_DATA: u8 = 0x02;
/// Header flag on a CONNECT: sent to the address a REDIRECT named.
pub const FLAG_REDIRECTED_CONNECT: u8 = 0x04;
/// DATA packet data flag: end of file.
pub const DATA_FLAG_EOF: u16 = 0x0040;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PacketType {
    Connect,
    Accept,
    Ack,
    Refuse,
    Redirect,
    Data,
    Null,
    Abort,
    Resend,
    Marker,
    Attention,
    Control,
}

impl PacketType {
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Connect,
            2 => Self::Accept,
            3 => Self::Ack,
            4 => Self::Refuse,
            5 => Self::Redirect,
            6 => Self::Data,
            7 => Self::Null,
            9 => Self::Abort,
            11 => Self::Resend,
            12 => Self::Marker,
            13 => Self::Attention,
            14 => Self::Control,
            _ => return None,
        })
    }

    pub fn as_u8(self) -> u8 {
        match self {
            Self::Connect => 1,
            Self::Accept => 2,
            Self::Ack => 3,
            Self::Refuse => 4,
            Self::Redirect => 5,
            Self::Data => 6,
            Self::Null => 7,
            Self::Abort => 9,
            Self::Resend => 11,
            Self::Marker => 12,
            Self::Attention => 13,
            Self::Control => 14,
        }
    }

    /// The name used in `oracle.packet` of droptrace.v1 events.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "CONNECT",
            Self::Accept => "ACCEPT",
            Self::Ack => "ACK",
            Self::Refuse => "REFUSE",
            Self::Redirect => "REDIRECT",
            Self::Data => "DATA",
            Self::Null => "NULL",
            Self::Abort => "ABORT",
            Self::Resend => "RESEND",
            Self::Marker => "MARKER",
            Self::Attention => "ATTENTION",
            Self::Control => "CONTROL",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TnsError {
    #[error("{what}: {have} bytes, need {need}")]
    Short {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("packet length {0} is shorter than the header")]
    BadLength(usize),
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    #[error("nonzero header checksum where a packet start was expected")]
    Checksum,
    #[error("CONNECT data offset {0} points into the fixed CONNECT fields")]
    BadConnectDataOffset(u16),
    #[error("REDIRECT announced its data in a DATA packet, but then came: {0}")]
    RedirectDataMissing(&'static str),
    #[error("REDIRECT data names no address")]
    RedirectWithoutAddress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Declared packet length, header included.
    pub length: usize,
    pub packet_type: PacketType,
    pub flags: u8,
    /// Bytes 2-3 (the 2-byte-length form's packet checksum; always 0 in practice).
    pub packet_checksum: u16,
    /// Bytes 6-7, always 0 in practice.
    pub header_checksum: u16,
}

impl Header {
    /// Parses the header of every packet up to the ACCEPT, which use the 2-byte length.
    pub fn parse(buf: &[u8]) -> Result<Self, TnsError> {
        Self::parse_with(buf, false)
    }

    /// `wide`: bytes 0-3 are a u32 length (after an ACCEPT of version >= 315).
    pub fn parse_with(buf: &[u8], wide: bool) -> Result<Self, TnsError> {
        let h: &[u8; HEADER_LEN] = buf
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(TnsError::Short {
                what: "header",
                need: HEADER_LEN,
                have: buf.len(),
            })?;
        let (length, packet_checksum) = if wide {
            (u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize, 0)
        } else {
            (
                usize::from(u16::from_be_bytes([h[0], h[1]])),
                u16::from_be_bytes([h[2], h[3]]),
            )
        };
        let packet_type = PacketType::from_u8(h[4]).ok_or(TnsError::UnknownType(h[4]))?;
        if length < HEADER_LEN {
            return Err(TnsError::BadLength(length));
        }
        Ok(Self {
            length,
            packet_type,
            flags: h[5],
            packet_checksum,
            header_checksum: u16::from_be_bytes([h[6], h[7]]),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connect<'a> {
    pub version: u16,
    pub version_min: u16,
    pub sdu: u16,
    pub flags: u8,
    /// Declared connect data length.
    pub data_len: u16,
    pub data_offset: u16,
    /// The inline connect data as captured (clipped to `data_len`); `None` when there is none
    /// inline.
    pub data: Option<&'a [u8]>,
}

impl Connect<'_> {
    /// The descriptor is in the next DATA packet (it was longer than
    /// [`MAX_INLINE_CONNECT_DATA`]).
    pub fn data_follows(&self) -> bool {
        self.data.is_none() && self.data_len > 0
    }

    /// Sent after a REDIRECT.
    pub fn redirected(&self) -> bool {
        self.flags & FLAG_REDIRECTED_CONNECT != 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accept {
    pub version: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refuse<'a> {
    pub user_reason: u8,
    pub system_reason: u8,
    pub data_len: u16,
    /// As captured, clipped to `data_len`.
    pub data: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redirect<'a> {
    pub data_len: u16,
    /// Inline data as captured (clipped to `data_len`); `None` in the split form, where the data
    /// is the payload of the next DATA packet.
    pub data: Option<&'a [u8]>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    pub data_flags: u16,
    /// Payload as captured (from offset 10, clipped to the packet length).
    pub payload: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    Connect(Connect<'a>),
    Accept(Accept),
    Refuse(Refuse<'a>),
    Redirect(Redirect<'a>),
    Resend,
    Data(Data<'a>),
    /// ACK, NULL, ABORT, MARKER, ATTENTION, CONTROL: framing only.
    Other(PacketType),
}

/// Decodes one packet from `buf`, which starts at its header and may be shorter (captured
/// prefix) or longer (following packets) than the declared length.
pub fn decode(buf: &[u8]) -> Result<(Header, Packet<'_>), TnsError> {
    let header = Header::parse(buf)?;
    // Only the bytes that are both declared and captured belong to this packet.
    let pkt = buf.get(..header.length.min(buf.len())).unwrap_or(buf);
    let packet = match header.packet_type {
        PacketType::Connect => {
            let f = Fields::new(pkt, "CONNECT", 28)?;
            let data_len = f.u16(24);
            let data_offset = f.u16(26);
            if usize::from(data_offset) < 28 {
                return Err(TnsError::BadConnectDataOffset(data_offset));
            }
            let data = (data_len > 0 && header.length > usize::from(data_offset))
                .then(|| clip(pkt, usize::from(data_offset), data_len));
            Packet::Connect(Connect {
                version: f.u16(8),
                version_min: f.u16(10),
                sdu: f.u16(14),
                flags: header.flags,
                data_len,
                data_offset,
                data,
            })
        }
        PacketType::Accept => Packet::Accept(Accept {
            version: Fields::new(pkt, "ACCEPT", 10)?.u16(8),
        }),
        PacketType::Refuse => {
            let f = Fields::new(pkt, "REFUSE", 12)?;
            let data_len = f.u16(10);
            Packet::Refuse(Refuse {
                user_reason: f.u8(8),
                system_reason: f.u8(9),
                data_len,
                data: clip(pkt, 12, data_len),
            })
        }
        PacketType::Redirect => {
            let data_len = Fields::new(pkt, "REDIRECT", 10)?.u16(8);
            Packet::Redirect(Redirect {
                data_len,
                data: (header.length > 10).then(|| clip(pkt, 10, data_len)),
            })
        }
        PacketType::Resend => Packet::Resend,
        PacketType::Data => Packet::Data(Data {
            data_flags: Fields::new(pkt, "DATA", 10)?.u16(8),
            payload: pkt.get(10..).unwrap_or_default(),
        }),
        other => Packet::Other(other),
    };
    Ok((header, packet))
}

/// `pkt[from..from+len]`, cut short at the end of `pkt`.
fn clip(pkt: &[u8], from: usize, len: u16) -> &[u8] {
    let rest = pkt.get(from..).unwrap_or_default();
    rest.get(..usize::from(len)).unwrap_or(rest)
}

/// Fixed-offset fields of a packet whose length was checked once up front.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn new(pkt: &'a [u8], what: &'static str, need: usize) -> Result<Self, TnsError> {
        if pkt.len() < need {
            return Err(TnsError::Short {
                what,
                need,
                have: pkt.len(),
            });
        }
        Ok(Self(pkt))
    }

    fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }

    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.u8(at), self.u8(at + 1)])
    }
}

/// Builders for well-formed packets, as the listener and clients lay them out: test fixtures,
/// the fuzz seed corpus and the benchmark use them.
pub mod build {
    use super::*;

    pub fn header(packet_type: PacketType, flags: u8, length: usize) -> [u8; HEADER_LEN] {
        let len = u16::try_from(length).unwrap_or(u16::MAX).to_be_bytes();
        [len[0], len[1], 0, 0, packet_type.as_u8(), flags, 0, 0]
    }

    /// A CONNECT the way python-oracledb sends it: 74 bytes of fixed fields, the connect data
    /// inline when it fits, else in a following DATA packet (both returned, concatenated).
    pub fn connect(connect_data: &[u8], flags: u8) -> Vec<u8> {
        let cd_len = u16::try_from(connect_data.len()).unwrap_or(u16::MAX);
        let inline = connect_data.len() <= MAX_INLINE_CONNECT_DATA;
        let length = 74 + if inline { connect_data.len() } else { 0 };
        let mut p = header(PacketType::Connect, flags, length).to_vec();
        for v in [319u16, 300, 0x0001, 8192, 8192, 0x4f98, 0, 1, cd_len, 74] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        p.extend_from_slice(&0u32.to_be_bytes()); // max receivable data
        p.extend_from_slice(&[0x84, 0x84]); // NSI flags
        p.extend_from_slice(&[0; 24]); // obsolete
        p.extend_from_slice(&8192u32.to_be_bytes()); // SDU
        p.extend_from_slice(&8192u32.to_be_bytes()); // TDU
        p.extend_from_slice(&[0; 8]); // connect flags 1 and 2
        if inline {
            p.extend_from_slice(connect_data);
        } else {
            p.extend_from_slice(&data(connect_data));
        }
        p
    }

    pub fn data(payload: &[u8]) -> Vec<u8> {
        let mut p = header(PacketType::Data, 0, 10 + payload.len()).to_vec();
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(payload);
        p
    }

    pub fn accept(version: u16) -> Vec<u8> {
        let mut p = header(PacketType::Accept, 0, 32).to_vec();
        p.extend_from_slice(&version.to_be_bytes());
        p.resize(32, 0);
        p
    }

    pub fn refuse(text: &[u8]) -> Vec<u8> {
        let mut p = header(PacketType::Refuse, 0, 12 + text.len()).to_vec();
        p.extend_from_slice(&[1, 0]);
        p.extend_from_slice(&u16::try_from(text.len()).unwrap_or(u16::MAX).to_be_bytes());
        p.extend_from_slice(text);
        p
    }

    /// The split form real listeners send (and the only one python-oracledb reads): a bare
    /// REDIRECT announcing the length, then a DATA packet with the data.
    pub fn redirect_split(redirect_data: &[u8]) -> Vec<u8> {
        let n = u16::try_from(redirect_data.len()).unwrap_or(u16::MAX);
        let mut p = header(PacketType::Redirect, FLAG_REDIRECT_DATA, 10).to_vec();
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&data(redirect_data));
        p
    }

    pub fn redirect_inline(redirect_data: &[u8]) -> Vec<u8> {
        let n = u16::try_from(redirect_data.len()).unwrap_or(u16::MAX);
        let mut p = header(
            PacketType::Redirect,
            FLAG_REDIRECT_DATA,
            10 + redirect_data.len(),
        )
        .to_vec();
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(redirect_data);
        p
    }

    pub fn resend() -> Vec<u8> {
        header(PacketType::Resend, 0, HEADER_LEN).to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CD: &[u8] = b"(DESCRIPTION=(CONNECT_DATA=(SERVICE_NAME=S)))";

    #[test]
    fn header_fields() {
        let h = Header::parse(&[0, 74, 0, 0, 1, 4, 0, 0]).unwrap();
        assert_eq!(
            (h.length, h.packet_type, h.flags),
            (74, PacketType::Connect, 4)
        );
        assert_eq!(
            Header::parse(&[0, 74, 0, 0]),
            Err(TnsError::Short {
                what: "header",
                need: 8,
                have: 4
            })
        );
        assert_eq!(
            Header::parse(&[0, 7, 0, 0, 1, 0, 0, 0]),
            Err(TnsError::BadLength(7))
        );
        assert_eq!(
            Header::parse(&[0, 8, 0, 0, 8, 0, 0, 0]),
            Err(TnsError::UnknownType(8))
        );
        let h = Header::parse_with(&[0, 1, 0, 0, 6, 0, 0, 0], true).unwrap();
        assert_eq!(h.length, 65536);
    }

    #[test]
    fn connect_inline_and_split() {
        let p = build::connect(CD, 0);
        let (h, Packet::Connect(c)) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!(h.length, p.len());
        assert_eq!((c.version, c.data_offset), (319, 74));
        assert_eq!(c.data, Some(CD));
        assert!(!c.data_follows() && !c.redirected());

        let long = [CD, &[b' '; 200][..]].concat();
        let p = build::connect(&long, FLAG_REDIRECTED_CONNECT);
        let (h, Packet::Connect(c)) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!(h.length, 74);
        assert!(c.data_follows() && c.redirected());
        let (_, Packet::Data(d)) = decode(p.get(74..).unwrap()).unwrap() else {
            panic!()
        };
        assert_eq!(d.payload, &long[..]);

        // Captured prefix: inline data clipped, not an error.
        let p = build::connect(CD, 0);
        let (_, Packet::Connect(c)) = decode(&p[..80]).unwrap() else {
            panic!()
        };
        assert_eq!(c.data, Some(&CD[..6]));
        assert!(matches!(decode(&p[..27]), Err(TnsError::Short { .. })));
    }

    #[test]
    fn refuse_redirect_resend_accept() {
        let p = build::refuse(b"(DESCRIPTION=(ERR=12514))");
        let (_, Packet::Refuse(r)) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!(r.data, b"(DESCRIPTION=(ERR=12514))");
        let p = build::redirect_split(b"(ADDRESS=(HOST=h)(PORT=1))\0x");
        assert_eq!(&p[..10], &[0, 10, 0, 0, 5, 2, 0, 0, 0, 28]);
        let (h, Packet::Redirect(r)) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!((h.length, r.data_len, r.data), (10, 28, None));
        let p = build::redirect_inline(b"(ADDRESS=(HOST=h)(PORT=1))");
        let (_, Packet::Redirect(r)) = decode(&p).unwrap() else {
            panic!()
        };
        assert_eq!(r.data, Some(&b"(ADDRESS=(HOST=h)(PORT=1))"[..]));
        assert_eq!(decode(&build::resend()).unwrap().1, Packet::Resend);
        assert_eq!(
            decode(&build::accept(319)).unwrap().1,
            Packet::Accept(Accept { version: 319 })
        );
    }
}
