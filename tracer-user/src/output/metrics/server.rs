//! The `--metrics` HTTP endpoint: `/metrics` (the registry in the text exposition format),
//! `/healthz` and `/readyz`. A small hand-written HTTP/1.1 server: GET and HEAD, one request
//! per connection.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::Metrics;

/// Serves until the runtime stops. One request per connection (Connection: close).
pub(crate) async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(10), async {
                let mut buf = Vec::with_capacity(1024);
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 16 * 1024 {
                    match conn.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let (status, ctype, body) = respond(&buf, &metrics);
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes()).await;
                let _ = conn.write_all(body.as_bytes()).await;
                let _ = conn.shutdown().await;
            })
            .await;
        });
    }
}

fn respond(req: &[u8], metrics: &Metrics) -> (&'static str, &'static str, String) {
    let line = req.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return ("405 Method Not Allowed", TEXT, "GET only\n".to_string());
    }
    match path {
        "/metrics" => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(),
        ),
        "/healthz" => ("200 OK", TEXT, "ok\n".to_string()),
        "/readyz" if metrics.is_ready() => ("200 OK", TEXT, "ready\n".to_string()),
        "/readyz" => (
            "503 Service Unavailable",
            TEXT,
            "not attached yet\n".to_string(),
        ),
        _ => ("404 Not Found", TEXT, "not found\n".to_string()),
    }
}

/// Where `--metrics` listens; `:9090` means all addresses.
pub(crate) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let full = if s.starts_with(':') {
        format!("0.0.0.0{s}")
    } else {
        s.to_string()
    };
    full.parse()
        .map_err(|_| format!("`{s}` is not an address:port (e.g. 127.0.0.1:9090 or :9090)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let m = Metrics::new(1);
        assert_eq!(
            respond(b"GET /readyz HTTP/1.1\r\n\r\n", &m).0,
            "503 Service Unavailable"
        );
        m.set_ready(true);
        assert_eq!(respond(b"GET /readyz HTTP/1.1\r\n\r\n", &m).0, "200 OK");
        assert_eq!(respond(b"GET /healthz HTTP/1.1\r\n\r\n", &m).0, "200 OK");
        assert_eq!(
            respond(b"GET /nope HTTP/1.1\r\n\r\n", &m).0,
            "404 Not Found"
        );
        assert_eq!(parse_addr(":9090").unwrap().port(), 9090);
        assert!(parse_addr("nope").is_err());
    }
}
