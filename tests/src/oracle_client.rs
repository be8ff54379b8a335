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

/// The identity the client claims in the CONNECT's CID (what sqlplus on host "app" sends),
/// so tests can assert on what the parser reads from the real bytes.
pub const PROGRAM: &str = "sqlplus";
pub const MACHINE: &str = "app";
pub const OSUSER: &str = "oracle";

const CONNECT: &str = r#"
import sys, time, oracledb
host, port, service, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
program, machine, osuser = sys.argv[5], sys.argv[6], sys.argv[7]
t = time.monotonic()
try:
    oracledb.connect(user="scott", password="tiger", host=host, port=port,
                     service_name=service, tcp_connect_timeout=timeout,
                     program=program, machine=machine, osuser=osuser)
    print("CONNECTED")
    code = 0
except Exception as e:
    print("ERROR " + " | ".join(str(e).splitlines()))
    code = 3
print("ELAPSED %f" % (time.monotonic() - t), flush=True)
sys.exit(code)
"#;

/// Runs a python script inside `ns` (`ip netns exec` execs in place: the child's pid is
/// python's), or in the test's own namespace when `ns` is None; stdout and stderr piped.
pub fn spawn_python_in(ns: Option<&Netns>, script: &str, args: &[&str]) -> Child {
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns.name]).arg(python());
            c
        }
        None => Command::new(python()),
    };
    cmd.args(["-c", script])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start python")
}

pub fn spawn_python(ns: &Netns, script: &str, args: &[&str]) -> Child {
    spawn_python_in(Some(ns), script, args)
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
    /// How long `oracledb.connect` took, measured inside python (interpreter start-up and
    /// imports excluded, so "fails at once" is checkable on a loaded machine).
    pub elapsed: Duration,
    pub pid: u32,
}

impl Connect {
    pub fn start(ns: &Netns, host: IpAddr, port: u16, service: &str, timeout_s: f64) -> Self {
        Self::start_in(Some(ns), host, port, service, timeout_s)
    }

    /// The client in the test's own namespace (loopback tests).
    pub fn start_here(host: IpAddr, port: u16, service: &str, timeout_s: f64) -> Self {
        Self::start_in(None, host, port, service, timeout_s)
    }

    fn start_in(
        ns: Option<&Netns>,
        host: IpAddr,
        port: u16,
        service: &str,
        timeout_s: f64,
    ) -> Self {
        let child = spawn_python_in(
            ns,
            CONNECT,
            &[
                &host.to_string(),
                &port.to_string(),
                service,
                &timeout_s.to_string(),
                PROGRAM,
                MACHINE,
                OSUSER,
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

    /// Like [`Connect::wait`], but kills the client and fails if it is still running after
    /// `limit`: a test must not hang on a client that never gives up.
    pub fn wait_within(mut self, limit: Duration) -> Outcome {
        while self.child.try_wait().expect("wait for python").is_none() {
            if self.started.elapsed() > limit {
                let _ = self.child.kill();
                let out = self.child.wait_with_output().expect("wait for python");
                panic!(
                    "client still running after {limit:?}; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.wait()
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
            elapsed: stdout
                .lines()
                .find_map(|l| l.strip_prefix("ELAPSED "))
                .and_then(|s| s.trim().parse::<f64>().ok())
                .map(Duration::from_secs_f64)
                .unwrap_or_else(|| self.started.elapsed()),
            pid,
        }
    }
}

/// Connects and waits: what a user running sqlplus in the pod sees.
pub fn connect(ns: &Netns, host: IpAddr, port: u16, service: &str, timeout_s: f64) -> Outcome {
    Connect::start(ns, host, port, service, timeout_s).wait()
}
