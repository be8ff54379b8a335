//! The output flags shared by `droptrace run` and `droptrace replay`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use super::{HttpMode, OutputError, OutputOptions, SinkSpec, TlsFiles};
use crate::encode::Format;

/// Env var holding the HTTP Authorization header value (instead of `--http-auth-file`).
pub(crate) const AUTH_ENV: &str = "DROPTRACE_HTTP_AUTH";

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    /// Where events go, repeatable: `-` (stdout), `file:PATH`, `tcp://HOST:PORT`,
    /// `syslog+tcp://HOST:PORT`, `syslog+tls://HOST:PORT`, `http(s)://HOST:PORT/PATH`,
    /// OpenTelemetry logs over gRPC `otlp://HOST:PORT` (TLS: `otlps://`) or HTTP
    /// `otlp+http://HOST:PORT` (TLS: `otlp+https://`).
    #[arg(long = "output", short = 'o', value_name = "SINK", default_value = "-")]
    pub(crate) outputs: Vec<String>,
    /// Line format: native (droptrace.v1), ecs (Elastic Common Schema), ocsf (Network
    /// Activity), or text (one readable line per event, for terminals and files). Default:
    /// text when stdout is a terminal and is the only output, else native.
    #[arg(long, value_parser = parse_format)]
    pub(crate) format: Option<Format>,
    /// Rotate file outputs past this size (e.g. 100M; 0 = never).
    #[arg(long, default_value = "100M", value_parser = parse_size)]
    pub(crate) rotate_size: u64,
    /// Rotated files kept (PATH.1 … PATH.N).
    #[arg(long, default_value_t = 5)]
    pub(crate) rotate_keep: u32,
    /// CA certificates (PEM) for syslog+tls:// and https:// (default: the system bundle).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "client_key")]
    pub(crate) client_cert: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[arg(long, value_name = "FILE", requires = "client_cert")]
    pub(crate) client_key: Option<PathBuf>,
    /// Body shape of http(s):// outputs: generic (NDJSON), elasticsearch-bulk, splunk-hec.
    #[arg(long, default_value = "generic")]
    pub(crate) http_mode: HttpMode,
    /// File holding the HTTP Authorization header value (e.g. `ApiKey …`, `Basic …`; a bare
    /// token in splunk-hec mode), for http(s):// and otlp outputs. The DROPTRACE_HTTP_AUTH
    /// env var works too. OTLP outputs also send OTEL_EXPORTER_OTLP_HEADERS.
    #[arg(long, value_name = "FILE")]
    pub(crate) http_auth_file: Option<PathBuf>,
    /// Most events per write or HTTP request.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) batch: u32,
    /// Keep undelivered events on disk here (one subdirectory per output) and replay them in
    /// order when the receiver is back. Without it, a full memory queue discards (counted).
    #[arg(long, value_name = "DIR")]
    pub(crate) spool_dir: Option<PathBuf>,
    /// Spool size cap per output (e.g. 256M); past it new events are discarded (counted).
    #[arg(long, default_value = "256M", value_parser = parse_nonzero_size)]
    pub(crate) spool_max: u64,
    /// Events held in memory per output.
    #[arg(long, default_value_t = 8192, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) queue_size: u32,
    /// At exit, how long outputs get to deliver what is queued (the rest stays spooled).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub(crate) flush_timeout: Duration,
    /// Connect, handshake, write and HTTP response timeout.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    pub(crate) io_timeout: Duration,
    /// Serve Prometheus metrics (/metrics, /healthz, /readyz) on ADDR, e.g. 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR", value_parser = super::metrics::parse_addr)]
    pub(crate) metrics: Option<SocketAddr>,
    /// Pods that get their own label in droptrace_drops_total; later ones count as "other".
    #[arg(long, default_value_t = super::metrics::DEFAULT_MAX_PODS)]
    pub(crate) metrics_max_pods: usize,
    /// Write each stall incident as a Kubernetes Event (events.k8s.io/v1) on the client pod,
    /// and on the destination pod for ingress denials (needs --k8s-api or --kubeconfig, and
    /// create/patch on events.events.k8s.io).
    #[arg(long)]
    pub k8s_events: bool,
}

impl OutputArgs {
    /// The sinks and options; reads the auth file. `node` names the output's own events.
    pub fn resolve(&self, node: &str) -> Result<(Vec<SinkSpec>, OutputOptions), OutputError> {
        let specs = self
            .outputs
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<SinkSpec>, _>>()?;
        let http_auth = match &self.http_auth_file {
            Some(path) => {
                let bad = |why: String| {
                    OutputError::Spec(format!("--http-auth-file {}: {why}", path.display()))
                };
                let value = std::fs::read_to_string(path)
                    .map_err(|e| bad(e.to_string()))?
                    .trim()
                    .to_string();
                if value.is_empty() {
                    return Err(bad(
                        "empty (expected the Authorization value, e.g. `Bearer TOKEN`)".into(),
                    ));
                }
                Some(value)
            }
            None => std::env::var(AUTH_ENV).ok().map(|s| s.trim().to_string()),
        }
        .filter(|s| !s.is_empty());
        if http_auth.as_ref().is_some_and(|a| a.contains(['\r', '\n'])) {
            return Err(OutputError::Spec(
                "the HTTP auth value has a line break".into(),
            ));
        }
        let otlp_headers = if specs
            .iter()
            .any(|s| matches!(s.target, super::Target::Otlp { .. }))
        {
            super::sink::otlp::env_headers().map_err(OutputError::Spec)?
        } else {
            Vec::new()
        };
        let format = self.format(&specs, stdout_is_terminal())?;
        Ok((
            specs,
            OutputOptions {
                otlp_headers,
                format,
                node: node.to_string(),
                rotate_size: self.rotate_size,
                rotate_keep: self.rotate_keep,
                tls: TlsFiles {
                    ca: self.ca.clone(),
                    client_cert: self.client_cert.clone(),
                    client_key: self.client_key.clone(),
                },
                http_mode: self.http_mode,
                http_auth,
                batch: self.batch as usize,
                spool_dir: self.spool_dir.clone(),
                spool_max: self.spool_max,
                queue_size: self.queue_size as usize,
                flush_timeout: self.flush_timeout,
                io_timeout: self.io_timeout,
                metrics_addr: self.metrics,
                metrics_max_pods: self.metrics_max_pods,
                lossless: false,
                // The caller adds the API connection.
                k8s_events: None,
            },
        ))
    }
}

impl OutputArgs {
    /// `--format`, or its default: text on a terminal that is the only output, else native.
    /// Text goes to terminals and files only, and is coloured on a terminal (unless NO_COLOR).
    pub(crate) fn format(&self, specs: &[SinkSpec], tty: bool) -> Result<Format, OutputError> {
        let only_stdout = specs.iter().all(|s| s.target == super::Target::Stdout);
        let format = match self.format {
            Some(f) => f,
            None if tty && only_stdout && self.spool_dir.is_none() => Format::Text,
            None => Format::Native,
        };
        if !format.is_text() {
            return Ok(format);
        }
        if let Some(s) = specs.iter().find(|s| s.target.is_network()) {
            return Err(OutputError::Spec(format!(
                "--format text is for terminals and files, not for --output {} (use native, ecs or ocsf)",
                s.name
            )));
        }
        if self.spool_dir.is_some() {
            return Err(OutputError::Spec(
                "--format text is for terminals and files, not with --spool-dir".into(),
            ));
        }
        let color = tty && only_stdout && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        Ok(if color {
            Format::TextColor
        } else {
            Format::Text
        })
    }
}

fn stdout_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(1) == 1 }
}

fn parse_format(s: &str) -> Result<Format, String> {
    s.parse()
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!("`{s}`: a zero timeout fails every attempt"));
    }
    Ok(d)
}

fn parse_nonzero_size(s: &str) -> Result<u64, String> {
    match parse_size(s)? {
        0 => Err(format!("`{s}`: a spool of 0 bytes holds nothing")),
        n => Ok(n),
    }
}

/// `1048576`, `512K`, `100M`, `2G` (binary multiples; an optional trailing `B`/`iB`).
pub(crate) fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&t[..i], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("`{s}` is not a size (e.g. 4096, 512K, 100M, 2G)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("1k"), Ok(1024));
        assert!(parse_size("x").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
