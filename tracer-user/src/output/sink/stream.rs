//! `tcp://` (NDJSON) and `syslog+tcp://` / `syslog+tls://` (RFC 5424, octet counting,
//! RFC 6587 framing) sinks over one long-lived connection.
use std::{pin::Pin, sync::Arc, task::Poll, time::Duration};

use rustls::{ClientConfig, pki_types::ServerName};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::TlsConnector;

use super::{DeliverError, Record};
use crate::event::Kind;

/// RFC 5424 facility local0: what receivers conventionally route to application logs.
const FACILITY_LOCAL0: u8 = 16;

#[derive(Debug, Clone)]
pub(crate) enum Framing {
    Ndjson,
    Syslog { hostname: String, procid: u32 },
}

/// A TLS client config and the name to verify, when the sink uses TLS.
pub(crate) type TlsTarget = Option<(Arc<ClientConfig>, ServerName<'static>)>;

/// A connected byte stream, plain or TLS.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// TCP connect, then the TLS handshake if any, each bounded by `timeout`.
pub(crate) async fn dial(
    host: &str,
    port: u16,
    tls: &TlsTarget,
    timeout: Duration,
) -> Result<Box<dyn Io>, DeliverError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::time::timeout(timeout, TcpStream::connect((host, port)))
        .await
        .map_err(|_| DeliverError::retry("connect timed out"))?
        .map_err(|e| DeliverError::retry(format!("connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    Ok(match tls {
        None => Box::new(tcp),
        Some((config, name)) => Box::new(
            tokio::time::timeout(
                timeout,
                TlsConnector::from(config.clone()).connect(name.clone(), tcp),
            )
            .await
            .map_err(|_| DeliverError::retry("TLS handshake timed out"))?
            .map_err(|e| {
                let why = format!("TLS handshake: {e}");
                let untrusted = e
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
                if untrusted {
                    DeliverError::Untrusted(why)
                } else {
                    DeliverError::retry(why)
                }
            })?,
        ),
    })
}

pub(crate) struct StreamSink {
    host: String,
    port: u16,
    tls: TlsTarget,
    framing: Framing,
    timeout: Duration,
    conn: Option<Box<dyn Io>>,
}

impl StreamSink {
    pub(crate) fn new(
        host: &str,
        port: u16,
        tls: TlsTarget,
        framing: Framing,
        timeout: Duration,
    ) -> Self {
        Self {
            host: host.to_string(),
            port,
            tls,
            framing,
            timeout,
            conn: None,
        }
    }

    pub(crate) async fn connect(&mut self) -> Result<(), DeliverError> {
        if self.conn.is_none() {
            self.conn = Some(dial(&self.host, self.port, &self.tls, self.timeout).await?);
        }
        Ok(())
    }

    /// Accepted = written and flushed to the socket. Before writing, checks that the peer has
    /// not closed the connection: receivers never send, so anything readable is a FIN, an
    /// RST or a TLS close_notify, and writing after it would be silently lost.
    pub(crate) async fn deliver(&mut self, batch: &[Arc<Record>]) -> Result<(), DeliverError> {
        self.connect().await?;
        let mut buf = Vec::with_capacity(batch.iter().map(|r| r.line.len() + 96).sum());
        for r in batch {
            frame(&self.framing, r, &mut buf);
        }
        let result = match self.conn.as_mut() {
            Some(s) => write_checked(s, &buf, self.timeout).await,
            None => Err(DeliverError::retry("not connected")),
        };
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    pub(crate) async fn close(&mut self) {
        if let Some(mut s) = self.conn.take() {
            let _ = s.shutdown().await;
        }
    }
}

async fn write_checked<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    buf: &[u8],
    timeout: Duration,
) -> Result<(), DeliverError> {
    if peer_closed(s).await {
        return Err(DeliverError::retry("peer closed the connection"));
    }
    let io = async {
        s.write_all(buf).await?;
        s.flush().await
    };
    match tokio::time::timeout(timeout, io).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(DeliverError::retry(format!("write: {e}"))),
        Err(_) => Err(DeliverError::retry("write timed out")),
    }
}

/// One non-blocking read attempt: Pending means nothing to read, the connection is alive.
async fn peer_closed<S: AsyncRead + Unpin>(s: &mut S) -> bool {
    let mut scratch = [0u8; 512];
    std::future::poll_fn(|cx| {
        let mut rb = ReadBuf::new(&mut scratch);
        Poll::Ready(match Pin::new(&mut *s).poll_read(cx, &mut rb) {
            Poll::Pending => false,
            // EOF (FIN or close_notify) or an error: gone. Data: the receiver talks
            // (unusual, harmless); keep the connection.
            Poll::Ready(Ok(())) => rb.filled().is_empty(),
            Poll::Ready(Err(_)) => true,
        })
    })
    .await
}

fn severity(kind: Kind) -> u8 {
    match kind {
        Kind::Lost => 3,                                          // err
        Kind::Drop | Kind::Stall | Kind::Storm => 4,              // warning
        Kind::Tns | Kind::Connect => 6,                           // informational
        Kind::TcpState | Kind::Retransmit | Kind::Conntrack => 7, // debug
    }
}

/// Appends one framed record.
pub(crate) fn frame(framing: &Framing, r: &Record, out: &mut Vec<u8>) {
    match framing {
        Framing::Ndjson => {
            out.extend_from_slice(&r.line);
            out.push(b'\n');
        }
        Framing::Syslog { hostname, procid } => {
            let ts = if r.time.is_empty() {
                "-"
            } else {
                r.time.as_str()
            };
            let header = format!(
                "<{}>1 {ts} {hostname} droptrace {procid} {} - ",
                FACILITY_LOCAL0 * 8 + severity(r.kind),
                r.kind.as_str(),
            );
            let len = header.len() + r.line.len();
            out.extend_from_slice(format!("{len} ").as_bytes());
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(&r.line);
        }
    }
}

/// RFC 5424 HOSTNAME: printable US-ASCII, no spaces, at most 255 characters, "-" if none.
pub(crate) fn syslog_hostname(node: &str) -> String {
    let h: String = node
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(255)
        .collect();
    if h.is_empty() { "-".to_string() } else { h }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc5424_octet_counted() {
        let r = Record {
            kind: Kind::Drop,
            time: "2026-01-01T00:00:00.000001Z".into(),
            line: bytes::Bytes::from_static(b"{\"a\":1}"),
            otlp: bytes::Bytes::new(),
        };
        let mut out = Vec::new();
        frame(
            &Framing::Syslog {
                hostname: "node-1".into(),
                procid: 42,
            },
            &r,
            &mut out,
        );
        let s = String::from_utf8(out).unwrap();
        let (len, msg) = s.split_once(' ').unwrap();
        assert_eq!(len.parse::<usize>().unwrap(), msg.len());
        assert_eq!(
            msg,
            "<132>1 2026-01-01T00:00:00.000001Z node-1 droptrace 42 drop - {\"a\":1}"
        );
        assert_eq!(syslog_hostname("a b\u{e9}c"), "abc");
        assert_eq!(syslog_hostname(""), "-");
    }
}
