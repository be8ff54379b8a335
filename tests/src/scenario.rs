//! Small programs the scenarios run inside namespaces: a TCP sink server, a client that sends
//! on cue, a TUN reader that silently swallows packets.
use std::{net::IpAddr, path::PathBuf, process::Child};

use crate::{netns::Netns, oracle_client::spawn_python};

/// A process killed when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

const SINK_SERVER: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
print("LISTENING", flush=True)
conns = []
while True:
    c, _ = s.accept()
    conns.append(c)
"#;

/// Accepts connections on ip:port and never reads (the kernel still ACKs data).
pub fn sink_server(ns: &Netns, ip: IpAddr, port: u16) -> Proc {
    let mut child = spawn_python(ns, SINK_SERVER, &[&ip.to_string(), &port.to_string()]);
    wait_line(&mut child, "LISTENING");
    Proc(child)
}

const CUED_CLIENT: &str = r#"
import os, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print("CONNECTED", s.getsockname()[1], flush=True)
while not os.path.exists(sys.argv[3]):
    time.sleep(0.05)
s.setblocking(True)
s.send(b"x" * 512)
time.sleep(float(sys.argv[4]))
"#;

/// Connects, reports CONNECTED <local port>, sends once `cue` exists, then holds the socket
/// open for `hold_s` seconds.
pub struct CuedClient {
    pub proc: Proc,
    pub local_port: u16,
    cue: PathBuf,
}

impl CuedClient {
    pub fn start(ns: &Netns, ip: IpAddr, port: u16, hold_s: f64) -> Self {
        let cue = crate::scratch_dir().join(format!("cue-{}-{}", std::process::id(), port));
        let _ = std::fs::remove_file(&cue);
        let mut child = spawn_python(
            ns,
            CUED_CLIENT,
            &[
                &ip.to_string(),
                &port.to_string(),
                cue.to_str().expect("utf-8"),
                &hold_s.to_string(),
            ],
        );
        let line = wait_line(&mut child, "CONNECTED");
        let local_port = line
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .expect("local port");
        Self {
            proc: Proc(child),
            local_port,
            cue,
        }
    }

    pub fn send(&self) {
        std::fs::write(&self.cue, b"go").expect("cue");
    }
}

impl Drop for CuedClient {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.cue);
    }
}

const TUN_SWALLOW: &str = r#"
import fcntl, os, struct, sys
fd = os.open("/dev/net/tun", os.O_RDWR)
IFF_TUN, IFF_NO_PI, TUNSETIFF = 0x0001, 0x1000, 0x400454ca
fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", sys.argv[1].encode(), IFF_TUN | IFF_NO_PI))
print("READY", flush=True)
while True:
    os.read(fd, 65536)
"#;

/// A TUN device `dev` in `ns` whose reader discards every packet: traffic routed into it
/// vanishes without any kernel drop on this node, like a drop on another node.
pub fn tun_black_hole(ns: &Netns, dev: &str, route: &str) -> Proc {
    let mut child = spawn_python(ns, TUN_SWALLOW, &[dev]);
    wait_line(&mut child, "READY");
    ns.exec(&["ip", "link", "set", dev, "up"]);
    ns.exec(&["ip", "route", "add", route, "dev", dev]);
    Proc(child)
}

/// Reads stdout lines until one starts with `prefix`; fails the test with stderr otherwise.
fn wait_line(child: &mut Child, prefix: &str) -> String {
    use std::io::{BufRead, BufReader, Read};
    let out = child.stdout.take().expect("stdout piped");
    let mut reader = BufReader::new(out);
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("helper exited before printing {prefix}: {err}");
        }
        if line.starts_with(prefix) {
            // Keep draining in the background so the child never blocks on a full pipe.
            std::thread::spawn(move || for _ in reader.lines() {});
            return line.trim().to_string();
        }
    }
}

/// The failure droptrace exists for, staged: a fake Oracle listener in "db" on 1521 REDIRECTs
/// the client to `second` (a dispatcher that accepts and hangs), and an iptables DROP on
/// `second`'s port silently eats that leg. The listener leg is only visible to the TNS
/// (cgroup_skb) programs.
pub struct RedirectedLeg {
    pub topo: crate::netns::AppDb,
    pub listener: std::net::SocketAddr,
    pub second: std::net::SocketAddr,
    _listeners: [crate::tns_listener::FakeListener; 2],
}

impl RedirectedLeg {
    pub const SERVICE: &str = "ORCLPDB1";

    pub fn new(second_port: u16) -> Self {
        use crate::tns_listener::{Behavior, FakeListener};
        let topo = crate::netns::AppDb::new(crate::netns::Family::V4);
        let listener = std::net::SocketAddr::new(topo.db_ip, 1521);
        let second = std::net::SocketAddr::new(topo.db_ip, second_port);
        let redirecting = FakeListener::from_listener(
            topo.db.tcp_listener(listener),
            Behavior::redirect(&topo.db_ip.to_string(), second.port()),
        )
        .expect("listener");
        let dispatcher =
            FakeListener::from_listener(topo.db.tcp_listener(second), Behavior::AcceptAndHang)
                .expect("dispatcher");
        // The policy allows the listener port only: the dispatcher port is silently dropped.
        topo.iptables_drop_ingress(second.port());
        Self {
            topo,
            listener,
            second,
            _listeners: [redirecting, dispatcher],
        }
    }

    /// sqlplus (python-oracledb, program name "sqlplus") connects and times out on the
    /// second leg; returns the client's outcome.
    pub fn connect(&self) -> crate::oracle_client::Outcome {
        let out = crate::oracle_client::connect(
            &self.topo.app,
            self.topo.db_ip,
            1521,
            Self::SERVICE,
            3.0,
        );
        assert!(out.error.contains("timed out"), "client timed out: {out:?}");
        out
    }

    /// The final `stall` of the second leg, as `tracer` reported it.
    pub fn final_stall(&self, tracer: &crate::tracer::Droptrace) -> serde_json::Value {
        use crate::tracer::{at, str_at};
        let dst = self.second;
        tracer
            .wait_for(crate::tracer::EVENT_WAIT, |v| {
                str_at(v, "kind") == "stall"
                    && str_at(v, "flow.dst_ip") == dst.ip().to_string()
                    && at(v, "flow.dst_port") == dst.port()
                    && str_at(v, "attempt.outcome") != "in_progress"
            })
            .unwrap_or_else(|| panic!("no final stall to {dst}: {:#?}", tracer.events()))
    }
}

/// sqlplus (python-oracledb) connects to the db namespace's 1521, which the caller's firewall
/// drops, and times out after 3 s; returns the client's PID and the final `stall` `tracer`
/// reported for it.
pub fn sqlplus_stall(
    topo: &crate::netns::AppDb,
    tracer: &crate::tracer::Droptrace,
) -> (u32, serde_json::Value) {
    use crate::tracer::str_at;
    let client = crate::oracle_client::Connect::start(&topo.app, topo.db_ip, 1521, "ORCLPDB1", 3.0);
    let pid = client.pid();
    let out = client.wait();
    assert!(out.error.contains("timed out"), "{out:?}");
    let db = topo.db_ip.to_string();
    let stall = tracer
        .wait_for(crate::tracer::EVENT_WAIT, |v| {
            str_at(v, "kind") == "stall"
                && str_at(v, "flow.dst_ip") == db
                && str_at(v, "attempt.outcome") == "timeout"
        })
        .unwrap_or_else(|| panic!("no stall to {db}:1521: {:#?}", tracer.events()));
    (pid, stall)
}
