//! Shared by the integration tests: sample events of every kind, the droptrace binary,
//! free loopback ports, and a child process guard that always cleans up.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use droptrace::{decode::drop_class::DropClass, encode::community_id, event::*};

pub(crate) fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_droptrace"))
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Kills (and reaps) the child when dropped, so a failing test leaves nothing running.
pub(crate) struct Guard(pub Option<Child>);

impl Guard {
    pub(crate) fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("child running")
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl std::ops::Drop for Guard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub(crate) fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn t(s: &str) -> String {
    format!("2026-11-25T10:{s}Z")
}

fn pod(ns: &str, name: &str, ip: &str, node: &str) -> Endpoint {
    Endpoint {
        ip: Some(ip.parse().unwrap()),
        namespace: Some(ns.into()),
        pod: Some(name.into()),
        pod_uid: Some("0b6f3c1e-7a9d-4e0f-9c1a-2d3e4f5a6b7c".into()),
        labels: BTreeMap::from([("app".into(), name.split('-').next().unwrap().into())]),
        workload: Some(Workload {
            kind: "Deployment".into(),
            name: name.split('-').next().unwrap().into(),
        }),
        service: None,
        node: Some(node.into()),
        host_network: false,
    }
}

fn flow4(sp: u16, dp: u16) -> Flow {
    Flow {
        proto: "tcp".into(),
        family: Family::Ipv4,
        src_ip: "10.244.1.17".parse().unwrap(),
        src_port: sp,
        dst_ip: "10.244.2.9".parse().unwrap(),
        dst_port: dp,
        community_id: None,
    }
}

/// A fixed set covering every kind and every section (names are the golden file stems).
pub(crate) fn samples() -> Vec<(&'static str, Event)> {
    let mut drop = Event::new(Kind::Drop, t("00:00.000001"), "node-a");
    drop.flow = Some(flow4(43512, 1521));
    drop.tcp = Some(Tcp {
        flags: "SYN".into(),
    });
    drop.drop = Some(Drop {
        reason: "NETFILTER_DROP".into(),
        reason_code: Some(6),
        class: DropClass::Network,
        location: "nft_do_chain+0x3c4".into(),
        storm: None,
    });
    drop.netns = Some(4026532801);
    drop.ifindex = Some(7);
    drop.count = 3;
    drop.process = Some(Process {
        pid: 4242,
        tgid: 4240,
        comm: "java".into(),
        cgroup_id: 12345,
        container_id: Some("3f2a9c0d1e".into()),
        pod_uid: Some("5b1d3a9e-8a7c-4a44-9d55-0f6c1e2b7a10".into()),
    });
    drop.source = Some(droptrace::event::Shared::new(pod(
        "shop",
        "checkout-7d9f",
        "10.244.1.17",
        "node-a",
    )));
    let mut db = pod("data", "oracle-0", "10.244.2.9", "node-b");
    db.service = Some("oracle.data.svc".into());
    drop.destination = Some(droptrace::event::Shared::new(db.clone()));
    drop.conntrack = Some(Box::new(Conntrack {
        state: "NEW".into(),
        status: vec!["DNAT".into()],
        original: Tuple {
            src_ip: "10.244.1.17".parse().unwrap(),
            src_port: 43512,
            dst_ip: "10.96.0.15".parse().unwrap(),
            dst_port: 1521,
            community_id: None,
        },
        reply: Tuple {
            src_ip: "10.244.2.9".parse().unwrap(),
            src_port: 1521,
            dst_ip: "10.244.1.17".parse().unwrap(),
            dst_port: 43512,
            community_id: None,
        },
        nat: "dnat".into(),
        mark: 0,
        zone: 0,
    }));
    with_conntrack_ids(&mut drop);
    drop.policy = Some(droptrace::event::Shared::new(Policy {
        verdict: "denied".into(),
        direction: "egress".into(),
        policies: vec![PolicyRef {
            namespace: "shop".into(),
            name: "default-deny".into(),
            rule: None,
        }],
        explanation: "egress from shop/checkout-7d9f is isolated by shop/default-deny".into(),
        suggested_fix: Some("allow egress to data/oracle on 1521".into()),
        // The fix selects app=checkout: the other replica gets through too.
        fix_check: Some(FixCheck {
            allows_flow: true,
            newly_allowed: vec![Admitted {
                from: "shop/checkout-8c2a".into(),
                to: "data/oracle-0".into(),
                port: 1521,
                protocol: "TCP".into(),
            }],
            truncated: false,
            still_denied: Vec::new(),
        }),
    }));

    // A bare drop: host-network process, IPv6, nothing resolved.
    let mut drop6 = Event::new(Kind::Drop, t("00:01.500000"), "node-a");
    drop6.flow = Some(Flow {
        proto: "tcp".into(),
        family: Family::Ipv6,
        src_ip: "fd00::1".parse().unwrap(),
        src_port: 50000,
        dst_ip: "fd00::2".parse().unwrap(),
        dst_port: 2484,
        community_id: None,
    });
    drop6.tcp = Some(Tcp {
        flags: "ACK|PSH".into(),
    });
    drop6.drop = Some(Drop {
        reason: "TCP_INVALID_SEQUENCE".into(),
        reason_code: Some(48),
        class: DropClass::Local,
        location: "tcp_validate_incoming+0x9a".into(),
        storm: None,
    });
    drop6.source = Some(droptrace::event::Shared::new(Endpoint {
        ip: Some("fd00::1".parse().unwrap()),
        host_network: true,
        node: Some("node-a".into()),
        ..Default::default()
    }));

    let mut stall = Event::new(Kind::Stall, t("00:05.250000"), "node-a");
    stall.flow = Some(flow4(43512, 1521));
    stall.attempt = Some(Attempt {
        id: 7,
        data_retransmits: 0,
        started: t("00:00.000001"),
        syn_retransmits: 3,
        duration_ms: 5250,
        outcome: "timeout".into(),
        side: None,
        storm: None,
    });
    stall.drops = Some(vec![DropSummary {
        reason: "NETFILTER_DROP".into(),
        class: DropClass::Network,
        location: "nft_do_chain+0x3c4".into(),
        netns: 4026532801,
        count: 4,
    }]);
    stall.diagnosis = Some("SYNs dropped by netfilter in the client's namespace".into());
    stall.process = drop.process.clone();
    stall.source = drop.source.clone();
    stall.destination = Some(droptrace::event::Shared::new(db.clone()));
    stall.policy = drop.policy.clone();

    let mut late = Event::new(Kind::Stall, t("00:07.000000"), "node-a");
    late.flow = Some(flow4(43600, 1522));
    late.attempt = Some(Attempt {
        id: 8,
        data_retransmits: 0,
        started: t("00:04.000000"),
        syn_retransmits: 1,
        duration_ms: 3000,
        outcome: "established_late".into(),
        side: None,
        storm: None,
    });

    let mut tns = Event::new(Kind::Tns, t("00:09.000000"), "node-b");
    tns.flow = Some(Flow {
        proto: "tcp".into(),
        family: Family::Ipv4,
        src_ip: "10.244.1.17".parse().unwrap(),
        src_port: 43700,
        dst_ip: "10.244.2.9".parse().unwrap(),
        dst_port: 1521,
        community_id: None,
    });
    tns.oracle = Some(Box::new(Oracle {
        packet: Some("REFUSE".into()),
        service_name: Some("ORCLPDB1".into()),
        sid: None,
        program: Some("JDBC Thin Client".into()),
        client_host: Some("checkout-7d9f".into()),
        client_user: Some("app".into()),
        listener: Some(Listener {
            ip: "10.244.2.9".parse().unwrap(),
            port: 1521,
        }),
        redirect: None,
        redirect_ports: Vec::new(),
        remedy: None,
        refuse: Some(Refuse {
            code: Some(12514),
            text: "ORA-12514: listener does not currently know of service".into(),
        }),
    }));
    tns.source = drop.source.clone();
    tns.destination = Some(droptrace::event::Shared::new(db));

    let mut redirect = Event::new(Kind::Tns, t("00:10.000000"), "node-b");
    redirect.flow = Some(flow4(43800, 1521));
    redirect.oracle = Some(Box::new(Oracle {
        packet: Some("REDIRECT".into()),
        redirect: Some(HostPort {
            host: "oracle-1.data".into(),
            port: 1522,
        }),
        ..Default::default()
    }));

    let mut lost_kernel = Event::new(Kind::Lost, t("00:11.000000"), "node-a");
    lost_kernel.count = 17;
    lost_kernel.lost = Some(Lost {
        source: LostSource::Kernel,
        reason: "ringbuf_full".into(),
        sink: None,
    });
    let mut lost_sink = Event::new(Kind::Lost, t("00:12.000000"), "node-a");
    lost_sink.count = 5;
    lost_sink.lost = Some(Lost {
        source: LostSource::Sink,
        reason: "spool_full".into(),
        sink: Some("syslog+tls://siem:6514".into()),
    });

    // Real records from the privileged end-to-end tests (service_ip_dnat, established_then_blocked)
    // and `--raw` per-signal kinds.
    let parse = |line: &str| serde_json::from_str::<Event>(line).expect("sample parses");
    let stall_dnat = parse(
        r#"{"schema":"droptrace.v1","kind":"stall","time":"2026-11-25T12:38:05.311387Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"10.202.163.1","src_port":42808,"dst_ip":"10.204.163.10","dst_port":1521},"netns":4026532386,"count":1,"process":{"pid":28943,"tgid":28943,"comm":"python","cgroup_id":1},"attempt":{"id":2,"started":"2026-11-25T12:38:02.308854Z","syn_retransmits":2,"duration_ms":3002,"outcome":"timeout"},"drops":[{"reason":"NETFILTER_DROP","class":"network","location":"nft_do_chain+0x46f","netns":4026532455,"count":3}],"conntrack":{"state":"NEW","status":["DNAT","DST_NAT_DONE"],"original":{"src_ip":"10.202.163.1","src_port":42808,"dst_ip":"10.204.163.10","dst_port":1521},"reply":{"src_ip":"10.203.163.2","src_port":1521,"dst_ip":"10.202.163.1","dst_port":42808},"nat":"dnat","mark":0,"zone":0},"diagnosis":"SYN to 10.204.163.10:1521 (DNAT to 10.203.163.2:1521) dropped 3 times on this node by netfilter (NETFILTER_DROP at nft_do_chain) in netns 4026532455"}"#,
    );
    let data_stalled = parse(
        r#"{"schema":"droptrace.v1","kind":"stall","time":"2026-11-25T12:35:58.098129Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"10.201.153.1","src_port":41234,"dst_ip":"10.201.153.2","dst_port":1521},"netns":4026532386,"count":1,"process":{"pid":24202,"tgid":24202,"comm":"python","cgroup_id":1},"attempt":{"id":1,"started":"2026-11-25T12:35:55.762454Z","syn_retransmits":0,"duration_ms":2335,"outcome":"data_stalled","data_retransmits":4},"drops":[{"reason":"NETFILTER_DROP","class":"network","location":"nft_do_chain+0x46f","netns":4026532387,"count":4}],"diagnosis":"established flow to 10.201.153.2:1521 stopped making progress: 4 retransmits unacknowledged; data to 10.201.153.2:1521 dropped 4 times on this node by netfilter (NETFILTER_DROP at nft_do_chain) in netns 4026532387"}"#,
    );
    let tcp_state = parse(
        r#"{"schema":"droptrace.v1","kind":"tcp_state","time":"2026-11-25T12:33:19.963978Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"10.77.0.1","src_port":50964,"dst_ip":"10.77.0.2","dst_port":1521},"netns":4026532177,"count":1,"tcp_state":{"old":"SYN_SENT","new":"CLOSE","error":0},"process":{"pid":4242,"tgid":4242,"comm":"sqlplus","cgroup_id":9}}"#,
    );
    let retransmit = parse(
        r#"{"schema":"droptrace.v1","kind":"retransmit","time":"2026-11-25T12:33:17.963395Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"10.77.0.1","src_port":50964,"dst_ip":"10.77.0.2","dst_port":1521},"netns":4026532177,"count":1,"retransmit":{"state":"SYN_SENT","snd_una":3041266995}}"#,
    );
    let conntrack = parse(
        r#"{"schema":"droptrace.v1","kind":"conntrack","time":"2026-11-25T12:40:00.000001Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"10.0.0.1","src_port":40000,"dst_ip":"10.96.0.10","dst_port":1521},"netns":4026531840,"count":1,"conntrack":{"state":"UNREPLIED","status":["CONFIRMED","DNAT","DST_NAT_DONE"],"original":{"src_ip":"10.0.0.1","src_port":40000,"dst_ip":"10.96.0.10","dst_port":1521},"reply":{"src_ip":"10.244.1.5","src_port":1521,"dst_ip":"10.0.0.1","dst_port":40000},"nat":"dnat","mark":0,"zone":0}}"#,
    );
    // A storm and its folded drop record (random-source SYN flood), a drop on a kernel
    // without drop reasons (5.10), and a successful connect (--emit connects).
    let storm = parse(
        r#"{"schema":"droptrace.v1","kind":"storm","time":"2026-12-02T10:00:08.000000Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"0.0.0.0","src_port":0,"dst_ip":"10.201.7.2","dst_port":1521},"count":1,"storm":{"id":3,"started":"2026-12-02T10:00:00.000000Z","duration_ms":8000,"outcome":"ended","drops":812345,"peak_per_sec":231000,"sources":{"distinct":3412,"estimated":true,"top":[{"ip":"198.51.100.7","drops":512},{"ip":"203.0.113.9","drops":256}]}},"drops":[{"reason":"NETFILTER_DROP","class":"network","location":"nft_do_chain+0x46f","netns":4026532455,"count":812345}],"diagnosis":"SYN flood to 10.201.7.2:1521 from 3412 sources over 8.0 s (peak 231000/s): 812345 SYNs dropped on this node by netfilter (NETFILTER_DROP at nft_do_chain) in netns 4026532455"}"#,
    );
    let drop_folded = parse(
        r#"{"schema":"droptrace.v1","kind":"drop","time":"2026-12-02T10:00:01.000000Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"0.0.0.0","src_port":0,"dst_ip":"10.201.7.2","dst_port":1521},"tcp":{"flags":"SYN"},"drop":{"reason":"NETFILTER_DROP","reason_code":12,"class":"network","location":"nft_do_chain+0x46f","storm":3},"netns":4026532455,"ifindex":2,"count":230118}"#,
    );
    let drop_no_reason = parse(
        r#"{"schema":"droptrace.v1","kind":"drop","time":"2026-12-02T10:00:02.000000Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"10.201.7.1","src_port":40000,"dst_ip":"10.201.7.2","dst_port":1521},"tcp":{"flags":"SYN"},"drop":{"reason":"UNAVAILABLE","class":"network","location":"nf_hook_slow+0x9c"},"netns":4026532455,"ifindex":2,"count":1}"#,
    );
    let connect = parse(
        r#"{"schema":"droptrace.v1","kind":"connect","time":"2026-12-02T10:00:03.001000Z","node":"vm","flow":{"proto":"tcp","family":"ipv4","src_ip":"10.201.7.1","src_port":40002,"dst_ip":"10.201.7.2","dst_port":1521},"netns":4026532386,"count":1,"process":{"pid":4242,"tgid":4242,"comm":"sqlplus","cgroup_id":9},"attempt":{"id":9,"started":"2026-12-02T10:00:03.000000Z","syn_retransmits":0,"duration_ms":1,"outcome":"established","side":"client"}}"#,
    );
    let lost_correlation = parse(
        r#"{"schema":"droptrace.v1","kind":"lost","time":"2026-11-25T12:41:00.000000Z","node":"vm","count":12,"lost":{"source":"correlation","reason":"flow_table_full"}}"#,
    );

    vec![
        ("drop", drop),
        ("stall-dnat", stall_dnat),
        ("stall-data-stalled", data_stalled),
        ("tcp-state", tcp_state),
        ("retransmit", retransmit),
        ("conntrack-unreplied", conntrack),
        ("lost-correlation", lost_correlation),
        ("drop-ipv6-bare", drop6),
        ("stall", stall),
        ("stall-established-late", late),
        ("tns-refuse", tns),
        ("tns-redirect", redirect),
        ("lost-kernel", lost_kernel),
        ("lost-sink", lost_sink),
        ("storm", storm),
        ("drop-storm-folded", drop_folded),
        ("drop-reason-unavailable", drop_no_reason),
        ("connect", connect),
    ]
    .into_iter()
    .map(|(n, mut e)| {
        with_conntrack_ids(&mut e);
        (n, e)
    })
    .collect()
}

/// Conntrack tuples carry their Community IDs, as the daemon writes them.
fn with_conntrack_ids(e: &mut Event) {
    if let Some(ct) = e.conntrack.as_mut() {
        for t in [&mut ct.original, &mut ct.reply] {
            t.community_id = community_id::tcp(t.src_ip, t.src_port, t.dst_ip, t.dst_port);
        }
    }
}

/// `n` distinct drop events (the `count` field numbers them) for delivery tests.
pub(crate) fn numbered_drops(n: u64) -> Vec<Event> {
    let base = samples().remove(0).1;
    (0..n)
        .map(|i| {
            let mut e = base.clone();
            e.count = i + 1;
            e.time = format!("2026-11-25T11:{:02}:{:02}.{:06}Z", (i / 60) % 60, i % 60, i);
            e
        })
        .collect()
}

pub(crate) fn ndjson(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap() + "\n")
        .collect()
}

pub(crate) fn droptrace() -> Command {
    let mut c = Command::new(bin());
    c.env("DROPTRACE_LOG", "warn")
        .env_remove("DROPTRACE_HTTP_AUTH");
    c
}

pub(crate) fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub(crate) fn read_lines(p: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

pub(crate) fn duration_ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

// ---------------------------------------------------------------- shared by the sink tests

pub(crate) struct Certs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// The server identity for in-test TLS servers.
    pub server: (rustls::pki_types::CertificateDer<'static>, Vec<u8>),
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate, made fresh
/// for the test.
pub(crate) fn make_certs(dir: &Path) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "droptrace test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = rcgen::CertifiedIssuer::self_signed(ca, ca_key).unwrap();
    let leaf = |names: Vec<String>, cn: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        (p.signed_by(&key, &ca).unwrap(), key)
    };
    let (cert, key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "localhost");
    let (client, client_key) = leaf(vec!["droptrace.test".into()], "droptrace");
    let c = Certs {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        server: (cert.der().clone(), key.serialize_der()),
    };
    std::fs::write(&c.ca, ca.pem()).unwrap();
    std::fs::write(&c.cert, cert.pem()).unwrap();
    std::fs::write(&c.key, key.serialize_pem()).unwrap();
    std::fs::write(&c.client_cert, client.pem()).unwrap();
    std::fs::write(&c.client_key, client_key.serialize_pem()).unwrap();
    c
}

/// A `droptrace replay` fed through stdin, so the test decides when events arrive.
pub(crate) struct LiveReplay {
    pub proc: Guard,
}

impl LiveReplay {
    pub(crate) fn start(args: &[&str]) -> Self {
        Self::start_to(args, Stdio::null())
    }

    /// With its stdout (the `-` sink) going to `stdout`.
    pub(crate) fn start_to(args: &[&str], stdout: impl Into<Stdio>) -> Self {
        let child = droptrace()
            .args(["replay", "--input", "-", "--node-name", "test-node"])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        LiveReplay {
            proc: Guard(Some(child)),
        }
    }

    pub(crate) fn send(&mut self, events: &[Event]) {
        let stdin = self.proc.child().stdin.as_mut().unwrap();
        stdin.write_all(ndjson(events).as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Closes stdin and waits for the summary; returns stderr.
    pub(crate) fn finish(mut self, timeout: Duration) -> String {
        let mut child = self.proc.0.take().unwrap();
        drop(child.stdin.take());
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                child
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut err)
                    .unwrap();
                assert!(status.success(), "replay failed: {err}");
                return err;
            }
            if start.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                panic!("replay did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
