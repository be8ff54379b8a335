//! The real Oracle client: python-oracledb in thin mode, which speaks TNS on the wire exactly
//! as sqlplus does. A silently dropped connect times out at `tcp_connect_timeout`.
use std::{
    net::IpAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

pub fn python() -> PathBuf {
    let py = std::env::var_os("DROPTRACE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join(".venv/bin/python"));
    assert!(
        py.is_file(),
        "python with python-oracledb not found at {} (run `cargo xtask setup`)",
        py.display()
    );
    py
}

const CONNECT: &str = r#"
import sys, oracledb
host, port, service, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
try:
    # program/machine/osuser: what sqlplus on host "app" would put in the CONNECT's CID.
    oracledb.connect(user="scott", password="tiger", host=host, port=port,
                     service_name=service, tcp_connect_timeout=timeout,
                     program="sqlplus", machine="app", osuser="oracle")
    print("CONNECTED")
except Exception as e:
    print("ERROR " + " | ".join(str(e).splitlines()))
    sys.exit(3)
"#;

/// Runs a python script inside `ns` (`ip netns exec` execs in place: the child's pid is
/// python's), stdout and stderr piped.
pub fn spawn_python(ns: &Netns, script: &str, args: &[&str]) -> Child {
    Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(python())
        .args(["-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python")
}

/// A running `oracledb.connect` in a namespace.
pub struct Connect {
    child: Child,
    started: Instant,
}

#[derive(Debug)]
pub struct Outcome {
    pub connected: bool,
    /// First line(s) of the error, e.g. "DPY-6005: cannot connect to database ... timed out".
    pub error: String,
    pub elapsed: Duration,
    pub pid: u32,
}

impl Connect {
    pub fn start(ns: &Netns, host: IpAddr, port: u16, service: &str, timeout_s: f64) -> Self {
        let child = spawn_python(
            ns,
            CONNECT,
            &[
                &host.to_string(),
                &port.to_string(),
                service,
                &timeout_s.to_string(),
            ],
        );
        Self {
            child,
            started: Instant::now(),
        }
    }

    /// pid of the client process (`ip netns exec` execs python in place).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait(self) -> Outcome {
        let pid = self.child.id();
        let out = self.child.wait_with_output().expect("wait for python");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stdout.contains("CONNECTED") || stdout.contains("ERROR"),
            "python-oracledb did not run: {stdout}{stderr}"
        );
        Outcome {
            connected: stdout.contains("CONNECTED"),
            error: stdout
                .lines()
                .find_map(|l| l.strip_prefix("ERROR "))
                .unwrap_or("")
                .to_string(),
            elapsed: self.started.elapsed(),
            pid,
        }
    }
}

/// Connects and waits: what a user running sqlplus in the pod sees.
pub fn connect(ns: &Netns, host: IpAddr, port: u16, service: &str, timeout_s: f64) -> Outcome {
    Connect::start(ns, host, port, service, timeout_s).wait()
}
