//! `http://` / `https://`: batched POSTs over a kept-alive HTTP/1.1 connection, in one of
//! three body shapes (`--http-mode`). A small hand-written client: one request at a time,
//! Content-Length or chunked responses, no redirects.
use std::{sync::Arc, time::Duration};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};

use super::{
    DeliverError, Record, otlp,
    stream::{self, Io, TlsTarget},
};
use crate::encode::rfc3339_millis;

/// Biggest response body read (ES bulk responses echo one item per document).
const MAX_BODY: usize = 32 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HttpMode {
    /// The NDJSON lines as they are.
    #[default]
    Generic,
    /// Elasticsearch/OpenSearch `_bulk`: a `{"create":{}}` action line before each document.
    ElasticsearchBulk,
    /// Splunk HTTP Event Collector: one `{"time":…,"event":…}` envelope per event.
    SplunkHec,
}

impl std::str::FromStr for HttpMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "generic" => Ok(Self::Generic),
            "elasticsearch-bulk" => Ok(Self::ElasticsearchBulk),
            "splunk-hec" => Ok(Self::SplunkHec),
            _ => Err(format!(
                "unknown HTTP mode `{s}` (expected generic, elasticsearch-bulk or splunk-hec)"
            )),
        }
    }
}

pub(crate) struct HttpSink {
    host: String,
    port: u16,
    path: String,
    tls: TlsTarget,
    mode: HttpMode,
    /// The full Authorization header value.
    auth: Option<String>,
    /// More request headers (OTLP: OTEL_EXPORTER_OTLP_HEADERS).
    headers: Vec<(String, String)>,
    /// Set for `otlp+http(s)://`: protobuf ExportLogsServiceRequest bodies.
    otlp: Option<otlp::Resource>,
    timeout: Duration,
    conn: Option<BufReader<Box<dyn Io>>>,
}

/// What a 2xx response said about individual documents.
pub(crate) struct Accepted {
    /// Documents the receiver refused inside an accepted request (ES bulk item errors).
    pub(crate) rejected: u64,
}

impl HttpSink {
    pub(crate) fn new(
        host: &str,
        port: u16,
        path: &str,
        tls: TlsTarget,
        mode: HttpMode,
        auth: Option<String>,
        timeout: Duration,
    ) -> Self {
        let auth = auth.map(|a| match mode {
            // HEC wants "Splunk <token>": accept the bare token too.
            HttpMode::SplunkHec if !a.contains(' ') => format!("Splunk {a}"),
            _ => a,
        });
        Self {
            host: host.to_string(),
            port,
            path: path.to_string(),
            tls,
            mode,
            auth,
            headers: Vec::new(),
            otlp: None,
            timeout,
            conn: None,
        }
    }

    /// OTLP/HTTP: protobuf bodies for `resource`, with `headers` on every request.
    pub(crate) fn otlp(mut self, resource: otlp::Resource, headers: Vec<(String, String)>) -> Self {
        self.otlp = Some(resource);
        self.headers = headers;
        self
    }

    pub(crate) async fn connect(&mut self) -> Result<(), DeliverError> {
        if self.conn.is_some() {
            return Ok(());
        }
        let io = stream::dial(&self.host, self.port, &self.tls, self.timeout).await?;
        self.conn = Some(BufReader::new(io));
        Ok(())
    }

    pub(crate) fn body(&self, batch: &[Arc<Record>]) -> Vec<u8> {
        if let Some(resource) = &self.otlp {
            return otlp::export_request(resource, batch);
        }
        let mut body = Vec::with_capacity(batch.iter().map(|r| r.line.len() + 64).sum());
        for r in batch {
            match self.mode {
                HttpMode::Generic => {}
                HttpMode::ElasticsearchBulk => body.extend_from_slice(b"{\"create\":{}}\n"),
                HttpMode::SplunkHec => {
                    body.extend_from_slice(b"{");
                    if let Some(ms) = rfc3339_millis(&r.time) {
                        let (s, m) = (ms.div_euclid(1000), ms.rem_euclid(1000));
                        body.extend_from_slice(format!("\"time\":{s}.{m:03},").as_bytes());
                    }
                    body.extend_from_slice(
                        b"\"source\":\"droptrace\",\"sourcetype\":\"droptrace\",\"event\":",
                    );
                }
            }
            body.extend_from_slice(&r.line);
            if self.mode == HttpMode::SplunkHec {
                body.push(b'}');
            }
            body.push(b'\n');
        }
        body
    }

    pub(crate) async fn deliver(
        &mut self,
        batch: &[Arc<Record>],
    ) -> Result<Accepted, DeliverError> {
        self.connect().await?;
        let body = self.body(batch);
        let result = tokio::time::timeout(self.timeout, self.exchange(&body)).await;
        let (status, retry_after, close, resp) = match result {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(DeliverError::retry(format!("HTTP: {e}")));
            }
            Err(_) => {
                self.conn = None;
                return Err(DeliverError::retry("HTTP request timed out"));
            }
        };
        if close {
            self.conn = None;
        }
        match status {
            200..=299 if self.otlp.is_some() => {
                let (rejected, why) = otlp::partial_success(&resp);
                if rejected > 0 {
                    tracing::warn!("OTLP receiver rejected {rejected} log records: {why}");
                }
                Ok(Accepted {
                    rejected: rejected.min(batch.len() as u64),
                })
            }
            200..=299 => Ok(Accepted {
                rejected: match self.mode {
                    HttpMode::ElasticsearchBulk => bulk_item_errors(&resp),
                    _ => 0,
                },
            }),
            // Retryable: throttling, server trouble, and configuration problems (auth, URL)
            // that an operator fixes while the spool holds the events.
            401 | 403 | 404 | 408 | 429 | 300..=399 | 500..=599 => {
                self.conn = None;
                Err(DeliverError::Retry {
                    after: retry_after,
                    why: format!("HTTP {status}: {}", snippet(&resp)),
                })
            }
            _ => Err(DeliverError::Rejected(format!(
                "HTTP {status}: {}",
                snippet(&resp)
            ))),
        }
    }

    /// One request/response; returns (status, Retry-After, connection closes, body).
    async fn exchange(
        &mut self,
        body: &[u8],
    ) -> std::io::Result<(u16, Option<Duration>, bool, Vec<u8>)> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| std::io::Error::other("not connected"))?;
        let content_type = match self.mode {
            _ if self.otlp.is_some() => "application/x-protobuf",
            HttpMode::SplunkHec => "application/json",
            _ => "application/x-ndjson",
        };
        let mut head = format!(
            "POST {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: droptrace/{}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
            self.path,
            self.host,
            self.port,
            env!("CARGO_PKG_VERSION"),
            body.len()
        );
        if let Some(a) = &self.auth {
            head.push_str(&format!("Authorization: {a}\r\n"));
        }
        for (k, v) in &self.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let w = conn.get_mut();
        w.write_all(head.as_bytes()).await?;
        w.write_all(body).await?;
        w.flush().await?;
        read_response(conn).await
    }
}

async fn read_response<R: AsyncRead + Unpin>(
    r: &mut BufReader<R>,
) -> std::io::Result<(u16, Option<Duration>, bool, Vec<u8>)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut head = Vec::new();
    // Headers end at an empty line.
    loop {
        let n = r.read_until(b'\n', &mut head).await?;
        if n == 0 {
            return Err(bad("connection closed before the response"));
        }
        if head.ends_with(b"\r\n\r\n") || head.ends_with(b"\n\n") {
            break;
        }
        if head.len() > 64 * 1024 {
            return Err(bad("response headers too large"));
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(&head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(bad("unparsable response")),
    }
    let status = resp.code.ok_or_else(|| bad("no status"))?;
    let header = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let retry_after = header("retry-after")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"))
        || resp.version == Some(0);
    let chunked =
        header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let length = header("content-length").and_then(|v| v.parse::<usize>().ok());
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).await?;
            let size = std::str::from_utf8(&line)
                .ok()
                .and_then(|l| usize::from_str_radix(l.trim().split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| bad("bad chunk size"))?;
            if size == 0 {
                // Trailers until the empty line.
                loop {
                    line.clear();
                    if r.read_until(b'\n', &mut line).await? == 0
                        || line == b"\r\n"
                        || line == b"\n"
                    {
                        break;
                    }
                }
                break;
            }
            if body.len() + size > MAX_BODY {
                return Err(bad("response body too large"));
            }
            let start = body.len();
            body.resize(start + size, 0);
            r.read_exact(&mut body[start..]).await?;
            line.clear();
            r.read_until(b'\n', &mut line).await?;
        }
    } else if let Some(len) = length {
        if len > MAX_BODY {
            return Err(bad("response body too large"));
        }
        body.resize(len, 0);
        r.read_exact(&mut body).await?;
    } else if !(100..200).contains(&status) && status != 204 && status != 304 {
        // No length: the body runs to the end of the connection.
        (&mut *r)
            .take(MAX_BODY as u64)
            .read_to_end(&mut body)
            .await?;
        close = true;
    }
    Ok((status, retry_after, close, body))
}

/// Items of an ES `_bulk` response that failed (`"errors": true` and a per-item `error`).
fn bulk_item_errors(body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    if v.get("errors").and_then(|e| e.as_bool()) != Some(true) {
        return 0;
    }
    v.get("items")
        .and_then(|i| i.as_array())
        .map(|items| {
            items
                .iter()
                .filter(|it| {
                    it.as_object()
                        .and_then(|o| o.values().next())
                        .is_some_and(|r| r.get("error").is_some())
                })
                .count() as u64
        })
        .unwrap_or(0)
}

fn snippet(body: &[u8]) -> String {
    String::from_utf8_lossy(&body[..body.len().min(200)])
        .trim()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Kind;

    fn rec() -> Arc<Record> {
        Arc::new(Record {
            kind: Kind::Drop,
            time: "1970-01-01T00:00:01.500000Z".into(),
            line: bytes::Bytes::from_static(b"{\"a\":1}"),
            otlp: bytes::Bytes::new(),
        })
    }

    #[test]
    fn bodies_per_mode() {
        let mk = |mode| {
            HttpSink::new(
                "h",
                1,
                "/",
                None,
                mode,
                Some("tok".into()),
                Duration::from_secs(1),
            )
        };
        assert_eq!(mk(HttpMode::Generic).body(&[rec()]), b"{\"a\":1}\n");
        assert_eq!(
            mk(HttpMode::ElasticsearchBulk).body(&[rec()]),
            b"{\"create\":{}}\n{\"a\":1}\n"
        );
        let hec = mk(HttpMode::SplunkHec);
        assert_eq!(hec.auth.as_deref(), Some("Splunk tok"));
        let body = hec.body(&[rec()]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["event"]["a"], 1);
        assert_eq!(v["time"].as_f64(), Some(1.5));
    }

    #[tokio::test]
    async fn parses_chunked_and_length_responses() {
        let raw = b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        let mut r = BufReader::new(&raw[..]);
        let (status, ra, close, body) = read_response(&mut r).await.unwrap();
        assert_eq!(
            (status, ra, close, body.as_slice()),
            (429, Some(Duration::from_secs(3)), false, &b"abcde"[..])
        );
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
        let mut r = BufReader::new(&raw[..]);
        let (status, _, close, body) = read_response(&mut r).await.unwrap();
        assert_eq!((status, close, body.as_slice()), (200, true, &b"ok"[..]));
    }

    #[test]
    fn bulk_errors_counted() {
        let b = br#"{"errors":true,"items":[{"create":{"status":201}},{"create":{"status":400,"error":{"type":"x"}}}]}"#;
        assert_eq!(bulk_item_errors(b), 1);
        assert_eq!(bulk_item_errors(br#"{"errors":false,"items":[]}"#), 0);
    }
}
