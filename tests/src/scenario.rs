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
