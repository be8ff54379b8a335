//! Fixtures for the privileged end-to-end tests: network namespaces joined by veth pairs
//! (addresses only inside them, no default route), real drop mechanisms (iptables, tc), the
//! real python-oracledb thin client, and the real `droptrace` binary run as a separate
//! process. Everything a fixture creates is removed on drop, also when a test fails.
pub mod cgroup_prog;
pub mod deploy;
pub mod kernel;
pub mod netns;
pub mod netpol_render;
pub mod oracle_client;
pub mod podman;
pub mod receiver;
pub mod scenario;
pub mod tns_listener;
pub mod tns_session;
pub mod tracer;

use std::path::PathBuf;

/// Fails (never skips) when the test cannot do what it is meant to prove.
pub fn require_root() {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "privileged end-to-end test: needs root for namespaces, firewall rules and eBPF \
         (run `sudo -E cargo xtask test`)"
    );
}

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// Scratch directory for build products of the fixtures (compiled test BPF programs, ...).
pub fn scratch_dir() -> PathBuf {
    let d = workspace_root().join("target/e2e");
    std::fs::create_dir_all(&d).expect("create target/e2e");
    d
}

/// Compiles tests/bpf/`source` with clang into target/e2e/`out` (with `defines`, e.g.
/// `-DDROP_PORT=1521`) and returns the object's path.
pub fn clang_bpf(source: &str, defines: &[String], out: &str) -> PathBuf {
    let src = workspace_root().join("tests/bpf").join(source);
    let out = scratch_dir().join(out);
    // Tests of one binary build the same object at once: each writes its own file first.
    static BUILDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = out.with_extension(format!("{}-{n}.tmp", std::process::id()));
    // asm/types.h lives in the multiarch include directory, which -target bpf does not search.
    let multiarch = format!("-I/usr/include/{}-linux-gnu", std::env::consts::ARCH);
    let mut args: Vec<&str> = vec!["clang", "-O2", "-g", "-target", "bpf", &multiarch];
    args.extend(defines.iter().map(String::as_str));
    args.extend([
        "-c",
        src.to_str().expect("utf-8"),
        "-o",
        tmp.to_str().expect("utf-8"),
    ]);
    netns::sh(&args);
    std::fs::rename(&tmp, &out).expect("rename compiled object");
    out
}
