//! Fixtures for the privileged end-to-end tests: network namespaces joined by veth pairs
//! (addresses only inside them, no default route), real drop mechanisms (iptables, tc), the
//! real python-oracledb thin client, and the real `droptrace` binary run as a separate
//! process. Everything a fixture creates is removed on drop, also when a test fails.
pub mod deploy;
pub mod netns;
pub mod netpol_render;
pub mod oracle_client;
pub mod scenario;
pub mod tns_listener;
pub mod tns_session;
pub mod tracer;

use std::path::PathBuf;

/// Fails (never skips) when the test cannot do what it is meant to prove.
pub fn require_root() {
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
