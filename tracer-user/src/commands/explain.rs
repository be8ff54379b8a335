//! `droptrace explain`: would this connection pass the cluster's NetworkPolicies, which
//! policy decides, and what to apply if it does not.
use std::{fmt::Write as _, net::IpAddr, path::PathBuf, str::FromStr};

use serde_json::json;

use crate::enrich::model::{self, ObjectKey, Protocol};
use crate::{
    enrich::k8s::{
        ApiArgs, Cluster, DEFAULT_IP_HISTORY, FlowQuery, FlowReport, LiveError, LiveOptions,
        SnapshotError, evaluate_flow, live,
        snapshot::{Mode, Snapshot},
    },
    enrich::policy::DirectionVerdict,
};

#[derive(clap::Args, Debug, Clone)]
#[command(group = clap::ArgGroup::new("cluster")
    .required(true)
    .multiple(true)
    .args(["k8s_snapshot", "k8s_api", "kubeconfig"]))]
pub struct ExplainArgs {
    /// Cluster snapshot: `kubectl get pods,services,endpointslices,namespaces,networkpolicies
    /// -A -o json` output, or YAML manifests.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["k8s_api", "kubeconfig"])]
    pub k8s_snapshot: Option<PathBuf>,
    // Or the live cluster, listed once.
    #[command(flatten)]
    pub k8s: ApiArgs,
    /// The connecting side: NAMESPACE/POD or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub from: String,
    /// The side connected to: NAMESPACE/POD, NAMESPACE/SERVICE or an IP address.
    #[arg(long, value_name = "NS/POD|IP")]
    pub to: String,
    /// Destination port.
    #[arg(long)]
    pub port: String,
    /// TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// More ports for the suggested fix (an Oracle redirect port, say), comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "PORT")]
    pub extra_ports: Vec<String>,
    /// Print the result as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Bad input, as the one line after `droptrace: `.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Api(#[from] LiveError),
    #[error("{0}")]
    Input(String),
}

impl ExplainError {
    /// 2 for bad input, 1 for a cluster that could not be read (an API server down, say).
    pub fn exit_code(&self) -> u8 {
        match self {
            ExplainError::Api(e) if !e.is_input() => 1,
            _ => 2,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Explanation {
    pub from: String,
    pub to: String,
    pub protocol: Protocol,
    pub port: u16,
    pub report: FlowReport,
}

pub fn run(args: &ExplainArgs) -> Result<Explanation, ExplainError> {
    let port = parse_port("--port", &args.port)?;
    let extra_ports = args
        .extra_ports
        .iter()
        .map(|p| parse_port("--extra-ports", p))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = Protocol::from_str(&args.protocol)
        .map_err(|e| ExplainError::Input(format!("--protocol: {e}")))?;
    // Where objects come from, for messages: the file, or the API server.
    let (cluster, origin) = match &args.k8s_snapshot {
        Some(path) => (
            Snapshot::read(path, Mode::Strict)?.into_cluster(model::now(), DEFAULT_IP_HISTORY),
            Origin {
                name: path.display().to_string(),
                what: "the snapshot",
            },
        ),
        None => {
            let opts = LiveOptions {
                // Policies are evaluated on pods: nodes only refine node addresses.
                nodes: false,
                ..LiveOptions::default()
            };
            let (cluster, server) = live::load_once(&args.k8s, &opts)?;
            let origin = Origin {
                name: server,
                what: "the cluster",
            };
            (cluster, origin)
        }
    };
    let (src, from) = resolve(&cluster, &origin, &args.from, false)?;
    let (dst, to) = resolve(&cluster, &origin, &args.to, true)?;
    let q = FlowQuery {
        src,
        dst,
        protocol,
        port,
        at: None,
    };
    Ok(Explanation {
        from,
        to,
        protocol,
        port,
        report: evaluate_flow(&cluster, &q, &extra_ports),
    })
}

fn parse_port(flag: &str, s: &str) -> Result<u16, ExplainError> {
    match s.trim().parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(ExplainError::Input(format!(
            "{flag}: {s:?} is not a port (1-65535)"
        ))),
    }
}

struct Origin {
    name: String,
    what: &'static str,
}

/// An address and how to name it: `ns/pod (ip)`.
fn resolve(
    cluster: &Cluster,
    origin: &Origin,
    spec: &str,
    services_too: bool,
) -> Result<(IpAddr, String), ExplainError> {
    if let Ok(ip) = spec.parse::<IpAddr>() {
        return Ok((ip, ip.to_string()));
    }
    let Some(key) = ObjectKey::parse(spec) else {
        return Err(ExplainError::Input(format!(
            "{spec:?} is neither NAMESPACE/POD nor an IP address"
        )));
    };
    let file = &origin.name;
    if let Some(pod) = cluster.pod(&key) {
        let ip = pod
            .ips
            .first()
            .ok_or_else(|| ExplainError::Input(format!("{file}: pod {key} has no IP address")))?;
        return Ok((*ip, format!("{key} ({ip})")));
    }
    if services_too && let Some(ip) = cluster.service(&key).and_then(|s| s.cluster_ips.first()) {
        return Ok((*ip, format!("service {key} ({ip})")));
    }
    Err(ExplainError::Input(format!(
        "{file}: no pod {key} in {}",
        origin.what
    )))
}

impl Explanation {
    pub fn text(&self) -> String {
        let r = &self.report;
        let mut out = format!(
            "{} -> {} {}/{}\n",
            self.from, self.to, self.protocol, self.port
        );
        if let Some(b) = &r.backend {
            let _ = writeln!(out, "evaluated against backend pod {b}");
        }
        for d in [&r.verdict.egress, &r.verdict.ingress] {
            direction_text(&mut out, d);
        }
        let _ = writeln!(
            out,
            "verdict: {} ({})",
            r.policy.verdict, r.policy.direction
        );
        if let Some(fix) = &r.policy.suggested_fix {
            let _ = write!(out, "\nsuggested fix:\n{fix}");
        }
        if let Some(c) = &r.policy.fix_check {
            out.push_str(&fix_check_text(c));
        }
        out
    }

    pub fn json(&self) -> serde_json::Value {
        let r = &self.report;
        json!({
            "from": self.from,
            "to": self.to,
            "protocol": self.protocol.as_str(),
            "port": self.port,
            "source": r.source,
            "destination": r.destination,
            "backend": r.backend,
            "egress": r.verdict.egress,
            "ingress": r.verdict.ingress,
            "policy": r.policy,
        })
    }
}

fn direction_text(out: &mut String, d: &DirectionVerdict) {
    let verdict = if d.allowed { "allowed" } else { "denied" };
    let _ = writeln!(out, "{:<8} {verdict}", format!("{}:", d.direction.as_str()));
    if !d.policies.is_empty() {
        let names: Vec<String> = d
            .policies
            .iter()
            .map(|p| match p.rule {
                Some(r) => format!("{}/{} (rule {r})", p.namespace, p.name),
                None => format!("{}/{}", p.namespace, p.name),
            })
            .collect();
        let label = if d.allowed {
            "allowed by"
        } else {
            "isolated by"
        };
        let _ = writeln!(out, "  {label}: {}", names.join(", "));
    }
    let _ = writeln!(out, "  {}", d.explanation);
    for m in &d.near_misses {
        let _ = writeln!(out, "  closest: {m}");
    }
}

/// The fix re-evaluated, for people: does it let the flow through, and what else.
pub fn fix_check_text(c: &crate::event::FixCheck) -> String {
    let mut out = String::from("\nfix check (the snapshot re-evaluated with the fix applied):\n");
    out.push_str(if c.allows_flow {
        "  allows this flow\n"
    } else {
        "  does NOT allow this flow\n"
    });
    for d in &c.still_denied {
        let _ = writeln!(
            out,
            "  still denies {}/{} (a port it is also for)",
            d.protocol, d.port
        );
    }
    if c.newly_allowed.is_empty() {
        out.push_str("  allows nothing else\n");
        return out;
    }
    let _ = writeln!(
        out,
        "  also allows {}{} other connection(s):",
        c.newly_allowed.len(),
        if c.truncated { "+" } else { "" }
    );
    for a in &c.newly_allowed {
        let _ = writeln!(out, "    {} -> {} {}/{}", a.from, a.to, a.protocol, a.port);
    }
    out
}
