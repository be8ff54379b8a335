//! Least privilege, proven: droptrace run as an unprivileged user holding exactly the
//! capabilities of deploy/capabilities.txt traces the sqlplus stall; without any one of them it
//! refuses with one line naming the missing capability.
use std::process::Command;

use droptrace_tests::{
    deploy::capabilities,
    kernel,
    netns::{AppDb, Family},
    require_root,
    tracer::{Droptrace, at, binary, str_at},
};

/// setpriv arguments: uid/gid 65534 (nobody), no groups, exactly `caps` (ambient, so they
/// survive exec as a non-root user).
fn as_nobody_with(caps: &[String]) -> Vec<String> {
    let list = if caps.is_empty() {
        "-all".to_string()
    } else {
        format!(
            "-all,{}",
            caps.iter()
                .map(|c| format!("+{}", c.to_lowercase()))
                .collect::<Vec<_>>()
                .join(",")
        )
    };
    vec![
        "setpriv".into(),
        "--reuid=65534".into(),
        "--regid=65534".into(),
        "--clear-groups".into(),
        format!("--inh-caps={list}"),
        format!("--ambient-caps={list}"),
        format!("--bounding-set={list}"),
        "--".into(),
    ]
}

/// A sysctl set for the test, restored on drop.
struct Sysctl {
    path: String,
    old: String,
}

impl Sysctl {
    fn set(name: &str, value: &str) -> Self {
        let path = format!("/proc/sys/{name}");
        let old = std::fs::read_to_string(&path).expect("read sysctl");
        std::fs::write(&path, value).expect("write sysctl");
        Self { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.old.trim());
    }
}

#[test]
fn documented_capabilities_suffice_to_trace_the_sqlplus_stall() {
    require_root();
    let caps = capabilities();
    assert!(!caps.is_empty());
    println!("capabilities: {caps:?}");
    let topo = AppDb::new(Family::V4);
    topo.iptables_drop_ingress(1521);
    let mut wrapper = as_nobody_with(&caps);
    // What some kernels ask for beyond the capabilities, each refused in one line (exit 2)
    // naming its fix, and each fix then applied:
    // - before 5.11, BPF maps are charged to RLIMIT_MEMLOCK: an unlimited limit (what
    //   LimitMEMLOCK=infinity gives a container runtime);
    // - Debian's and Ubuntu's kernels refuse perf events without CAP_SYS_ADMIN at
    //   kernel.perf_event_paranoid=3 (Debian's default): the sysctl at 2.
    let mut sysctl = None;
    let tracer = loop {
        let args: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        let refused = match Droptrace::try_start_with(&args, &[]) {
            Ok(t) => break t,
            Err(refused) => refused,
        };
        let err = refused.stderr.trim().to_string();
        println!("refused: {err}");
        assert_eq!(refused.code, Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        if err.contains("RLIMIT_MEMLOCK") && wrapper[0] != "prlimit" {
            assert!(err.contains("LimitMEMLOCK=infinity"), "{err}");
            wrapper.splice(0..0, ["prlimit".into(), "--memlock=unlimited".into()]);
        } else if err.contains("kernel.perf_event_paranoid is 3") && sysctl.is_none() {
            assert!(err.contains("kernel.perf_event_paranoid=2"), "{err}");
            sysctl = Some(Sysctl::set("kernel/perf_event_paranoid", "2"));
        } else {
            panic!("refused, and not for a reason with a documented fix: {err}");
        }
    };

    let (_, s) = droptrace_tests::scenario::sqlplus_stall(&topo, &tracer);
    let fin = tracer.stop();
    assert_eq!(fin.code, Some(0), "{}", fin.stderr);
    println!("stall as uid 65534 with {caps:?}: {s}");
    let drops = at(&s, "drops").as_array().unwrap();
    assert!(kernel::is_netfilter_drop(&drops[0]), "{s}");
    // CAP_SYSLOG: the dropping function is named, not a bare address.
    assert!(str_at(&drops[0], "location").contains("+0x"), "{s}");
    assert!(!str_at(&drops[0], "location").starts_with("0x"), "{s}");
    assert!(str_at(&s, "process.comm").starts_with("python"), "{s}");
}

#[test]
fn each_missing_capability_is_named() {
    require_root();
    let caps = capabilities();
    for missing in &caps {
        let rest: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let wrapper = as_nobody_with(&rest);
        let out = Command::new(&wrapper[0])
            .args(&wrapper[1..])
            .arg(binary())
            .args(["run", "--duration", "1s"])
            .output()
            .expect("setpriv");
        let err = String::from_utf8_lossy(&out.stderr);
        println!(
            "without {missing}: exit {:?}: {}",
            out.status.code(),
            err.trim()
        );
        assert_eq!(out.status.code(), Some(2), "without {missing}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(
            err.contains(&format!("missing capability CAP_{missing}")),
            "without {missing}: {err}"
        );
    }
}
