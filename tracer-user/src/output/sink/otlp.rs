//! OpenTelemetry logs: `otlp+http(s)://` (OTLP/HTTP, protobuf, POST /v1/logs) and
//! `otlp(s)://` (OTLP/gRPC, `LogsService/Export` over HTTP/2).
//!
//! One LogRecord per event: the body is the event's line in the chosen `--format`; the
//! attributes SIEMs filter on, severity and timestamps come from the event itself. They are
//! worked out once per event on the encoder task ([`sidecar`]) and travel with the record
//! (through the spool too), so a sink only concatenates. The protobuf messages
//! (opentelemetry-proto `collector/logs/v1`, `logs/v1`, `common/v1`, `resource/v1`) are
//! few and flat: they are written by hand here rather than generated.
use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::{
    DeliverError, Record,
    stream::{self, TlsTarget},
};
use crate::{
    encode::{Side, rfc3339_nanos, subject},
    event::{Endpoint, Event, Kind},
};

/// gRPC method of the OTLP logs service.
pub(crate) const GRPC_PATH: &str = "/opentelemetry.proto.collector.logs.v1.LogsService/Export";
/// OTLP/HTTP logs path.
pub(crate) const HTTP_PATH: &str = "/v1/logs";
pub(crate) const GRPC_PORT: u16 = 4317;
pub(crate) const HTTP_PORT: u16 = 4318;

/// Protobuf wire encoding, the few primitives the OTLP messages need.
mod pb {
    pub(crate) fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, (u64::from(field) << 3) | u64::from(wire));
    }

    pub(crate) fn bytes(out: &mut Vec<u8>, field: u32, b: &[u8]) {
        key(out, field, 2);
        varint(out, b.len() as u64);
        out.extend_from_slice(b);
    }

    pub(crate) fn string(out: &mut Vec<u8>, field: u32, s: &str) {
        bytes(out, field, s.as_bytes());
    }

    pub(crate) fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }

    pub(crate) fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// A nested message written by `f`.
    pub(crate) fn message(out: &mut Vec<u8>, field: u32, f: impl FnOnce(&mut Vec<u8>)) {
        let mut inner = Vec::new();
        f(&mut inner);
        bytes(out, field, &inner);
    }

    /// One field of a message: (number, wire type, value); varints as their value,
    /// length-delimited as the bytes. `None` on malformed input.
    pub(crate) enum Value<'a> {
        Int(u64),
        Bytes(&'a [u8]),
    }

    pub(crate) fn fields(mut b: &[u8]) -> Option<Vec<(u32, Value<'_>)>> {
        let mut out = Vec::new();
        let read_varint = |b: &mut &[u8]| -> Option<u64> {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let (&byte, rest) = b.split_first()?;
                *b = rest;
                v |= u64::from(byte & 0x7f) << shift;
                if byte < 0x80 {
                    return Some(v);
                }
            }
            None
        };
        while !b.is_empty() {
            let k = read_varint(&mut b)?;
            let field = (k >> 3) as u32;
            match k & 7 {
                0 => out.push((field, Value::Int(read_varint(&mut b)?))),
                1 => b = b.get(8..)?,
                5 => b = b.get(4..)?,
                2 => {
                    let len = read_varint(&mut b)? as usize;
                    let v = b.get(..len)?;
                    b = &b[len..];
                    out.push((field, Value::Bytes(v)));
                }
                _ => return None,
            }
        }
        Some(out)
    }
}

/// An attribute value (`AnyValue`).
enum AnyValue<'a> {
    Str(&'a str),
    Int(i64),
}

fn key_value(out: &mut Vec<u8>, field: u32, key: &str, value: AnyValue) {
    pb::message(out, field, |kv| {
        pb::string(kv, 1, key);
        pb::message(kv, 2, |v| match value {
            AnyValue::Str(s) => pb::string(v, 1, s),
            // int_value is an int64: negative numbers as their two's complement varint.
            AnyValue::Int(i) => pb::uint(v, 3, i as u64),
        });
    });
}

/// OpenTelemetry SeverityNumber by kind (as the syslog severities): lost events are errors,
/// drops, stalls and storms warnings, Oracle handshakes and connects information, the raw
/// per-signal records debug.
pub(crate) fn severity(kind: Kind) -> (u64, &'static str) {
    match kind {
        Kind::Lost => (17, "ERROR"),
        Kind::Drop | Kind::Stall | Kind::Storm => (13, "WARN"),
        Kind::Tns | Kind::Connect => (9, "INFO"),
        Kind::TcpState | Kind::Retransmit | Kind::Conntrack => (5, "DEBUG"),
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What an OTLP sink needs of an event beyond its line: `node` (field 1, the resource's
/// k8s.node.name) and the LogRecord fields other than the body (field 2), protobuf-encoded.
pub(crate) fn sidecar(e: &Event) -> Bytes {
    let mut rec = Vec::with_capacity(512);
    let time = rfc3339_nanos(&e.time)
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(0);
    log_fields(&mut rec, e.kind, time);
    attributes(&mut rec, e);
    let mut out = Vec::with_capacity(rec.len() + e.node.len() + 8);
    pb::string(&mut out, 1, &e.node);
    pb::bytes(&mut out, 2, &rec);
    Bytes::from(out)
}

/// time_unix_nano, observed_time_unix_nano, severity, event_name.
fn log_fields(rec: &mut Vec<u8>, kind: Kind, time: u64) {
    if time != 0 {
        pb::fixed64(rec, 1, time);
    }
    pb::fixed64(rec, 11, now_nanos());
    let (number, text) = severity(kind);
    pb::uint(rec, 2, number);
    pb::string(rec, 3, text);
    pb::string(rec, 12, &format!("droptrace.{}", kind.as_str()));
}

/// Attributes named by the OpenTelemetry semantic conventions where one exists (network.*,
/// source.*, destination.*, k8s.*, process.*), `droptrace.*` for the rest.
fn attributes(rec: &mut Vec<u8>, e: &Event) {
    let mut s = |k: &str, v: &str| key_value(rec, 6, k, AnyValue::Str(v));
    s("droptrace.kind", e.kind.as_str());
    let reason = e
        .drop
        .as_ref()
        .map(|d| d.reason.as_str())
        .or_else(|| e.drops.as_ref()?.first().map(|d| d.reason.as_str()))
        .or_else(|| e.lost.as_ref().map(|l| l.reason.as_str()));
    if let Some(r) = reason {
        s("droptrace.drop.reason", r);
    }
    let class = e
        .drop
        .as_ref()
        .map(|d| d.class)
        .or_else(|| e.drops.as_ref()?.first().map(|d| d.class));
    if let Some(c) = class {
        s("droptrace.drop.class", c.as_str());
    }
    if let Some(a) = &e.attempt {
        s("droptrace.attempt.outcome", &a.outcome);
    }
    if let Some(p) = &e.policy {
        s("droptrace.policy.verdict", &p.verdict);
        s("droptrace.policy.direction", &p.direction);
        if let Some(first) = p.policies.first() {
            s(
                "droptrace.policy.name",
                &format!("{}/{}", first.namespace, first.name),
            );
        }
    }
    if let Some(d) = &e.diagnosis {
        s("droptrace.diagnosis", d);
    }
    let mut ints: Vec<(&str, i64)> = vec![("droptrace.count", e.count as i64)];
    if let Some(f) = &e.flow {
        s("network.transport", &f.proto);
        s(
            "network.type",
            match f.family {
                crate::event::Family::Ipv4 => "ipv4",
                crate::event::Family::Ipv6 => "ipv6",
            },
        );
        let (src, dst) = (f.src_ip.to_string(), f.dst_ip.to_string());
        s("source.address", &src);
        s("destination.address", &dst);
        s("network.peer.address", &dst);
        ints.extend([
            ("source.port", i64::from(f.src_port)),
            ("destination.port", i64::from(f.dst_port)),
            ("network.peer.port", i64::from(f.dst_port)),
        ]);
        if let Some(c) = f.community_id_or_compute() {
            s("droptrace.flow.community_id", &c);
        }
    }
    if let Some((side, ep)) = subject(e) {
        pod_attributes(&mut s, "", ep);
        // The other side, when it is a pod too.
        let other = match side {
            Side::Source => e.destination.as_deref(),
            Side::Destination => e.source.as_deref(),
        };
        if let Some(o) = other.filter(|o| o.pod.is_some()) {
            let prefix = match side {
                Side::Source => "droptrace.destination.",
                Side::Destination => "droptrace.source.",
            };
            pod_attributes(&mut s, prefix, o);
        }
    }
    if let Some(p) = &e.process {
        s("process.executable.name", &p.comm);
        ints.push(("process.pid", i64::from(p.tgid)));
        if let Some(c) = &p.container_id {
            s("container.id", c);
        }
    }
    for (k, v) in ints {
        key_value(rec, 6, k, AnyValue::Int(v));
    }
}

fn pod_attributes(s: &mut impl FnMut(&str, &str), prefix: &str, ep: &Endpoint) {
    if let Some(p) = &ep.pod {
        s(&format!("{prefix}k8s.pod.name"), p);
    }
    if let Some(n) = &ep.namespace {
        s(&format!("{prefix}k8s.namespace.name"), n);
    }
    if prefix.is_empty()
        && let Some(u) = &ep.pod_uid
    {
        s("k8s.pod.uid", u);
    }
}

/// Resource attributes shared by every request: service.name=droptrace, service.version,
/// host.name (this machine); k8s.node.name comes from each event's node.
#[derive(Debug, Clone)]
pub(crate) struct Resource {
    host: String,
}

impl Resource {
    pub(crate) fn new(host: &str) -> Self {
        Self {
            host: host.to_string(),
        }
    }

    fn write(&self, out: &mut Vec<u8>, node: &str) {
        let mut s = |k: &str, v: &str| key_value(out, 1, k, AnyValue::Str(v));
        s("service.name", "droptrace");
        s("service.version", env!("CARGO_PKG_VERSION"));
        s("host.name", &self.host);
        if !node.is_empty() {
            s("k8s.node.name", node);
        }
    }
}

/// (node, LogRecord fields) of a record; records spooled without a sidecar (an older
/// droptrace) get severity and time from the kind and time they carry.
fn parts(r: &Record) -> (String, Vec<u8>) {
    let from_sidecar = pb::fields(&r.otlp).and_then(|fields| {
        let mut node = None;
        let mut rec = None;
        for (f, v) in fields {
            match (f, v) {
                (1, pb::Value::Bytes(b)) => node = std::str::from_utf8(b).ok(),
                (2, pb::Value::Bytes(b)) => rec = Some(b.to_vec()),
                _ => {}
            }
        }
        Some((node?.to_string(), rec?))
    });
    from_sidecar.unwrap_or_else(|| {
        let mut rec = Vec::new();
        let time = rfc3339_nanos(&r.time)
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        log_fields(&mut rec, r.kind, time);
        key_value(
            &mut rec,
            6,
            "droptrace.kind",
            AnyValue::Str(r.kind.as_str()),
        );
        (String::new(), rec)
    })
}

/// ExportLogsServiceRequest: one ResourceLogs per run of records from the same node.
pub(crate) fn export_request(resource: &Resource, batch: &[Arc<Record>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.iter().map(|r| r.line.len() + r.otlp.len()).sum());
    let mut i = 0;
    while i < batch.len() {
        let (node, _) = parts(&batch[i]);
        let mut records = Vec::new();
        while let Some(r) = batch.get(i) {
            let (n, mut rec) = parts(r);
            if n != node {
                break;
            }
            // body: AnyValue{string_value}
            pb::message(&mut rec, 5, |v| {
                pb::bytes(v, 1, &r.line);
            });
            records.push(rec);
            i += 1;
        }
        pb::message(&mut out, 1, |rl| {
            pb::message(rl, 1, |res| resource.write(res, &node));
            pb::message(rl, 2, |sl| {
                pb::message(sl, 1, |scope| {
                    pb::string(scope, 1, "droptrace");
                    pb::string(scope, 2, env!("CARGO_PKG_VERSION"));
                });
                for rec in &records {
                    pb::bytes(sl, 2, rec);
                }
            });
        });
    }
    out
}

/// ExportLogsServiceResponse.partial_success: (rejected_log_records, error_message).
pub(crate) fn partial_success(resp: &[u8]) -> (u64, String) {
    let Some(fields) = pb::fields(resp) else {
        return (0, String::new());
    };
    for (f, v) in fields {
        if let (1, pb::Value::Bytes(ps)) = (f, v) {
            let mut rejected = 0;
            let mut msg = String::new();
            for (g, w) in pb::fields(ps).unwrap_or_default() {
                match (g, w) {
                    (1, pb::Value::Int(n)) => rejected = n as i64,
                    (2, pb::Value::Bytes(b)) => msg = String::from_utf8_lossy(b).into_owned(),
                    _ => {}
                }
            }
            return (rejected.max(0) as u64, msg);
        }
    }
    (0, String::new())
}

/// Extra request headers from `OTEL_EXPORTER_OTLP_HEADERS` / `OTEL_EXPORTER_OTLP_LOGS_HEADERS`
/// (`key1=value1,key2=value2`, values percent-decoded), as the OpenTelemetry SDKs read them.
pub(crate) fn env_headers() -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for var in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_LOGS_HEADERS",
    ] {
        let Ok(v) = std::env::var(var) else { continue };
        out.extend(parse_headers(&v).map_err(|e| format!("{var}: {e}"))?);
    }
    Ok(out)
}

pub(crate) fn parse_headers(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}` is not key=value"))?;
        let k = k.trim().to_ascii_lowercase();
        let v = percent_decode(v.trim());
        let token = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if k.is_empty() || !k.chars().all(token) {
            return Err(format!("`{k}` is not a header name"));
        }
        if v.contains(['\r', '\n']) {
            return Err(format!("the value of `{k}` has a line break"));
        }
        out.push((k, v));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// OTLP/gRPC over one HTTP/2 connection (h2c, or TLS with ALPN h2).
pub(crate) struct GrpcSink {
    host: String,
    port: u16,
    tls: TlsTarget,
    authority: String,
    headers: Vec<(String, String)>,
    timeout: Duration,
    resource: Resource,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl GrpcSink {
    pub(crate) fn new(
        host: &str,
        port: u16,
        tls: TlsTarget,
        headers: Vec<(String, String)>,
        timeout: Duration,
        resource: Resource,
    ) -> Self {
        // gRPC over TLS needs ALPN h2.
        let tls = tls.map(|(config, name)| {
            let mut c = (*config).clone();
            c.alpn_protocols = vec![b"h2".to_vec()];
            (Arc::new(c), name)
        });
        Self {
            host: host.to_string(),
            port,
            authority: format!("{host}:{port}"),
            tls,
            headers,
            timeout,
            resource,
            conn: None,
        }
    }

    pub(crate) async fn connect(&mut self) -> Result<(), DeliverError> {
        if self.conn.as_ref().is_some_and(|c| !c.is_closed()) {
            return Ok(());
        }
        self.conn = None;
        let io = stream::dial(&self.host, self.port, &self.tls, self.timeout).await?;
        let (send, conn) = tokio::time::timeout(
            self.timeout,
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
        )
        .await
        .map_err(|_| DeliverError::retry("HTTP/2 handshake timed out"))?
        .map_err(|e| DeliverError::retry(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("OTLP/gRPC connection ended: {e}");
            }
        });
        self.conn = Some(send);
        Ok(())
    }

    /// Ok(n): accepted, `n` records rejected by the receiver (partial success).
    pub(crate) async fn deliver(&mut self, batch: &[Arc<Record>]) -> Result<u64, DeliverError> {
        self.connect().await?;
        let msg = export_request(&self.resource, batch);
        let mut framed = Vec::with_capacity(msg.len() + 5);
        framed.push(0); // not compressed
        framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        framed.extend_from_slice(&msg);
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut req = hyper::Request::builder()
            .method("POST")
            .uri(format!("{scheme}://{}{GRPC_PATH}", self.authority))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header(
                "grpc-timeout",
                format!("{}m", self.timeout.as_millis().max(1)),
            )
            .header(
                "user-agent",
                concat!("droptrace/", env!("CARGO_PKG_VERSION")),
            );
        for (k, v) in &self.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Full::new(Bytes::from(framed)))
            .map_err(|e| DeliverError::Rejected(format!("gRPC request: {e}")))?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(DeliverError::retry("not connected"));
        };
        let exchange = async {
            let resp = conn.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            let collected = body.collect().await?;
            Ok::<_, hyper::Error>((parts, collected))
        };
        let (parts, collected) = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.conn = None;
                return Err(DeliverError::retry(format!("gRPC: {e}")));
            }
            Err(_) => {
                self.conn = None;
                return Err(DeliverError::retry("gRPC request timed out"));
            }
        };
        if !parts.status.is_success() {
            self.conn = None;
            return Err(DeliverError::retry(format!("gRPC: HTTP {}", parts.status)));
        }
        let trailers = collected.trailers().cloned();
        let body = collected.to_bytes();
        // A trailers-only response carries grpc-status in the headers.
        let header = |name: &str| {
            trailers
                .as_ref()
                .and_then(|t| t.get(name))
                .or_else(|| parts.headers.get(name))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let code = header("grpc-status")
            .and_then(|c| c.trim().parse::<u32>().ok())
            .ok_or_else(|| DeliverError::retry("gRPC: response without grpc-status"))?;
        let message = header("grpc-message").unwrap_or_default();
        match code {
            0 => {
                let msg = body.get(5..).unwrap_or_default();
                let (rejected, why) = partial_success(msg);
                if rejected > 0 {
                    tracing::warn!("OTLP receiver rejected {rejected} log records: {why}");
                }
                Ok(rejected.min(batch.len() as u64))
            }
            // Retryable per the OTLP specification (CANCELLED, DEADLINE_EXCEEDED,
            // RESOURCE_EXHAUSTED, ABORTED, OUT_OF_RANGE, UNAVAILABLE, DATA_LOSS), and, as for
            // the HTTP sinks, credentials an operator fixes while the spool holds the events
            // (PERMISSION_DENIED, UNAUTHENTICATED).
            1 | 4 | 7 | 8 | 10 | 11 | 14 | 15 | 16 => Err(DeliverError::retry(format!(
                "gRPC status {code}: {message}"
            ))),
            _ => Err(DeliverError::Rejected(format!(
                "gRPC status {code}: {message}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fields_round_trip() {
        let mut out = Vec::new();
        pb::uint(&mut out, 1, 300);
        pb::string(&mut out, 2, "hi");
        pb::fixed64(&mut out, 3, 7);
        pb::uint(&mut out, 4, u64::MAX);
        assert_eq!(&out[..3], &[0x08, 0xac, 0x02]);
        let f = pb::fields(&out).unwrap();
        assert_eq!(f.len(), 3, "fixed64 is skipped, the rest read back");
        assert!(matches!(f[0], (1, pb::Value::Int(300))));
        assert!(matches!(f[1], (2, pb::Value::Bytes(b"hi"))));
        assert!(matches!(f[2], (4, pb::Value::Int(u64::MAX))));
        assert!(pb::fields(&[0x0a, 0x05, 0x01]).is_none(), "truncated");
    }

    #[test]
    fn partial_success_is_read() {
        let mut ps = Vec::new();
        pb::uint(&mut ps, 1, 3);
        pb::string(&mut ps, 2, "bad records");
        let mut resp = Vec::new();
        pb::bytes(&mut resp, 1, &ps);
        assert_eq!(partial_success(&resp), (3, "bad records".into()));
        assert_eq!(partial_success(&[]), (0, String::new()));
    }

    #[test]
    fn headers_from_the_environment_format() {
        assert_eq!(
            parse_headers("api-key=a%20b, X-Tenant = t1").unwrap(),
            [
                ("api-key".to_string(), "a b".to_string()),
                ("x-tenant".to_string(), "t1".to_string())
            ]
        );
        assert!(parse_headers("novalue").is_err());
        assert!(parse_headers("bad key=1").is_err());
        assert!(parse_headers("k=a%0Db").is_err());
    }

    #[test]
    fn records_of_two_nodes_get_two_resources() {
        let mk = |node: &str| {
            let e = Event::new(Kind::Drop, "2026-01-01T00:00:01.000002Z".into(), node);
            Arc::new(Record {
                kind: Kind::Drop,
                time: e.time.clone(),
                line: Bytes::from_static(b"{}"),
                otlp: sidecar(&e),
            })
        };
        let req = export_request(&Resource::new("h"), &[mk("a"), mk("a"), mk("b")]);
        let rl: Vec<_> = pb::fields(&req).unwrap();
        assert_eq!(rl.len(), 2);
        let (_, rec) = parts(&mk("a"));
        let f = pb::fields(&rec).unwrap();
        assert!(
            f.iter()
                .any(|(n, v)| *n == 2 && matches!(v, pb::Value::Int(13)))
        );
    }
}
