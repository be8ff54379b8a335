//! `droptrace explain`: would this connection pass the cluster's NetworkPolicies, which
//! policy decides, and what to apply if it does not.
use std::{fmt::Write as _, net::IpAddr, path::PathBuf, str::FromStr};

use serde_json::json;

use crate::enrich::model::{self, ObjectKey, Protocol};
use crate::{
    enrich::k8s::change::{self, Effect, Impact},
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
    #[arg(long, value_name = "NS/POD|IP", required_unless_present = "apply")]
    pub from: Option<String>,
    /// The side connected to: NAMESPACE/POD, NAMESPACE/SERVICE or an IP address.
    #[arg(long, value_name = "NS/POD|IP", required_unless_present = "apply")]
    pub to: Option<String>,
    /// Destination port.
    #[arg(long, required_unless_present = "apply")]
    pub port: Option<String>,
    /// TCP, UDP or SCTP.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// More ports for the suggested fix (an Oracle redirect port, say), comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "PORT")]
    pub extra_ports: Vec<String>,
    /// Check a policy change against observed traffic: NetworkPolicy manifests
    /// (multi-document YAML) created or replaced by namespace/name; with --flows, instead of
    /// --from/--to/--port. Prints the recorded flows whose verdict the change flips. Exit
    /// status: 0 nothing breaks, 3 a flow that was allowed becomes denied, 2 bad input.
    #[arg(
        long,
        value_name = "CHANGE.yaml",
        requires = "flows",
        conflicts_with_all = ["from", "to", "port", "extra_ports", "protocol"]
    )]
    pub apply: Option<PathBuf>,
    /// With --apply: a recorded droptrace stream (`droptrace run --emit connects` NDJSON):
    /// its connects, stalls and drops are the flows checked.
    #[arg(long, value_name = "OBSERVED.ndjson", requires = "apply")]
    pub flows: Option<PathBuf>,
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
    /// `--apply`: the change denies this many flows that were allowed (exit 3; the report is
    /// on stdout).
    #[error("the change breaks {0} observed flow(s) that were allowed")]
    Breaks(usize),
}

impl ExplainError {
    /// 2 for bad input, 1 for a cluster that could not be read (an API server down, say), 3
    /// for a change that breaks observed flows.
    pub fn exit_code(&self) -> u8 {
        match self {
            ExplainError::Api(e) if !e.is_input() => 1,
            ExplainError::Breaks(_) => 3,
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
    let (Some(from), Some(to), Some(port)) = (&args.from, &args.to, &args.port) else {
        return Err(ExplainError::Input(
            "--from, --to and --port are required (or --apply with --flows)".into(),
        ));
    };
    let port = parse_port("--port", port)?;
    let extra_ports = args
        .extra_ports
        .iter()
        .map(|p| parse_port("--extra-ports", p))
        .collect::<Result<Vec<_>, _>>()?;
    let protocol = Protocol::from_str(&args.protocol)
        .map_err(|e| ExplainError::Input(format!("--protocol: {e}")))?;
    let (cluster, origin) = load_cluster(args)?;
    let (src, from) = resolve(&cluster, &origin, from, false)?;
    let (dst, to) = resolve(&cluster, &origin, to, true)?;
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

/// `--apply CHANGE.yaml --flows OBSERVED.ndjson`: the recorded flows whose verdict the change
/// flips. The files are read here; [`change`] evaluates.
pub fn run_change(args: &ExplainArgs) -> Result<ChangeReport, ExplainError> {
    let (Some(apply), Some(flows)) = (&args.apply, &args.flows) else {
        return Err(ExplainError::Input("--apply needs --flows".into()));
    };
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read_to_string(path)
            .map_err(|e| ExplainError::Input(format!("{flag} {}: {e}", path.display())))
    };
    let change_name = apply.display().to_string();
    let flows_name = flows.display().to_string();
    let policies = change::parse_change(&change_name, &read("--apply", apply)?)
        .map_err(|e| ExplainError::Input(e.0))?;
    let recorded = change::parse_flows(&flows_name, &read("--flows", flows)?)
        .map_err(|e| ExplainError::Input(e.0))?;
    let (before, _) = load_cluster(args)?;
    let (after, applied) = change::apply(&before, &policies, model::now())
        .map_err(|e| ExplainError::Input(format!("{change_name}: {e}")))?;
    Ok(ChangeReport {
        change: change_name,
        flows: flows_name,
        impact: change::impact(&before, &after, applied, &recorded),
    })
}

/// The snapshot, or the live cluster listed once, and where it came from (for messages).
fn load_cluster(args: &ExplainArgs) -> Result<(Cluster, Origin), ExplainError> {
    Ok(match &args.k8s_snapshot {
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

/// What `--apply` found, with the files it read.
#[derive(Debug, Clone)]
pub struct ChangeReport {
    pub change: String,
    pub flows: String,
    pub impact: Impact,
}

impl ChangeReport {
    /// One block per flow whose verdict flips (breaking ones first), then a summary line.
    pub fn text(&self) -> String {
        let i = &self.impact;
        let mut out = String::new();
        for c in &i.changes {
            let label = match c.effect {
                Effect::Breaks => "BREAKS",
                Effect::Unblocks => "UNBLOCKS",
            };
            let _ = writeln!(
                out,
                "{label:<9} {} -> {} {}/{}  (observed: {})",
                c.from, c.to, c.protocol, c.port, c.observed
            );
            if let Some(b) = &c.backend {
                let _ = writeln!(out, "  evaluated against backend pod {b}");
            }
            for (when, p) in [("before", &c.before), ("after", &c.after)] {
                let names: Vec<String> = p
                    .policies
                    .iter()
                    .map(|r| format!("{}/{}", r.namespace, r.name))
                    .collect();
                let by = if names.is_empty() {
                    String::new()
                } else if p.verdict == "allowed" {
                    format!(" by {}", names.join(", "))
                } else {
                    format!(", isolated by {}", names.join(", "))
                };
                let _ = writeln!(out, "  {when:<7} {} ({}){by}", p.verdict, p.direction);
                if when == "after" {
                    let _ = writeln!(out, "          {}", p.explanation);
                }
            }
        }
        let policies: Vec<String> = i
            .policies
            .iter()
            .map(|p| format!("{}/{} ({})", p.namespace, p.name, p.action))
            .collect();
        let _ = writeln!(
            out,
            "{}: {} flow(s) from {} event(s) of {} ({} other event(s) ignored), change {}: {} \
             breaking, {} unblocked, {} unchanged",
            if i.breaks_something() { "BREAKS" } else { "OK" },
            i.flows,
            i.events,
            self.flows,
            i.ignored,
            policies.join(", "),
            i.breaks,
            i.unblocks,
            i.unchanged
        );
        out
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "change": self.change,
            "flows_file": self.flows,
            "flows": self.impact.flows,
            "events": self.impact.events,
            "ignored": self.impact.ignored,
            "policies": self.impact.policies,
            "breaks": self.impact.breaks,
            "unblocks": self.impact.unblocks,
            "unchanged": self.impact.unchanged,
            "changes": self.impact.changes,
        })
    }
}
