//! The `droptrace` command line. Every command returns `Result<(), Error>`; exit codes (0
//! success, 1 runtime failure, 2 bad input or missing privileges) are in `error.rs`.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};
use droptrace::{
    commands::{check, explain, replay, run},
    enrich::identity::{Identity, IdentityOptions},
    error::Error,
    kernel,
    output::{Output, OutputError, OutputOptions, cli::OutputArgs},
    pipeline::Emit,
};

/// mimalloc: every event is allocated on one thread and freed on the output thread, which
/// glibc's malloc serves slowly (replay spent about a tenth of its CPU in it).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "droptrace",
    version,
    about = "Finds the packet drops behind silent TCP stalls (Oracle ports by default)"
)]
struct Cli {
    /// Log level for diagnostics on stderr (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "info", env = "DROPTRACE_LOG")]
    log_level: String,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Trace this node and stream events as NDJSON.
    Run(RunArgs),
    /// Check that this kernel and these privileges can trace.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a connection against the NetworkPolicies of a cluster snapshot or the live API.
    Explain(explain::ExplainArgs),
    /// Send a captured droptrace.v1 NDJSON stream through the outputs (no kernel needed).
    Replay(ReplayArgs),
}

#[derive(Args)]
struct ReplayArgs {
    /// NDJSON file of native events, `-` for stdin.
    #[arg(long, default_value = "-")]
    input: PathBuf,
    /// Node name carried by the events droptrace adds itself (`lost`).
    #[arg(long, env = "NODE_NAME", value_parser = parse_node_name)]
    node_name: Option<String>,
    #[command(flatten)]
    output: OutputArgs,
    /// The API that --k8s-events writes to.
    #[command(flatten)]
    k8s: droptrace::enrich::k8s::ApiArgs,
}

#[derive(Args)]
struct RunArgs {
    /// TCP ports to watch, comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_port, default_value = "1521,1522,2484")]
    ports: Vec<u16>,
    /// Watch every TCP port.
    #[arg(long)]
    all_tcp: bool,
    /// Stop after this long (e.g. 30s, 5m).
    #[arg(long, visible_alias = "for", value_parser = parse_period)]
    duration: Option<Duration>,
    /// Only this pod's flows (`NAMESPACE/NAME`, resolved from --k8s-api/--kubeconfig or
    /// --k8s-snapshot).
    #[arg(long, value_name = "NAMESPACE/NAME")]
    pod: Option<String>,
    /// Stop after this many events.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_events: Option<u64>,
    /// Node name carried by every event.
    #[arg(long, env = "NODE_NAME", value_parser = parse_node_name)]
    node_name: Option<String>,
    /// Kernel ring buffer size in bytes (a power of two, multiple of the page size).
    #[arg(long, default_value_t = 1 << 22, value_parser = parse_ringbuf)]
    ringbuf_bytes: u32,
    /// Records beyond problems to put in the stream, comma-separated: all-drops (drops of
    /// every class, not only network), tns (every Oracle Net handshake), connects (each
    /// successful connect to a watched port), signals (tcp_state, retransmit, conntrack), all.
    #[arg(long, value_name = "LIST", value_parser = parse_emit)]
    emit: Option<Emit>,
    /// Everything in the stream: the same as `--emit all`.
    #[arg(long)]
    raw: bool,
    /// Report a connection attempt (or an established flow) that made no progress this long.
    #[arg(long, default_value = "3s", value_parser = parse_period)]
    stall_after: Duration,
    /// Connection attempts tracked at once; the oldest are evicted (and reported) beyond it.
    #[arg(long, default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(16..))]
    flow_table: u32,
    /// How often drop counts aggregated in the kernel are flushed into the stream.
    #[arg(long, default_value = "1s", value_parser = parse_period)]
    flush: Duration,
    /// Flows the kernel aggregates at once; beyond it each drop is a record of its own.
    #[arg(long, default_value_t = 16_384, value_parser = clap::value_parser!(u32).range(1..))]
    agg_entries: u32,
    /// New-flow drop records per second per CPU; beyond it a storm of distinct flows is
    /// counted in one record per destination, the other end (address and port) unspecified,
    /// and reported as one `storm` incident (0: no limit).
    #[arg(long, default_value_t = 1000)]
    new_flows_per_sec: u32,
    /// Where the kernel refuses the nf_ct_delete program, do not fall back to ctnetlink
    /// DESTROY events (with a listener, the kernel builds a message for every conntrack entry
    /// removed in this network namespace: a cost on nodes with very high connection churn).
    #[arg(long)]
    no_ctnetlink: bool,
    #[command(flatten)]
    output: OutputArgs,
    #[command(flatten)]
    k8s: droptrace::enrich::k8s::ApiArgs,
    /// Cluster identity from a file: `kubectl get pods,services,endpointslices,namespaces,
    /// networkpolicies -A -o json`, or YAML manifests.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["k8s_api", "kubeconfig"])]
    k8s_snapshot: Option<PathBuf>,
    /// Reload --k8s-snapshot when the file changes.
    #[arg(long, requires = "k8s_snapshot")]
    watch_snapshot: bool,
    /// How long the addresses of deleted pods still attribute late events.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    ip_history: Duration,
}

fn parse_port(s: &str) -> Result<u16, String> {
    match s.trim().parse::<u32>() {
        Ok(0) => Err("port 0 is not a port".to_string()),
        Ok(p) if p > 65535 => Err(format!("{p} is above 65535")),
        Ok(p) => Ok(p as u16),
        Err(_) => Err(format!("`{s}` is not a port number")),
    }
}

fn parse_node_name(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty (every event carries it; leave it out to use the hostname)".into());
    }
    if t.contains(char::is_control) {
        return Err(format!("{t:?} has control characters"));
    }
    Ok(t.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}`: {e}"))
}

/// A duration that drives a timer: zero would spin.
fn parse_period(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_millis(10) {
        return Err(format!("`{s}` is too short (at least 10ms)"));
    }
    Ok(d)
}

fn parse_emit(s: &str) -> Result<Emit, String> {
    Emit::parse(s).map_err(|e| e.to_string())
}

fn parse_ringbuf(s: &str) -> Result<u32, String> {
    let v: u32 = s
        .parse()
        .map_err(|_| format!("`{s}` is not a size in bytes"))?;
    if v < 4096 || !v.is_power_of_two() {
        return Err(format!("{v} must be a power of two and at least 4096"));
    }
    Ok(v)
}

/// clap's error without its usage block and tips, on one line: `error: the following
/// required arguments were not provided:\n  --from <IP>\n\nUsage: ...` ->
/// `the following required arguments were not provided: --from <IP>`.
fn one_line(clap_error: &str) -> String {
    let mut parts = Vec::new();
    for line in clap_error.lines().map(str::trim) {
        if line.is_empty() {
            if parts.is_empty() {
                continue;
            }
            break;
        }
        parts.push(line);
    }
    let msg = parts.join(" ");
    msg.strip_prefix("error: ").unwrap_or(&msg).to_string()
}

/// `--log-level`: a level, or tracing directives (`droptrace=debug,info`). A bare word that
/// is not a level would silently enable a target of that name.
fn check_log_level(level: &str) -> Result<(), String> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    for d in level.split(',').map(str::trim) {
        if !d.contains('=') && !LEVELS.contains(&d.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "--log-level {level}: `{d}` is not a level (off, error, warn, info, debug, trace) \
                 nor TARGET=LEVEL"
            ));
        }
    }
    Ok(())
}

fn init_logging(level: &str) -> Result<(), String> {
    check_log_level(level)?;
    // aya's own warning when it cannot raise RLIMIT_MEMLOCK repeats what droptrace then says
    // in its one-line error (TracerError::Memlock).
    let directives = if level.contains("aya") {
        level.to_string()
    } else {
        format!("{level},aya::sys::bpf=error")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .map_err(|e| format!("--log-level {level}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    Ok(())
}

fn main() -> ExitCode {
    match droptrace() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", e.report());
            ExitCode::from(e.exit_code())
        }
    }
}

fn droptrace() -> Result<(), Error> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return Ok(());
        }
        Err(e) => {
            use clap::error::ErrorKind;
            return Err(Error::Input(match e.kind() {
                // clap would print the whole help as the "error".
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                | ErrorKind::MissingSubcommand => {
                    "a subcommand is required: run, check, explain or replay (droptrace --help)"
                        .to_string()
                }
                _ => one_line(&e.to_string()),
            }));
        }
    };
    init_logging(&cli.log_level).map_err(Error::Input)?;
    match cli.cmd {
        Cmd::Check { json } => check(json),
        Cmd::Run(args) => run(args),
        Cmd::Replay(args) => replay(args),
        Cmd::Explain(args) => explain(&args),
    }
}

fn check(json: bool) -> Result<(), Error> {
    let report = runtime()?.block_on(async { check::run(true) });
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("report serialises")
        );
    } else {
        println!("kernel {}", report.kernel);
        for c in &report.checks {
            let mark = match (c.ok, c.required) {
                (true, _) => "ok  ",
                (false, true) => "FAIL",
                (false, false) => "warn",
            };
            println!("{mark} {:<36} {}", c.name, c.detail);
        }
    }
    match report.first_failure() {
        None => Ok(()),
        Some(f) if f.name == "privileges" => Err(Error::Privileges(format!(
            "cannot trace: {}: {}",
            f.name, f.detail
        ))),
        Some(f) => Err(Error::CannotTrace {
            check: f.name.clone(),
            detail: f.detail.clone(),
        }),
    }
}

fn run(args: RunArgs) -> Result<(), Error> {
    if let Some(why) = check::missing_privileges() {
        return Err(Error::Privileges(why));
    }
    let opts = run::RunOptions {
        ports: args.ports,
        all_tcp: args.all_tcp,
        duration: args.duration,
        max_events: args.max_events,
        node: args.node_name.unwrap_or_else(kernel::hostname),
        ringbuf_bytes: args.ringbuf_bytes,
        emit: if args.raw {
            Emit::all()
        } else {
            args.emit.unwrap_or_default()
        },
        stall_after: args.stall_after,
        flow_table: args.flow_table as usize,
        flush: args.flush,
        agg_entries: args.agg_entries,
        new_flows_per_sec: args.new_flows_per_sec,
        ct_netlink: !args.no_ctnetlink,
        pod: args.pod.clone(),
    };
    let rt = runtime()?;
    if args.output.k8s_events && !args.k8s.enabled() {
        return Err(Error::Input(K8S_EVENTS_NEEDS_API.into()));
    }
    // A bad kubeconfig is bad input, found before anything is loaded.
    let api = if args.k8s.enabled() {
        Some(rt.block_on(args.k8s.connect())?)
    } else {
        None
    };
    let events_api = api
        .as_ref()
        .filter(|_| args.output.k8s_events)
        .map(|c| c.config.clone());
    let identity = rt.block_on(Identity::start(IdentityOptions {
        snapshot: args.k8s_snapshot,
        watch_snapshot: args.watch_snapshot,
        api,
        ip_history: args.ip_history,
    }))?;
    if let Some(spec) = &opts.pod {
        match &identity {
            Some(id) => id.pod_ips(spec).map(|_| ()).map_err(Error::Input)?,
            None => {
                return Err(Error::Input(
                    "--pod needs --k8s-api, --kubeconfig or --k8s-snapshot".into(),
                ));
            }
        }
    }
    let output = rt.block_on(start_output(&args.output, &opts.node, false, events_api))?;
    let summary = rt
        .block_on(run::run(opts, output, identity))
        .map_err(|error| {
            // Refused for want of a privilege the kernel asks for (perf_event_paranoid, a
            // memlock limit before 5.11): like a missing capability, bad input.
            match error.downcast_ref::<droptrace::collect::loader::TracerError>() {
                Some(
                    e @ (droptrace::collect::loader::TracerError::PerfParanoid { .. }
                    | droptrace::collect::loader::TracerError::Memlock { .. }),
                ) => Error::Privileges(e.to_string()),
                _ => Error::Failed {
                    error,
                    outputs: None,
                },
            }
        })?;
    eprintln!("{}", summary.line());
    Ok(())
}

/// `--k8s-events` without an API to write to.
const K8S_EVENTS_NEEDS_API: &str = "--k8s-events needs --k8s-api or --kubeconfig";

fn explain(args: &explain::ExplainArgs) -> Result<(), Error> {
    if args.apply.is_some() {
        let r = explain::run_change(args)?;
        print_result(args.json, || r.json(), || r.text());
        if r.impact.breaks_something() {
            return Err(explain::ExplainError::Breaks(r.impact.breaks).into());
        }
        return Ok(());
    }
    let e = explain::run(args)?;
    print_result(args.json, || e.json(), || e.text());
    Ok(())
}

/// `--json`: one pretty JSON object; else the text.
fn print_result(
    json: bool,
    value: impl FnOnce() -> serde_json::Value,
    text: impl FnOnce() -> String,
) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value()).unwrap_or_default()
        );
    } else {
        print!("{}", text());
    }
}

fn replay(args: ReplayArgs) -> Result<(), Error> {
    let node = args.node_name.unwrap_or_else(kernel::hostname);
    let rt = runtime()?;
    let input = replay::open_input(&args.input).map_err(Error::Input)?;
    let events_api = match (args.output.k8s_events, args.k8s.enabled()) {
        (false, _) => None,
        (true, false) => return Err(Error::Input(K8S_EVENTS_NEEDS_API.into())),
        (true, true) => Some(rt.block_on(args.k8s.connect())?.config),
    };
    let mut output = rt.block_on(start_output(&args.output, &node, true, events_api))?;
    let result = rt.block_on(replay::run(input, &mut output, &node));
    let flush = output.flush_timeout();
    let outputs = rt.block_on(output.shutdown(flush));
    match result {
        Ok(summary) => {
            eprintln!("{}\n{}", summary.line(), outputs.line());
            Ok(())
        }
        Err(error) => Err(Error::Failed {
            error,
            outputs: Some(outputs),
        }),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::Runtime)
}

/// Starts the outputs. `lossless`: wait for slow outputs instead of discarding (replay).
/// `k8s_events`: the API for --k8s-events.
async fn start_output(
    args: &OutputArgs,
    node: &str,
    lossless: bool,
    k8s_events: Option<kube::Config>,
) -> Result<Output, OutputError> {
    let (specs, opts) = args.resolve(node)?;
    Output::start(
        &specs,
        OutputOptions {
            lossless,
            k8s_events,
            ..opts
        },
    )
    .await
}
