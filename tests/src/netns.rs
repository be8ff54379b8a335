//! Network namespaces, veth pairs and drop mechanisms inside them.
use std::{
    net::IpAddr,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A tag and a subnet number unique to this fixture: concurrent tests never share addresses.
fn unique() -> (String, u32) {
    let n = NEXT.fetch_add(1, Ordering::SeqCst);
    (
        format!("{}x{n}", std::process::id() % 100_000),
        (std::process::id() % 200 + n) % 250,
    )
}

/// A veth pair between two namespaces.
fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) {
    sh(&[
        "ip", "link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev,
        "netns", &b.name,
    ]);
    a.exec(&["ip", "link", "set", a_dev, "up"]);
    b.exec(&["ip", "link", "set", b_dev, "up"]);
}

/// Runs a command and fails the test, with its output, when it does not succeed.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace, deleted on drop (with every rule, qdisc and address in it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Self {
        // A leftover from a killed run would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// The namespace's inode, as droptrace reports it in `netns`.
    pub fn inode(&self) -> u64 {
        let out = self.exec(&["stat", "-L", "-c", "%i", "/proc/self/ns/net"]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("inode")
    }

    /// A listening TCP socket created inside this namespace (sockets keep the namespace they
    /// were made in, whichever thread uses them later).
    pub fn tcp_listener(&self, addr: std::net::SocketAddr) -> std::net::TcpListener {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: a valid netns fd; only this short-lived thread switches namespace.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind(addr).expect("bind in netns")
        })
        .join()
        .expect("listener thread")
    }

    pub fn ifindex(&self, dev: &str) -> u32 {
        let out = self.exec(&["cat", &format!("/sys/class/net/{dev}/ifindex")]);
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("ifindex")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Two hosts, "app" (the client pod) and "db" (the Oracle server), joined by a veth pair.
pub struct AppDb {
    pub app: Netns,
    pub db: Netns,
    pub app_ip: IpAddr,
    pub db_ip: IpAddr,
    /// veth ends: `app_dev` in app, `db_dev` in db.
    pub app_dev: String,
    pub db_dev: String,
    pub family: Family,
}

impl AppDb {
    pub fn new(family: Family) -> Self {
        crate::require_root();
        let (tag, subnet) = unique();
        let app = Netns::new(format!("dt-app-{tag}"));
        let db = Netns::new(format!("dt-db-{tag}"));
        let app_dev = format!("dta{tag}");
        let db_dev = format!("dtd{tag}");
        veth(&app, &app_dev, &db, &db_dev);
        let (app_ip, db_ip, plen) = match family {
            Family::V4 => (
                format!("10.201.{subnet}.1"),
                format!("10.201.{subnet}.2"),
                "24",
            ),
            Family::V6 => (
                format!("fd00:201:{subnet:x}::1"),
                format!("fd00:201:{subnet:x}::2"),
                "64",
            ),
        };
        for (ns, dev, ip) in [(&app, &app_dev, &app_ip), (&db, &db_dev, &db_ip)] {
            let cidr = format!("{ip}/{plen}");
            match family {
                Family::V4 => ns.exec(&["ip", "addr", "add", &cidr, "dev", dev]),
                // nodad: usable at once, no duplicate address detection delay.
                Family::V6 => ns.exec(&["ip", "addr", "add", &cidr, "dev", dev, "nodad"]),
            };
        }
        Self {
            app,
            db,
            app_ip: app_ip.parse().expect("ip"),
            db_ip: db_ip.parse().expect("ip"),
            app_dev,
            db_dev,
            family,
        }
    }

    fn iptables(&self) -> &'static str {
        match self.family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// iptables (nft backend) DROP of TCP to `port` on db's INPUT: a silent firewall drop.
    pub fn iptables_drop_ingress(&self, port: u16) {
        let port = port.to_string();
        self.db.exec(&[
            self.iptables(),
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &port,
            "-j",
            "DROP",
        ]);
    }

    /// Packets counted by db's INPUT DROP rule for `port`.
    pub fn iptables_drop_count(&self, port: u16) -> u64 {
        drop_rule_count(&self.db, self.iptables(), "INPUT", port)
    }

    /// A tc clsact ingress drop on db's veth end, by a BPF classifier returning TC_ACT_SHOT.
    pub fn tc_drop_ingress(&self, port: u16) {
        let obj = tc_drop_object(port);
        let obj = obj.to_str().expect("utf-8 path");
        self.db
            .exec(&["tc", "qdisc", "add", "dev", &self.db_dev, "clsact"]);
        self.db.exec(&[
            "tc",
            "filter",
            "add",
            "dev",
            &self.db_dev,
            "ingress",
            "bpf",
            "da",
            "obj",
            obj,
            "sec",
            "tc",
        ]);
    }
}

/// Packets the DROP rules of `chain` for TCP `port` counted: the firewall's own figure.
fn drop_rule_count(ns: &Netns, iptables: &str, chain: &str, port: u16) -> u64 {
    let out = ns.exec(&[iptables, "-L", chain, "-v", "-n", "-x"]);
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains("DROP") && l.contains(&format!("dpt:{port}")))
        .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Compiles tests/bpf/tc_drop_port.c for `port` (once per port) with clang.
fn tc_drop_object(port: u16) -> std::path::PathBuf {
    crate::clang_bpf(
        "tc_drop_port.c",
        &[format!("-DDROP_PORT={port}")],
        &format!("tc_drop_port_{port}.o"),
    )
}

/// app -> router -> db, the router DNATs a "service" address to db (as kube-proxy does) and
/// forwards between two veth links. Routes only for these subnets: no default route.
pub struct Routed {
    pub app: Netns,
    pub router: Netns,
    pub db: Netns,
    pub app_ip: IpAddr,
    pub db_ip: IpAddr,
    pub service_ip: IpAddr,
}

impl Routed {
    pub fn new() -> Self {
        crate::require_root();
        let (tag, n) = unique();
        let app = Netns::new(format!("dt-app-{tag}"));
        let router = Netns::new(format!("dt-rt-{tag}"));
        let db = Netns::new(format!("dt-db-{tag}"));
        let (a, ra, rd, d) = (
            format!("dta{tag}"),
            format!("dtra{tag}"),
            format!("dtrd{tag}"),
            format!("dtd{tag}"),
        );
        veth(&app, &a, &router, &ra);
        veth(&router, &rd, &db, &d);
        let app_net = format!("10.202.{n}");
        let db_net = format!("10.203.{n}");
        let service_ip = format!("10.204.{n}.10");
        app.exec(&["ip", "addr", "add", &format!("{app_net}.1/24"), "dev", &a]);
        router.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{app_net}.254/24"),
            "dev",
            &ra,
        ]);
        router.exec(&["ip", "addr", "add", &format!("{db_net}.254/24"), "dev", &rd]);
        db.exec(&["ip", "addr", "add", &format!("{db_net}.2/24"), "dev", &d]);
        app.exec(&[
            "ip",
            "route",
            "add",
            &format!("{db_net}.0/24"),
            "via",
            &format!("{app_net}.254"),
        ]);
        app.exec(&[
            "ip",
            "route",
            "add",
            &format!("{service_ip}/32"),
            "via",
            &format!("{app_net}.254"),
        ]);
        db.exec(&[
            "ip",
            "route",
            "add",
            &format!("{app_net}.0/24"),
            "via",
            &format!("{db_net}.254"),
        ]);
        router.exec(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
        let db_ip = format!("{db_net}.2");
        router.exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "PREROUTING",
            "-d",
            &service_ip,
            "-p",
            "tcp",
            "--dport",
            "1521",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{db_ip}:1521"),
        ]);
        Self {
            app,
            router,
            db,
            app_ip: format!("{app_net}.1").parse().expect("ip"),
            db_ip: db_ip.parse().expect("ip"),
            service_ip: service_ip.parse().expect("ip"),
        }
    }

    /// Drops forwarded TCP to db:port on the router, after DNAT.
    pub fn drop_forwarded(&self, port: u16) {
        self.router.exec(&[
            "iptables",
            "-A",
            "FORWARD",
            "-d",
            &self.db_ip.to_string(),
            "-p",
            "tcp",
            "--dport",
            &port.to_string(),
            "-j",
            "DROP",
        ]);
    }
}

impl Routed {
    /// Packets counted by the router's FORWARD DROP rule for `port`.
    pub fn forward_drop_count(&self, port: u16) -> u64 {
        drop_rule_count(&self.router, "iptables", "FORWARD", port)
    }
}

impl Default for Routed {
    fn default() -> Self {
        Self::new()
    }
}
