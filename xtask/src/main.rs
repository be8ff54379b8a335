//! `cargo xtask`: the project's own build chain. A fresh clone needs only these commands:
//! `cargo xtask run` and `cargo xtask test` (both run `setup` first).
mod bench;
mod bench_cost;
mod bench_criterion;
mod helm;
mod image;
mod setup;
mod soak;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "droptrace build chain")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, bpf-linker, test tools, python venv (oracledb, opentelemetry-proto, grpcio), helm.
    Setup {
        /// Only the build chain (no Debian packages, no venv).
        #[arg(long)]
        build_only: bool,
    },
    /// Build droptrace with its real eBPF object.
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build and start tracing this node (default Oracle ports, JSON to stdout).
    /// Arguments after `--` go to `droptrace run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Lints, unit tests and the privileged end-to-end tests.
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// rustfmt check and clippy with warnings as errors.
    Lint,
    /// Overhead, storm and userspace benchmarks; writes BENCHMARKS.md (needs root).
    Bench {
        /// Seconds of each drop storm.
        #[arg(long, default_value_t = 10)]
        storm_secs: u64,
        /// Seconds of each iperf3 run.
        #[arg(long, default_value_t = 5)]
        iperf_secs: u64,
        /// Alternating traced/untraced iperf3 rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Another droptrace binary (e.g. main's release build) whose cost figures are
        /// measured in the same run and written as "before".
        #[arg(long, value_name = "BIN")]
        baseline: Option<PathBuf>,
        /// Untraced/traced flood pairs per binary and flood kind (the median is reported).
        #[arg(long, default_value_t = 3)]
        pairs: usize,
        /// Seconds of each half of a flood pair.
        #[arg(long, default_value_t = 5)]
        pair_secs: u64,
        /// Only the cost figures (per packet, per drop, encode): printed, and written over
        /// BENCHMARKS.md's Cost section (the other sections are kept).
        #[arg(long)]
        cost_only: bool,
    },
    /// Hours-long mixed load (churn, stalls, drops, random-source floods) against the release
    /// droptrace, sampling RSS, fds and CPU every 10 s; writes the `## Soak` section of
    /// BENCHMARKS.md (needs root).
    Soak {
        #[arg(long, default_value_t = 30)]
        minutes: u64,
    },
    /// The privileged e2e tests inside VMs on Debian's kernels (qemu TCG, no NIC): the full
    /// matrix by default (5.10, 6.1, 6.12, newest; every test). A kernel's leg that runs every test
    /// becomes its column of the README table.
    TestKernels {
        /// A kernel series (5.10, 6.12), an exact release (6.12.118+deb13-amd64) or `newest`;
        /// repeatable [default: 5.10 6.1 6.12 newest].
        #[arg(long = "kernel", value_name = "VERSION")]
        kernels: Vec<String>,
        /// Only the core subset CI runs (sqlplus stall, Service path, listener redirect).
        #[arg(long)]
        core: bool,
        /// Only tests whose `target::name` contains this; repeatable.
        #[arg(long = "test", value_name = "FILTER")]
        filters: Vec<String>,
        /// Fetch the kernel package lists again even if today's are cached.
        #[arg(long)]
        refresh: bool,
        /// Guest memory (MiB).
        #[arg(long, default_value_t = 2048)]
        memory: u32,
        /// Guest vCPUs.
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// Write each kernel's BTF (cut to the types droptrace reads) and tracepoint formats
        /// to tracer-user/tests/fixtures/kernels/RELEASE.
        #[arg(long)]
        save_fixtures: bool,
    },
    /// PID 1 inside a VM leg (started by test-kernels through the guest's kernel command line).
    #[command(hide = true)]
    VmGuest { out: std::path::PathBuf },
    /// Build the container image without a registry (FROM scratch: the release binary and
    /// the libraries it loads) with podman, buildah or docker.
    Image {
        /// Name and tag [default: ghcr.io/droptrace/droptrace:VERSION, what deploy/ pulls].
        #[arg(long)]
        tag: Option<String>,
        /// Build ./Dockerfile instead (pulls rust and debian base images from a registry).
        #[arg(long, conflicts_with = "binary")]
        dockerfile: bool,
        /// Put this droptrace binary in the image instead of building the release one.
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup { build_only } => setup::run(&setup::Options {
            test_tools: !build_only,
        }),
        Cmd::Build { release } => setup::run(&setup::Options { test_tools: false })
            .and_then(|()| build(release).map(|_| ())),
        Cmd::Run { args } => {
            setup::run(&setup::Options { test_tools: false }).and_then(|()| run(&args))
        }
        Cmd::Test { args } => {
            setup::run(&setup::Options { test_tools: true }).and_then(|()| test(&args))
        }
        Cmd::Lint => lint(),
        Cmd::Image {
            tag,
            dockerfile,
            binary,
        } => image::run(
            &image::Options {
                tag: tag.as_deref(),
                dockerfile,
                binary: binary.as_deref(),
            },
            || setup::run(&setup::Options { test_tools: false }).and_then(|()| build(true)),
        ),
        Cmd::Soak { minutes } => setup::run(&setup::Options { test_tools: true })
            .and_then(|()| bench::ensure_tools())
            .and_then(|()| build(true))
            .and_then(|bin| soak::run(minutes, &bin)),
        Cmd::TestKernels {
            kernels,
            core,
            filters,
            refresh,
            memory,
            cpus,
            save_fixtures,
        } => {
            let mut opts = vm::Options::matrix();
            if !kernels.is_empty() {
                opts.kernels = kernels;
            }
            opts.core = core;
            opts.filters = filters;
            opts.refresh = refresh;
            opts.memory_mib = memory;
            opts.cpus = cpus;
            opts.save_fixtures = save_fixtures;
            setup::run(&setup::Options { test_tools: true })
                .and_then(|()| build(false))
                .and_then(|bin| vm::run(&opts, &bin).map(drop))
        }
        Cmd::VmGuest { out } => vm::guest::main(&out),
        Cmd::Bench {
            storm_secs,
            iperf_secs,
            rounds,
            baseline,
            pairs,
            pair_secs,
            cost_only,
        } => setup::run(&setup::Options { test_tools: true })
            .and_then(|()| bench::ensure_tools())
            .and_then(|()| build(true))
            .and_then(|bin| {
                bench::run(
                    &bench::Options {
                        storm_secs,
                        iperf_secs,
                        rounds,
                        baseline,
                        pairs: pairs.max(1),
                        pair_secs,
                        cost_only,
                    },
                    &bin,
                )
            }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    // Always the real eBPF object: a stub binary cannot trace.
    c.env("DROPTRACE_EBPF", "build");
    c
}

pub fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    let st = cmd
        .status()
        .with_context(|| format!("cannot start {shown}"))?;
    if !st.success() {
        bail!("{shown} failed ({st})");
    }
    Ok(())
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    step(&format!(
        "building droptrace ({}) with its eBPF object",
        if release { "release" } else { "debug" }
    ));
    let mut c = cargo();
    c.args(["build", "--package", "tracer-user", "--bin", "droptrace"]);
    if release {
        c.arg("--release");
    }
    status(&mut c)?;
    Ok(workspace_root()
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join("droptrace"))
}

fn run(args: &[String]) -> anyhow::Result<()> {
    let bin = build(true)?;
    let mut c = Command::new(&bin);
    c.arg("run").args(args);
    step(&format!("{} run {}", bin.display(), args.join(" ")));
    // Replace nothing: forward signals by sharing the process group; droptrace detaches on
    // SIGINT/SIGTERM and prints its summary.
    status(&mut c)
}

fn lint() -> anyhow::Result<()> {
    step("rustfmt --check");
    status(cargo().args(["fmt", "--all", "--check"]))?;
    step("clippy (warnings are errors)");
    status(cargo().env("DROPTRACE_EBPF", "stub").args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The kernel programs only compile for the BPF target; lint them there.
    step("clippy on the kernel programs (bpfel-unknown-none)");
    status(
        Command::new("cargo")
            .current_dir(workspace_root().join("tracer-ebpf"))
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("RUSTC")
            .args([
                "+nightly",
                "clippy",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--release",
                "--",
                "-D",
                "warnings",
            ]),
    )
}

fn test(args: &[String]) -> anyhow::Result<()> {
    lint()?;
    let bin = build(false)?;
    step("unit and integration tests (tracer-common, tracer-user, xtask)");
    status(
        cargo()
            // The OTLP sink tests run a receiver from the venv.
            .env("DROPTRACE_PYTHON", setup::venv_python())
            .args([
                "test",
                "--package",
                "tracer-common",
                "--package",
                "tracer-user",
                "--package",
                "xtask",
            ])
            .args(args),
    )?;
    step("privileged end-to-end tests (tests/)");
    if unsafe_geteuid() != 0 {
        bail!(
            "the end-to-end tests need root (they create network namespaces, firewall rules \
             and load eBPF programs); run `sudo -E cargo xtask test`"
        );
    }
    let node = e2e_lock()?;
    status(
        cargo()
            .env("DROPTRACE_BIN", &bin)
            .env("DROPTRACE_PYTHON", setup::venv_python())
            .args(["test", "--package", "droptrace-tests"])
            .args(args),
    )?;
    // The VMs' drops stay in the VMs: other suites may use the node again.
    drop(node);
    kernel_legs(&bin, args)
}

/// The core subset inside VMs on Debian 11's and 12's kernels (`vm::CI_KERNELS`). In CI a leg
/// that cannot run fails; elsewhere it is skipped with the reason.
fn kernel_legs(bin: &Path, args: &[String]) -> anyhow::Result<()> {
    if !args.is_empty() {
        step(
            "VM kernel legs: skipped (a test filter was given; `cargo xtask test-kernels --core`)",
        );
        return Ok(());
    }
    if let Some(why) = vm::unavailable() {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            bail!("VM kernel legs cannot run in CI: {why}");
        }
        step(&format!("VM kernel legs: SKIPPED, {why}"));
        return Ok(());
    }
    let mut opts = vm::Options::matrix();
    opts.kernels = vm::CI_KERNELS.iter().map(|s| s.to_string()).collect();
    opts.core = true;
    step(&format!(
        "VM kernel legs: core subset on {}",
        vm::CI_KERNELS.join(", ")
    ));
    vm::run(&opts, bin).map(drop)
}

/// The privileged tests own the node while they run: every droptrace they start sees every
/// drop on the machine, so two suites at once (two checkouts, a bench) would read each other's
/// packets. Held until the returned file is dropped; a second suite waits for it.
pub fn e2e_lock() -> anyhow::Result<std::fs::File> {
    let path = Path::new("/run/lock/droptrace-e2e.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    if f.try_lock().is_err() {
        step(&format!(
            "waiting for another privileged run on this node ({})",
            path.display()
        ));
        f.lock()
            .with_context(|| format!("lock {}", path.display()))?;
    }
    Ok(f)
}

fn unsafe_geteuid() -> u32 {
    // /proc/self/status avoids a libc dependency in xtask.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}

pub fn is_root() -> bool {
    unsafe_geteuid() == 0
}

pub fn step(what: &str) {
    eprintln!("==> {what}");
}

/// Today's date (UTC), for reports.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}
