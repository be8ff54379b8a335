//! Installs the build chain and test tools. Idempotent: every step first checks, then acts,
//! and says what it did; a failing step says what to run by hand.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{is_root, status, step, workspace_root};

/// bpf-linker 0.10.4 loads the toolchain's own libLLVM (LLVM 22 = nightly 1.97's).
const BPF_LINKER_VERSION: &str = "0.10.4";
const ORACLEDB_VERSION: &str = "26.1.0";
const OTEL_PROTO_VERSION: &str = "1.45.2";
const GRPCIO_VERSION: &str = "1.85.3";

/// Debian packages the end-to-end tests drive: (command that proves it is there, package).
const TEST_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("nft", "nftables"),
    ("clang", "clang"),
    ("hping3", "hping3"),
    // The coexistence tests load, pin and attach another cgroup_skb program as an operator would.
    ("bpftool", "bpftool"),
    // The container test builds the image and runs it as the DaemonSet does.
    ("podman", "podman"),
    ("crun", "crun"),
    // Deletes conntrack entries (the ctnetlink removal test).
    ("conntrack", "conntrack"),
    // The syslog sink tests run a real rsyslog (TCP and TLS).
    ("rsyslogd", "rsyslog"),
    ("dpkg:rsyslog-gnutls", "rsyslog-gnutls"),
];

pub(crate) struct Options {
    pub test_tools: bool,
}

pub(crate) fn run(opts: &Options) -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    if opts.test_tools {
        debian_packages(TEST_PACKAGES)?;
        vm_tools()?;
        python_venv()?;
        crate::helm::ensure()?;
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("`rustup` is needed to manage the nightly toolchain; install rustup")?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        step("nightly rust-src: present");
        return Ok(());
    }
    step("nightly rust-src: installing (rustup component add rust-src --toolchain nightly)");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .context("by hand: rustup component add rust-src --toolchain nightly")
}

fn llvm_major_of_nightly() -> anyhow::Result<u32> {
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("`rustc +nightly -vV` failed: is the nightly toolchain installed?")?;
    parse_llvm_major(&vv).context("no `LLVM version:` line in `rustc +nightly -vV`")
}

fn parse_llvm_major(vv: &str) -> Option<u32> {
    vv.lines()
        .find_map(|l| l.strip_prefix("LLVM version:"))
        .and_then(|v| v.trim().split('.').next()?.parse().ok())
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
}

/// The LLVM major the installed bpf-linker was built against: its `llvm-NN` feature, from
/// cargo's install record (explicit features) or the crate's default features.
fn bpf_linker_llvm_major() -> Option<u32> {
    let record = std::fs::read_to_string(cargo_home().join(".crates2.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&record).ok()?;
    let (key, info) = v["installs"]
        .as_object()?
        .iter()
        .find(|(k, _)| k.starts_with("bpf-linker "))?;
    let version = key.split_whitespace().nth(1)?;
    let mut features: Vec<String> = info["features"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if !info["no_default_features"].as_bool().unwrap_or(false) {
        features.extend(default_features_of("bpf-linker", version));
    }
    features
        .iter()
        .find_map(|f| f.strip_prefix("llvm-")?.parse().ok())
}

fn default_features_of(krate: &str, version: &str) -> Vec<String> {
    let src = cargo_home().join("registry/src");
    let Ok(indexes) = std::fs::read_dir(src) else {
        return Vec::new();
    };
    for idx in indexes.flatten() {
        let manifest = idx.path().join(format!("{krate}-{version}/Cargo.toml"));
        if let Ok(text) = std::fs::read_to_string(manifest)
            && let Ok(doc) = text.parse::<toml::Table>()
        {
            return doc
                .get("features")
                .and_then(|f| f.get("default"))
                .and_then(|d| d.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
        }
    }
    Vec::new()
}

fn bpf_linker() -> anyhow::Result<()> {
    let nightly = llvm_major_of_nightly()?;
    let present = output(Command::new("bpf-linker").arg("--version"));
    if present.is_none() {
        step(&format!(
            "bpf-linker: installing {BPF_LINKER_VERSION} (cargo install bpf-linker@{BPF_LINKER_VERSION} --locked; ~2 min)"
        ));
        status(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]))
        .with_context(|| {
            format!("by hand: cargo install bpf-linker@{BPF_LINKER_VERSION} --locked")
        })?;
    }
    let version = output(Command::new("bpf-linker").arg("--version")).with_context(|| {
        format!(
            "bpf-linker is installed but not on PATH; add {}/bin to PATH",
            cargo_home().display()
        )
    })?;
    match bpf_linker_llvm_major() {
        Some(m) if m == nightly => {
            step(&format!(
                "{}: LLVM {m}, same major as nightly's LLVM {nightly}",
                version.trim()
            ));
            Ok(())
        }
        Some(m) => bail!(
            "{} uses LLVM {m} but nightly uses LLVM {nightly}: the eBPF bitcode would not link. \
             By hand: cargo install bpf-linker@{BPF_LINKER_VERSION} --locked --force",
            version.trim()
        ),
        None => {
            step(&format!(
                "{}: LLVM major not recorded by cargo install; the eBPF build will prove it",
                version.trim()
            ));
            Ok(())
        }
    }
}

/// The packages of `wanted` not installed yet; says so when none is missing, and fails with
/// what to run when some are but this is not root.
fn missing_packages<'a>(what: &str, wanted: &[(&str, &'a str)]) -> anyhow::Result<Vec<&'a str>> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(probe, _)| !present(probe))
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        let names: Vec<_> = wanted.iter().map(|(_, p)| *p).collect();
        step(&format!("{what}: present ({})", names.join(", ")));
    } else if !is_root() {
        bail!(
            "{what} missing: {}; run `sudo cargo xtask setup`",
            missing.join(", ")
        );
    }
    Ok(missing)
}

pub(crate) fn debian_packages(wanted: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing = missing_packages("test tools", wanted)?;
    if missing.is_empty() {
        return Ok(());
    }
    step(&format!(
        "test tools: apt-get install -y {}",
        missing.join(" ")
    ));
    status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .arg("update")
            .stdout(Stdio::null()),
    )
    .context("by hand: apt-get update")?;
    status(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )
    .with_context(|| format!("by hand: apt-get install -y {}", missing.join(" ")))
}

/// `cmd` on PATH, or for `dpkg:PKG` the Debian package installed.
fn present(probe: &str) -> bool {
    match probe.strip_prefix("dpkg:") {
        Some(pkg) => Command::new("dpkg")
            .args(["-s", pkg])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        None => on_path(probe),
    }
}

/// What the VM legs (`cargo xtask test-kernels`, CI's kernel legs) need on the host.
const VM_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    // The guest's initramfs shell; insmod of the boot modules.
    ("busybox", "busybox-static"),
    // modprobe --show-depends and depmod for the kernels' module trees.
    ("depmod", "kmod"),
    // Debian kernels compress their modules (xz up to 6.1, zstd later).
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
];

/// qemu 10 comes from bookworm-backports on bookworm: bookworm's own 7.2 conflicts with the
/// qemu-utils 10 this machine kind has. Installed through an APT configuration of the
/// project's own (bookworm + bookworm-backports), never by editing the system's sources.
fn vm_tools() -> anyhow::Result<()> {
    let missing = missing_packages("VM tools", VM_PACKAGES)?;
    if missing.is_empty() {
        return Ok(());
    }
    let codename = std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
        .unwrap_or_default();
    if codename != "bookworm" {
        return debian_packages(VM_PACKAGES);
    }
    let dir = workspace_root().join("target/apt-bookworm-backports");
    for d in [
        "lists/partial",
        "cache/archives/partial",
        "etc/sources.list.d",
    ] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    let key = "/usr/share/keyrings/debian-archive-keyring.gpg";
    std::fs::write(
        dir.join("etc/sources.list"),
        ["bookworm", "bookworm-updates", "bookworm-backports"]
            .iter()
            .map(|s| format!("deb [signed-by={key}] http://deb.debian.org/debian {s} main\n"))
            .chain(std::iter::once(format!(
                "deb [signed-by={key}] http://deb.debian.org/debian-security bookworm-security main\n"
            )))
            .collect::<String>(),
    )?;
    let d = dir.display();
    let conf = dir.join("apt.conf");
    std::fs::write(
        &conf,
        format!(
            "Dir::Etc::SourceList \"{d}/etc/sources.list\";\n\
             Dir::Etc::SourceParts \"{d}/etc/sources.list.d\";\n\
             Dir::State::Lists \"{d}/lists\";\n\
             Dir::Cache \"{d}/cache\";\n\
             Acquire::Languages \"none\";\n"
        ),
    )?;
    let apt = |args: &[&str]| {
        let mut c = Command::new("apt-get");
        c.env("APT_CONFIG", &conf)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(args);
        c
    };
    step("VM tools: apt-get update (bookworm + bookworm-backports, the project's own APT_CONFIG)");
    status(apt(&["update"]).stdout(Stdio::null()))?;
    step(&format!(
        "VM tools: apt-get install -t bookworm-backports {}",
        missing.join(" ")
    ));
    let mut args = vec![
        "install",
        "-y",
        "--no-install-recommends",
        "-t",
        "bookworm-backports",
    ];
    args.extend(&missing);
    status(&mut apt(&args)).with_context(|| {
        format!(
            "by hand: add bookworm-backports and apt-get install -t bookworm-backports {}",
            missing.join(" ")
        )
    })
}

/// A system binary, also where PATH has no sbin directories.
pub(crate) fn sbin(cmd: &str) -> PathBuf {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| PathBuf::from(d).join(cmd))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(cmd))
}

pub(crate) fn on_path(cmd: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p)
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(cmd).is_file())
    })
}

pub(crate) fn venv_dir() -> PathBuf {
    workspace_root().join(".venv")
}

pub(crate) fn venv_python() -> PathBuf {
    venv_dir().join("bin/python")
}

/// The test venv's packages: (distribution, version, module the tests import).
const PY_PACKAGES: &[(&str, &str, &str)] = &[
    // The Oracle thin client of the sqlplus-like tests.
    ("oracledb", ORACLEDB_VERSION, "oracledb"),
    // The OTLP receiver of the OTLP sink tests decodes with the official definitions.
    (
        "opentelemetry-proto",
        OTEL_PROTO_VERSION,
        "opentelemetry.proto.collector.logs.v1.logs_service_pb2_grpc",
    ),
    ("grpcio", GRPCIO_VERSION, "grpc"),
];

fn python_venv() -> anyhow::Result<()> {
    let py = venv_python();
    // The installed version when the module imports, per distribution.
    let has = |py: &PathBuf, dist: &str, module: &str| {
        output(Command::new(py).args([
            "-c",
            &format!("import {module}, importlib.metadata as m; print(m.version('{dist}'))"),
        ]))
        .map(|v| v.trim().to_string())
    };
    let missing: Vec<String> = PY_PACKAGES
        .iter()
        .filter(|(dist, version, module)| has(&py, dist, module).as_deref() != Some(*version))
        .map(|(dist, version, _)| format!("{dist}=={version}"))
        .collect();
    if missing.is_empty() {
        step(&format!(
            "python packages ({}): present in {}",
            PY_PACKAGES
                .iter()
                .map(|(d, v, _)| format!("{d} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            venv_dir().display()
        ));
        return Ok(());
    }
    if !py.is_file() {
        step(&format!("python venv: creating {}", venv_dir().display()));
        status(Command::new("python3").args(["-m", "venv"]).arg(venv_dir()))
            .context("by hand: python3 -m venv .venv (Debian: apt-get install python3-venv)")?;
    }
    step(&format!(
        "python packages: pip install {}",
        missing.join(" ")
    ));
    status(
        Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(&missing),
    )
    .with_context(|| format!("by hand: .venv/bin/pip install {}", missing.join(" ")))?;
    for (dist, _, module) in PY_PACKAGES {
        has(&py, dist, module)
            .with_context(|| format!("{module} still not importable after pip install"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_llvm_major_from_rustc_version_output() {
        let vv = "rustc 1.97.0-nightly (abc 2026-05-19)\nhost: x86_64-unknown-linux-gnu\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0\n"), None);
    }
}
