//! `--output` values: `-`, `file:PATH`, `tcp://`, `syslog+tcp://`, `syslog+tls://`,
//! `http(s)://`, `otlp(s)://`, `otlp+http(s)://`.
use std::{path::PathBuf, str::FromStr};

use super::otlp;
use crate::output::OutputError;

/// One `--output` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkSpec {
    /// As given; the sink's name in `lost.sink`, metrics and logs.
    pub(crate) name: String,
    pub(crate) target: Target,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    File(PathBuf),
    Tcp {
        host: String,
        port: u16,
    },
    Syslog {
        host: String,
        port: u16,
        tls: bool,
    },
    Http {
        host: String,
        port: u16,
        path: String,
        tls: bool,
    },
    /// OpenTelemetry logs over gRPC (`otlp://`, `otlps://`) or HTTP (`otlp+http(s)://`).
    Otlp {
        host: String,
        port: u16,
        /// HTTP only: where to POST (default /v1/logs).
        path: String,
        grpc: bool,
        tls: bool,
    },
}

impl Target {
    /// Sends over the network (what `--format text` and the spool are not for).
    pub(crate) fn is_network(&self) -> bool {
        !matches!(self, Target::Stdout | Target::File(_))
    }
}

impl FromStr for SinkSpec {
    type Err = OutputError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: String| OutputError::Spec(format!("--output {s}: {why}"));
        let target = if s == "-" {
            Target::Stdout
        } else if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(bad("empty path".into()));
            }
            Target::File(PathBuf::from(path))
        } else if let Some(rest) = s.strip_prefix("tcp://") {
            let (host, port) = host_port(rest, None).map_err(bad)?;
            Target::Tcp { host, port }
        } else if let Some(rest) = s.strip_prefix("syslog+tcp://") {
            let (host, port) = host_port(rest, Some(514)).map_err(bad)?;
            Target::Syslog {
                host,
                port,
                tls: false,
            }
        } else if let Some(rest) = s.strip_prefix("syslog+tls://") {
            let (host, port) = host_port(rest, Some(6514)).map_err(bad)?;
            Target::Syslog {
                host,
                port,
                tls: true,
            }
        } else if let Some((grpc, tls, rest)) = [
            ("otlp://", true, false),
            ("otlps://", true, true),
            ("otlp+http://", false, false),
            ("otlp+https://", false, true),
        ]
        .into_iter()
        .find_map(|(p, g, t)| s.strip_prefix(p).map(|r| (g, t, r)))
        {
            let (authority, path) = split_url(rest, "").map_err(bad)?;
            if grpc && !matches!(path, "" | "/") {
                return Err(bad(
                    "OTLP/gRPC takes no path (the service is LogsService/Export)".into(),
                ));
            }
            let default = if grpc {
                otlp::GRPC_PORT
            } else {
                otlp::HTTP_PORT
            };
            let (host, port) = host_port(authority, Some(default)).map_err(bad)?;
            Target::Otlp {
                host,
                port,
                path: if matches!(path, "" | "/") {
                    otlp::HTTP_PATH.to_string()
                } else {
                    path.to_string()
                },
                grpc,
                tls,
            }
        } else if let Some((tls, rest)) = s
            .strip_prefix("http://")
            .map(|r| (false, r))
            .or_else(|| s.strip_prefix("https://").map(|r| (true, r)))
        {
            let (authority, path) = split_url(rest, "/").map_err(bad)?;
            let (host, port) =
                host_port(authority, Some(if tls { 443 } else { 80 })).map_err(bad)?;
            Target::Http {
                host,
                port,
                path: path.to_string(),
                tls,
            }
        } else {
            return Err(bad(
                "unknown scheme (expected -, file:PATH, tcp://, syslog+tcp://, syslog+tls://, http://, https://, otlp://, otlps://, otlp+http://, otlp+https://)"
                    .into(),
            ));
        };
        Ok(SinkSpec {
            name: s.to_string(),
            target,
        })
    }
}

/// The authority and path of a URL after its scheme (`default_path` when it has none);
/// credentials in the URL are refused.
fn split_url<'a>(rest: &'a str, default_path: &'a str) -> Result<(&'a str, &'a str), String> {
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, default_path),
    };
    if authority.contains('@') {
        return Err("credentials in the URL are not supported; use --http-auth-file".into());
    }
    Ok((authority, path))
}

/// `host:port`, `[v6]:port`, or a bare host when there is a default port.
fn host_port(s: &str, default_port: Option<u16>) -> Result<(String, u16), String> {
    let s = s.trim_end_matches('/');
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed `[` in the address")?;
        (format!("[{h}]"), after.strip_prefix(':'))
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (s.to_string(), None),
        }
    };
    if host.is_empty() || host == "[]" {
        return Err("no host".into());
    }
    let port = match port {
        Some(p) => match p.parse::<u16>() {
            Ok(0) | Err(_) => return Err(format!("`{p}` is not a port")),
            Ok(p) => p,
        },
        None => default_port.ok_or("no port (HOST:PORT)")?,
    };
    Ok((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let t = |s: &str| s.parse::<SinkSpec>().map(|s| s.target);
        assert_eq!(t("-").unwrap(), Target::Stdout);
        assert_eq!(t("file:/tmp/x").unwrap(), Target::File("/tmp/x".into()));
        assert_eq!(
            t("tcp://127.0.0.1:5000").unwrap(),
            Target::Tcp {
                host: "127.0.0.1".into(),
                port: 5000
            }
        );
        assert_eq!(
            t("syslog+tls://[::1]").unwrap(),
            Target::Syslog {
                host: "[::1]".into(),
                port: 6514,
                tls: true
            }
        );
        assert_eq!(
            t("https://es:9200/logs/_bulk").unwrap(),
            Target::Http {
                host: "es".into(),
                port: 9200,
                path: "/logs/_bulk".into(),
                tls: true
            }
        );
        assert_eq!(
            t("http://h").unwrap(),
            Target::Http {
                host: "h".into(),
                port: 80,
                path: "/".into(),
                tls: false
            }
        );
        for bad in [
            "ftp://x",
            "tcp://host",
            "tcp://:1",
            "tcp://h:0",
            "tcp://h:99999",
            "file:",
            "http://u:p@h/",
            "syslog+tls://[::1",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
    }
}
