//! The image in a real OCI runtime: podman with crun runs `cargo xtask image`'s image as
//! deploy/40-daemonset.yaml runs it (tests/src/podman.rs reads every flag from the manifest),
//! and droptrace traces the sqlplus stall from inside the container. Under the runtime's
//! default seccomp profile bpf() is refused, and droptrace says so in one line; the manifest's
//! profile (deploy/seccomp/droptrace.json) is what makes it work.
use droptrace_tests::{
    netns::{AppDb, Family},
    podman::{Manifest, Removed, crun_ready},
    scenario::sqlplus_stall,
    tracer::{Droptrace, at, str_at},
};

fn spool(tag: &str) -> std::path::PathBuf {
    let d =
        droptrace_tests::scratch_dir().join(format!("podman-spool-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("spool dir");
    d
}

#[test]
fn daemonset_container_traces_sqlplus_stall() {
    droptrace_tests::require_root();
    let moved = crun_ready();
    if !moved.is_empty() {
        println!("cgroup v2 controllers moved to v1 hierarchies for crun: {moved:?}");
    }
    let manifest = Manifest::load();

    // 1. The runtime's default seccomp profile: bpf() refused, one line, exit 2.
    let name = format!("droptrace-e2e-{}-default", std::process::id());
    let _rm = Removed(name.clone());
    let out = manifest
        .podman_run(&name, &spool("default"), false, &["--duration=5s"])
        .output()
        .expect("podman run");
    let err = String::from_utf8_lossy(&out.stderr);
    println!(
        "under the default seccomp profile: exit {:?}: {err}",
        out.status.code()
    );
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("bpf() is refused") && err.contains("seccomp filter"),
        "{err}"
    );

    // 2. As the DaemonSet runs it (its seccomp profile): the sqlplus stall, from inside.
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(1521);
    let name = format!("droptrace-e2e-{}", std::process::id());
    let _rm = Removed(name.clone());
    let cmd = manifest.podman_run(&name, &spool("daemonset"), true, &[]);
    let shown: Vec<String> = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    println!("{}", shown.join(" "));
    let tracer = Droptrace::spawn(cmd);

    let (pid, s) = sqlplus_stall(&topo, &tracer);
    let db = topo.db_ip.to_string();
    let fin = tracer.stop();
    println!("traced from inside the container: {s}");
    assert_eq!(fin.code, Some(0), "clean exit on SIGINT: {}", fin.stderr);
    assert_eq!(at(&s, "flow.dst_port"), 1521);
    assert_eq!(at(&s, "process.pid"), pid, "host PIDs (hostPID): {s}");
    assert!(str_at(&s, "process.comm").starts_with("python"), "{s}");
    let drops = at(&s, "drops").as_array().expect("drops");
    assert_eq!(str_at(&drops[0], "reason"), "NETFILTER_DROP", "{s}");
    assert_eq!(
        at(&drops[0], "count").as_u64().unwrap(),
        topo.iptables_drop_count(1521),
        "{s}"
    );
    assert!(
        str_at(&s, "diagnosis").starts_with(&format!("SYN to {db}:1521 dropped ")),
        "{s}"
    );
    // The node name came from the downward API (NODE_NAME), the TNS programs attached.
    assert!(!str_at(&s, "node").is_empty());
    assert!(
        !fin.stderr.contains("Oracle TNS not followed"),
        "{}",
        fin.stderr
    );
}
