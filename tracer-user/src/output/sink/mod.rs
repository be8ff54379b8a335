//! The sinks: where a batch of encoded records goes (stdout, a file, a TCP or syslog
//! stream, HTTP, OTLP), behind one `Transport` the delivery task drives.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;

use super::{OutputError, OutputOptions, tls};
use crate::{
    encode::{self, Format},
    event::{Event, Kind},
};

pub(super) mod file;
pub(super) mod http;
pub(crate) mod otlp;
pub(super) mod spec;
pub(super) mod stream;

pub use http::HttpMode;
pub use spec::{SinkSpec, Target};

/// One encoded event as it travels to a sink (and sits in a spool).
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub(crate) kind: Kind,
    /// RFC 3339 event time (syslog TIMESTAMP, HEC `time`).
    pub(crate) time: String,
    /// One JSON line, no newline.
    pub(crate) line: Bytes,
    /// For OTLP sinks: the LogRecord fields other than the body ([`otlp::sidecar`]); empty
    /// when no OTLP output is configured.
    pub(crate) otlp: Bytes,
}

impl Record {
    /// Encodes `e` in `format` (through `buf`), with the OTLP sidecar when `otlp`.
    pub(crate) fn new(format: Format, otlp: bool, e: &Event, buf: &mut Vec<u8>) -> Self {
        encode::encode(format, e, buf);
        Self {
            kind: e.kind,
            time: e.time.clone(),
            line: Bytes::copy_from_slice(buf),
            otlp: if otlp { otlp::sidecar(e) } else { Bytes::new() },
        }
    }
}

#[derive(Debug)]
pub(crate) enum DeliverError {
    /// Try again later (after `after` if the receiver said so).
    Retry {
        after: Option<Duration>,
        why: String,
    },
    /// The receiver refused these events for good (malformed, too large, ...).
    Rejected(String),
    /// The receiver answered with a certificate that --ca (or the system store) does not
    /// trust: a configuration error at start, retried like any failure later on (a SIEM
    /// may be rotating its certificate).
    Untrusted(String),
}

impl DeliverError {
    pub(super) fn retry(why: impl Into<String>) -> Self {
        Self::Retry {
            after: None,
            why: why.into(),
        }
    }

    pub(super) fn why(&self) -> &str {
        match self {
            Self::Retry { why, .. } | Self::Rejected(why) | Self::Untrusted(why) => why,
        }
    }
}

pub(super) enum Transport {
    /// Written through std's stdout on the blocking pool ([`Transport::deliver`]).
    Stdout,
    File(file::FileSink),
    Stream(stream::StreamSink),
    Http(http::HttpSink),
    Grpc(otlp::GrpcSink),
}

impl Transport {
    pub(super) fn build(
        spec: &SinkSpec,
        opts: &OutputOptions,
        tls: Option<&Arc<rustls::ClientConfig>>,
    ) -> Result<Self, OutputError> {
        let sink_err = |why: String| OutputError::Sink {
            sink: spec.name.clone(),
            why,
        };
        let tls_for = |host: &str, on: bool| -> Result<_, OutputError> {
            match (on, tls) {
                (true, Some(c)) => Ok(Some((c.clone(), tls::server_name(host)?))),
                _ => Ok(None),
            }
        };
        Ok(match &spec.target {
            Target::Stdout => Transport::Stdout,
            Target::File(path) => Transport::File(
                file::FileSink::open(path, opts.rotate_size, opts.rotate_keep)
                    .map_err(|e| sink_err(e.to_string()))?,
            ),
            Target::Tcp { host, port } => Transport::Stream(stream::StreamSink::new(
                host,
                *port,
                None,
                stream::Framing::Ndjson,
                opts.io_timeout,
            )),
            Target::Syslog { host, port, tls } => Transport::Stream(stream::StreamSink::new(
                host,
                *port,
                tls_for(host, *tls)?,
                stream::Framing::Syslog {
                    hostname: stream::syslog_hostname(&opts.node),
                    procid: std::process::id(),
                },
                opts.io_timeout,
            )),
            Target::Http {
                host,
                port,
                path,
                tls,
            } => Transport::Http(http::HttpSink::new(
                host,
                *port,
                path,
                tls_for(host, *tls)?,
                opts.http_mode,
                opts.http_auth.clone(),
                opts.io_timeout,
            )),
            Target::Otlp {
                host,
                port,
                path,
                grpc,
                tls,
            } => {
                let resource = otlp::Resource::new(&crate::kernel::hostname());
                let mut headers = opts.otlp_headers.clone();
                if *grpc {
                    if let Some(a) = &opts.http_auth {
                        headers.push(("authorization".into(), a.clone()));
                    }
                    Transport::Grpc(otlp::GrpcSink::new(
                        host,
                        *port,
                        tls_for(host, *tls)?,
                        headers,
                        opts.io_timeout,
                        resource,
                    ))
                } else {
                    Transport::Http(
                        http::HttpSink::new(
                            host,
                            *port,
                            path,
                            tls_for(host, *tls)?,
                            HttpMode::Generic,
                            opts.http_auth.clone(),
                            opts.io_timeout,
                        )
                        .otlp(resource, headers),
                    )
                }
            }
        })
    }

    pub(super) async fn connect(&mut self) -> Result<(), DeliverError> {
        match self {
            Transport::Stream(s) => s.connect().await,
            Transport::Http(h) => h.connect().await,
            Transport::Grpc(g) => g.connect().await,
            Transport::Stdout | Transport::File(_) => Ok(()),
        }
    }

    /// Ok(n): accepted, of which the receiver refused `n` individually.
    pub(super) async fn deliver(&mut self, batch: &[Arc<Record>]) -> Result<u64, DeliverError> {
        match self {
            Transport::Stdout => {
                let mut buf = Vec::with_capacity(batch.iter().map(|r| r.line.len() + 1).sum());
                for r in batch {
                    stream::frame(&stream::Framing::Ndjson, r, &mut buf);
                }
                // Written on the blocking pool (stdout may be a pipe that blocks) like tokio's
                // Stdout does, but handing over the batch instead of copying it again.
                let written = tokio::task::spawn_blocking(move || {
                    use std::io::Write as _;
                    let mut out = std::io::stdout().lock();
                    out.write_all(&buf)?;
                    out.flush()
                })
                .await
                .map_err(std::io::Error::other)
                .and_then(|r| r);
                written.map_err(|e| DeliverError::retry(format!("stdout: {e}")))?;
                Ok(0)
            }
            Transport::File(f) => f
                .deliver(batch)
                .map(|()| 0)
                .map_err(|e| DeliverError::retry(format!("write: {e}"))),
            Transport::Stream(s) => s.deliver(batch).await.map(|()| 0),
            Transport::Http(h) => h.deliver(batch).await.map(|a| a.rejected),
            Transport::Grpc(g) => g.deliver(batch).await,
        }
    }

    pub(super) async fn close(&mut self) {
        match self {
            Transport::Stream(s) => s.close().await,
            // Stdout is flushed with every batch.
            Transport::Stdout | Transport::File(_) | Transport::Http(_) | Transport::Grpc(_) => {}
        }
    }
}
