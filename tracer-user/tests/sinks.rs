//! The output pipeline end to end through the real binary (`droptrace replay`, which shares
//! the pipeline with `droptrace run` and needs no kernel): rsyslog over TCP and TLS, a
//! receiver outage with spool replay, a tiny spool cap with in-stream loss accounting, the
//! three HTTP modes with 429/503 retries, the metrics endpoint, and bad input.
mod output_common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use droptrace::{
    encode::{self, Format},
    event::Event,
};
use droptrace_tests::receiver::LineReceiver;
use output_common::*;
use serde_json::Value;

const RSYSLOGD: &str = "/usr/sbin/rsyslogd";

// ---------------------------------------------------------------- rsyslog

/// A private rsyslogd: imtcp on a loopback port, every message to `out` as "MSGID MSG".
struct Rsyslog {
    conf: PathBuf,
    pidfile: PathBuf,
    pub port: u16,
    pub out: PathBuf,
    proc: Guard,
}

impl Rsyslog {
    fn start(dir: &Path, certs: Option<&Certs>) -> Self {
        Self::start_with(dir, certs, "anon")
    }

    /// `auth`: rsyslog's StreamDriver.AuthMode (`anon`, or `x509/certvalid` to require a
    /// client certificate signed by the CA).
    fn start_with(dir: &Path, certs: Option<&Certs>, auth: &str) -> Self {
        assert!(
            Path::new(RSYSLOGD).exists(),
            "{RSYSLOGD} not found: install the Debian packages `rsyslog` and `rsyslog-gnutls` \
             (apt-get install -y rsyslog rsyslog-gnutls)"
        );
        let port = free_port();
        let work = dir.join("rsyslog-work");
        std::fs::create_dir_all(&work).unwrap();
        let out = dir.join("received.log");
        let tls_global = certs.map_or(String::new(), |c| {
            format!(
                "global(DefaultNetstreamDriver=\"gtls\" DefaultNetstreamDriverCAFile=\"{}\" \
                 DefaultNetstreamDriverCertFile=\"{}\" DefaultNetstreamDriverKeyFile=\"{}\")\n",
                c.ca.display(),
                c.cert.display(),
                c.key.display()
            )
        });
        let tls_module = if certs.is_some() {
            format!(
                " StreamDriver.Name=\"gtls\" StreamDriver.Mode=\"1\" StreamDriver.AuthMode=\"{auth}\""
            )
        } else {
            String::new()
        };
        let conf = dir.join("rsyslog.conf");
        std::fs::write(
            &conf,
            format!(
                "$MaxMessageSize 64k\n\
                 global(workDirectory=\"{work}\")\n\
                 {tls_global}\
                 module(load=\"imtcp\"{tls_module})\n\
                 template(name=\"t\" type=\"string\" string=\"%msgid% %app-name% %msg%\\n\")\n\
                 ruleset(name=\"r\") {{ action(type=\"omfile\" file=\"{out}\" template=\"t\" \
                 flushOnTXEnd=\"on\" asyncWriting=\"off\") }}\n\
                 input(type=\"imtcp\" port=\"{port}\" address=\"127.0.0.1\" ruleset=\"r\")\n",
                work = work.display(),
                out = out.display(),
            ),
        )
        .unwrap();
        let mut r = Rsyslog {
            pidfile: dir.join("rsyslog.pid"),
            conf,
            port,
            out,
            proc: Guard(None),
        };
        r.restart();
        r
    }

    fn restart(&mut self) {
        self.proc.kill();
        let _ = std::fs::remove_file(&self.pidfile);
        let child = Command::new(RSYSLOGD)
            .arg("-n")
            .arg("-f")
            .arg(&self.conf)
            .arg("-i")
            .arg(&self.pidfile)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start rsyslogd");
        self.proc = Guard(Some(child));
        let port = self.port;
        wait_for("rsyslogd to listen", Duration::from_secs(15), || {
            TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    fn kill(&mut self) {
        self.proc.kill();
    }

    /// (MSGID, APP-NAME, JSON) per received message.
    fn received(&self) -> Vec<(String, String, Value)> {
        read_lines(&self.out)
            .into_iter()
            .map(|l| {
                let mut parts = l.splitn(3, ' ');
                let msgid = parts.next().unwrap_or_default().to_string();
                let app = parts.next().unwrap_or_default().to_string();
                let msg = parts.next().unwrap_or_default().trim();
                let v = serde_json::from_str(msg).unwrap_or_else(|e| panic!("`{msg}`: {e}"));
                (msgid, app, v)
            })
            .collect()
    }
}

fn encoded(format: Format, e: &Event) -> Value {
    let mut buf = Vec::new();
    encode::encode(format, e, &mut buf);
    serde_json::from_slice(&buf).unwrap()
}

/// Runs `droptrace replay` over `events` to completion; returns (exit code, stderr).
fn replay(events: &[Event], args: &[&str]) -> (i32, String) {
    let dir = tmpdir();
    let input = dir.path().join("in.ndjson");
    std::fs::write(&input, ndjson(events)).unwrap();
    let out = droptrace()
        .arg("replay")
        .arg("--input")
        .arg(&input)
        .arg("--node-name")
        .arg("test-node")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn all_samples() -> Vec<Event> {
    let mut v: Vec<Event> = samples().into_iter().map(|(_, e)| e).collect();
    v.extend(numbered_drops(40));
    v
}

fn check_one_to_one(r: &Rsyslog, events: &[Event], format: Format) {
    let got = r.received();
    assert_eq!(got.len(), events.len(), "messages received by rsyslog");
    for (i, ((msgid, app, v), e)) in got.iter().zip(events).enumerate() {
        assert_eq!(msgid, e.kind.as_str(), "MSGID of message {i}");
        assert_eq!(app, "droptrace", "APP-NAME of message {i}");
        assert_eq!(v, &encoded(format, e), "message {i}");
    }
}

#[test]
fn syslog_tcp_to_rsyslog_one_to_one() {
    let dir = tmpdir();
    let r = Rsyslog::start(dir.path(), None);
    let events = all_samples();
    let (code, err) = replay(
        &events,
        &["-o", &format!("syslog+tcp://127.0.0.1:{}", r.port)],
    );
    assert_eq!(code, 0, "{err}");
    wait_for(
        "rsyslog to write everything",
        Duration::from_secs(15),
        || read_lines(&r.out).len() >= events.len(),
    );
    check_one_to_one(&r, &events, Format::Native);
}

#[test]
fn syslog_tls_to_rsyslog_one_to_one() {
    let dir = tmpdir();
    let certs = make_certs(dir.path());
    let r = Rsyslog::start(dir.path(), Some(&certs));
    let events = all_samples();
    let url = format!("syslog+tls://127.0.0.1:{}", r.port);
    let ca = certs.ca.display().to_string();
    let (code, err) = replay(&events, &["-o", &url, "--ca", &ca, "--format", "ocsf"]);
    assert_eq!(code, 0, "{err}");
    wait_for(
        "rsyslog to write everything",
        Duration::from_secs(15),
        || read_lines(&r.out).len() >= events.len(),
    );
    check_one_to_one(&r, &events, Format::Ocsf);

    // A CA that did not sign the server's certificate: refused at start.
    let other = make_certs(&dir.path().join("other").tap_mkdir());
    let (code, err) = replay(
        &events,
        &["-o", &url, "--ca", &other.ca.display().to_string()],
    );
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("TLS handshake"), "{err}");
}

#[test]
fn syslog_mutual_tls_with_client_certificate() {
    let dir = tmpdir();
    let certs = make_certs(dir.path());
    let r = Rsyslog::start_with(dir.path(), Some(&certs), "x509/certvalid");
    let events = all_samples();
    let url = format!("syslog+tls://127.0.0.1:{}", r.port);
    let (code, err) = replay(
        &events,
        &[
            "-o",
            &url,
            "--ca",
            certs.ca.to_str().unwrap(),
            "--client-cert",
            certs.client_cert.to_str().unwrap(),
            "--client-key",
            certs.client_key.to_str().unwrap(),
            "--format",
            "ecs",
        ],
    );
    assert_eq!(code, 0, "{err}");
    wait_for(
        "rsyslog to write everything",
        Duration::from_secs(15),
        || read_lines(&r.out).len() >= events.len(),
    );
    check_one_to_one(&r, &events, Format::Ecs);
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

fn lines_of_kind(path: &Path, kind: &str) -> Vec<Value> {
    read_lines(path)
        .iter()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v["kind"] == kind)
        .collect()
}

/// rsyslog plus a live replay into it and into a file copy, spooling to `spool`.
struct Outage {
    r: Rsyslog,
    live: LiveReplay,
    spool: PathBuf,
    file: PathBuf,
    sink: String,
}

impl Outage {
    fn start(dir: &Path, extra: &[&str]) -> Self {
        let r = Rsyslog::start(dir, None);
        let spool = dir.join("spool");
        let file = dir.join("copy.ndjson");
        let sink = format!("syslog+tcp://127.0.0.1:{}", r.port);
        let file_sink = format!("file:{}", file.display());
        let mut args = vec!["-o", &sink, "-o", &file_sink, "--flush-timeout", "60s"];
        args.extend(["--spool-dir", spool.to_str().unwrap()]);
        args.extend(extra);
        let live = LiveReplay::start(&args);
        Outage {
            r,
            live,
            spool,
            file,
            sink,
        }
    }
}

/// The receiver dies mid-stream and comes back: every event arrives exactly once, in order.
#[test]
fn receiver_outage_replays_spool_in_order_exactly_once() {
    let dir = tmpdir();
    let Outage {
        mut r,
        mut live,
        spool,
        file,
        sink,
    } = Outage::start(dir.path(), &[]);
    let events = numbered_drops(600);
    live.send(&events[..200]);
    wait_for("the first 200 at rsyslog", Duration::from_secs(15), || {
        read_lines(&r.out).len() >= 200
    });
    r.kill();
    // Mid-stream: these arrive while the receiver is down and must be spooled.
    live.send(&events[200..400]);
    wait_for("the file copy of 400", Duration::from_secs(15), || {
        read_lines(&file).len() >= 400
    });
    std::thread::sleep(Duration::from_millis(500));
    let spooled_files =
        std::fs::read_dir(spool.join("syslog_tcp___127.0.0.1_".to_string() + &r.port.to_string()))
            .map(|d| d.count())
            .unwrap_or(0);
    assert!(spooled_files > 0, "the outage did not reach the spool");
    r.restart();
    live.send(&events[400..]);
    let err = live.finish(Duration::from_secs(90));
    wait_for("all 600 at rsyslog", Duration::from_secs(20), || {
        read_lines(&r.out).len() >= 600
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = r.received();
    let counts: Vec<u64> = got
        .iter()
        .map(|(_, _, v)| v["count"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = (1..=600).collect();
    assert_eq!(
        counts, want,
        "rsyslog got the events out of order, twice or not at all\n{err}"
    );
    assert!(err.contains(&format!("{sink}: 600 sent")), "{err}");
    assert!(err.contains("0 discarded, 0 left in spool"), "{err}");
    assert!(lines_of_kind(&file, "lost").is_empty(), "nothing was lost");
}

/// With a tiny spool cap, what does not fit is discarded and exactly that many are reported
/// in-stream (`lost`, source sink) to the healthy file sink and to syslog once it is back.
#[test]
fn tiny_spool_cap_discards_are_reported_in_stream() {
    let dir = tmpdir();
    // Small batches: a failed send puts its batch and the direct channel (max(batch, 64)
    // records) back in front of the spool past the cap; the rest must be appended under
    // it. With the default 500, all 380 events could be in memory when the first send
    // fails (a fast encoder) and fit, and no discard would be there to report.
    let Outage {
        mut r,
        mut live,
        file,
        sink,
        ..
    } = Outage::start(dir.path(), &["--spool-max", "16K", "--batch", "10"]);
    let events = numbered_drops(400);
    live.send(&events[..20]);
    wait_for("the first 20 at rsyslog", Duration::from_secs(15), || {
        read_lines(&r.out).len() >= 20
    });
    r.kill();
    live.send(&events[20..]);
    // The loss report reaches the healthy sink while syslog is still down.
    wait_for(
        "a lost event in the file copy",
        Duration::from_secs(15),
        || !lines_of_kind(&file, "lost").is_empty(),
    );
    r.restart();
    let err = live.finish(Duration::from_secs(90));

    let lost_in_file: u64 = lines_of_kind(&file, "lost")
        .iter()
        .inspect(|v| {
            assert_eq!(v["lost"]["source"], "sink");
            assert_eq!(v["lost"]["sink"], sink.as_str());
            assert_eq!(v["lost"]["reason"], "spool_full");
        })
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    assert_eq!(lines_of_kind(&file, "drop").len(), 400);
    wait_for("rsyslog to settle", Duration::from_secs(20), || {
        r.received().iter().any(|(k, _, _)| k == "lost")
    });
    std::thread::sleep(Duration::from_millis(300));
    let got = r.received();
    let drops: Vec<u64> = got
        .iter()
        .filter(|(k, _, _)| k == "drop")
        .map(|(_, _, v)| v["count"].as_u64().unwrap())
        .collect();
    let lost_at_syslog: u64 = got
        .iter()
        .filter(|(k, _, _)| k == "lost")
        .map(|(_, _, v)| v["count"].as_u64().unwrap())
        .sum();
    assert!(
        lost_in_file > 0,
        "a 16K spool must overflow with 380 events"
    );
    assert_eq!(
        drops.len() as u64 + lost_in_file,
        400,
        "delivered + reported lost = sent"
    );
    assert_eq!(
        lost_at_syslog, lost_in_file,
        "the sink itself is told the same count"
    );
    assert!(
        drops.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicates"
    );
    assert!(
        err.contains(&format!("{sink}: {} sent, ", got.len())),
        "{err}"
    );
    assert!(err.contains(&format!("{lost_in_file} discarded")), "{err}");
}

/// What the flush deadline leaves in the spool is delivered by the next run, first.
#[test]
fn spool_left_at_exit_is_delivered_by_the_next_run() {
    let dir = tmpdir();
    let mut r = Rsyslog::start(dir.path(), None);
    let spool = dir.path().join("spool");
    let sink = format!("syslog+tcp://127.0.0.1:{}", r.port);
    let args = [
        "-o",
        &sink,
        "--spool-dir",
        spool.to_str().unwrap(),
        "--flush-timeout",
        "1s",
    ];
    let mut live = LiveReplay::start(&args);
    let events = numbered_drops(150);
    live.send(&events[..50]);
    wait_for("the first 50 at rsyslog", Duration::from_secs(15), || {
        read_lines(&r.out).len() >= 50
    });
    r.kill();
    live.send(&events[50..100]);
    let err = live.finish(Duration::from_secs(30));
    assert!(err.contains(&format!("{sink}: 50 sent")), "{err}");
    assert!(err.contains("50 left in spool"), "{err}");

    r.restart();
    let (code, err) = replay(&events[100..], &args);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "{sink}: 100 sent, 0 errors, 0 discarded, 0 left in spool"
        )),
        "{err}"
    );
    wait_for("all 150 at rsyslog", Duration::from_secs(15), || {
        read_lines(&r.out).len() >= 150
    });
    let counts: Vec<u64> = r
        .received()
        .iter()
        .map(|(_, _, v)| v["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, (1..=150).collect::<Vec<u64>>());
}

// ---------------------------------------------------------------- HTTP

#[derive(Debug, Clone)]
struct Request {
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    at: Instant,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive HTTP/1.1 server answering the scripted statuses first, then 200 with `ok_body`.
struct TestHttp {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl TestHttp {
    fn start(script: Vec<(u16, &'static str)>, ok_body: &'static str) -> Self {
        Self::start_inner(script, ok_body, None)
    }

    fn start_tls(script: Vec<(u16, &'static str)>, ok_body: &'static str, certs: &Certs) -> Self {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        let (cert, key) = certs.server.clone();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
        Self::start_inner(script, ok_body, Some(Arc::new(config)))
    }

    fn start_inner(
        script: Vec<(u16, &'static str)>,
        ok_body: &'static str,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.into_iter()));
        let reqs = requests.clone();
        std::thread::spawn(move || {
            // Bounded: the test's few connections, then the thread ends with the process.
            for conn in listener.incoming().take(64) {
                let Ok(conn) = conn else { continue };
                conn.set_read_timeout(Some(Duration::from_secs(30)))
                    .unwrap();
                let reqs = reqs.clone();
                let script = script.clone();
                let tls = tls.clone();
                std::thread::spawn(move || match tls {
                    None => serve_http(conn, reqs, script, ok_body),
                    Some(cfg) => {
                        let tls = rustls::ServerConnection::new(cfg).unwrap();
                        serve_http(rustls::StreamOwned::new(tls, conn), reqs, script, ok_body)
                    }
                });
            }
        });
        TestHttp { port, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

fn serve_http<S: Read + Write>(
    conn: S,
    reqs: Arc<Mutex<Vec<Request>>>,
    script: Arc<Mutex<std::vec::IntoIter<(u16, &'static str)>>>,
    ok_body: &str,
) {
    let mut r = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let len: usize = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if r.read_exact(&mut body).is_err() {
            return;
        }
        let (status, extra) = script.lock().unwrap().next().unwrap_or((200, ""));
        let resp_body = if status == 200 { ok_body } else { "try later" };
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n{extra}\r\n{resp_body}",
            resp_body.len()
        );
        reqs.lock().unwrap().push(Request {
            path,
            headers: headers.clone(),
            body: if status == 200 { body } else { Vec::new() },
            at: Instant::now(),
        });
        let w = r.get_mut();
        if w.write_all(resp.as_bytes())
            .and_then(|()| w.flush())
            .is_err()
        {
            return;
        }
    }
}

fn http_case(
    mode: &str,
    path: &str,
    ok_body: &'static str,
    auth: &str,
) -> (Vec<Request>, Vec<Event>) {
    let server = TestHttp::start(
        vec![(503, "Retry-After: 1\r\n"), (429, "Retry-After: 1\r\n")],
        ok_body,
    );
    let dir = tmpdir();
    let auth_file = dir.path().join("auth");
    std::fs::write(&auth_file, format!("{auth}\n")).unwrap();
    let events = all_samples();
    let url = format!("http://127.0.0.1:{}{path}", server.port);
    let (code, err) = replay(
        &events,
        &[
            "-o",
            &url,
            "--http-mode",
            mode,
            "--http-auth-file",
            auth_file.to_str().unwrap(),
            "--format",
            "ecs",
            "--batch",
            "16",
            "--flush-timeout",
            "30s",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "{url}: {} sent, 2 errors, 0 discarded",
            events.len()
        )),
        "{err}"
    );
    let reqs = server.requests();
    // 503 then 429, each honoured (Retry-After: 1) before the next try.
    assert!(reqs.len() >= 3, "{reqs:?}");
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_millis(950),
        "Retry-After ignored"
    );
    assert!(
        reqs[2].at - reqs[1].at >= Duration::from_millis(950),
        "Retry-After ignored"
    );
    for r in &reqs {
        assert_eq!(r.path, path);
    }
    (reqs, events)
}

#[test]
fn http_generic_ndjson_with_retries() {
    let (reqs, events) = http_case("generic", "/ingest", "", "Bearer s3cret");
    let mut got = Vec::new();
    for r in &reqs {
        assert_eq!(r.header("authorization"), Some("Bearer s3cret"));
        assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
        for l in String::from_utf8(r.body.clone()).unwrap().lines() {
            got.push(serde_json::from_str::<Value>(l).unwrap());
        }
    }
    let want: Vec<Value> = events.iter().map(|e| encoded(Format::Ecs, e)).collect();
    assert_eq!(got, want);
}

#[test]
fn http_elasticsearch_bulk_with_retries() {
    let (reqs, events) = http_case(
        "elasticsearch-bulk",
        "/droptrace/_bulk",
        r#"{"errors":false,"items":[]}"#,
        "ApiKey abc==",
    );
    let mut got = Vec::new();
    for r in reqs.iter().filter(|r| !r.body.is_empty()) {
        assert_eq!(r.header("authorization"), Some("ApiKey abc=="));
        let body = String::from_utf8(r.body.clone()).unwrap();
        assert!(body.ends_with('\n'), "bulk bodies end with a newline");
        let lines: Vec<&str> = body.lines().collect();
        for pair in lines.chunks(2) {
            assert_eq!(pair[0], r#"{"create":{}}"#);
            got.push(serde_json::from_str::<Value>(pair[1]).unwrap());
        }
    }
    let want: Vec<Value> = events.iter().map(|e| encoded(Format::Ecs, e)).collect();
    assert_eq!(got, want);
}

#[test]
fn http_splunk_hec_with_retries() {
    let (reqs, events) = http_case(
        "splunk-hec",
        "/services/collector/event",
        r#"{"text":"Success","code":0}"#,
        "11111111-2222-3333-4444-555555555555",
    );
    let mut got = Vec::new();
    for r in reqs.iter().filter(|r| !r.body.is_empty()) {
        assert_eq!(
            r.header("authorization"),
            Some("Splunk 11111111-2222-3333-4444-555555555555")
        );
        let body = String::from_utf8(r.body.clone()).unwrap();
        for l in body.lines() {
            let env: Value = serde_json::from_str(l).unwrap();
            assert_eq!(env["sourcetype"], "droptrace");
            assert!(env["time"].as_f64().unwrap() > 1.7e9);
            got.push(env["event"].clone());
        }
    }
    let want: Vec<Value> = events.iter().map(|e| encoded(Format::Ecs, e)).collect();
    assert_eq!(got, want);
}

#[test]
fn https_generic_with_ca() {
    let dir = tmpdir();
    let certs = make_certs(dir.path());
    let server = TestHttp::start_tls(vec![(503, "")], "", &certs);
    let events = all_samples();
    let url = format!("https://127.0.0.1:{}/in", server.port);
    let (code, err) = replay(&events, &["-o", &url, "--ca", certs.ca.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("{url}: {} sent, 1 errors", events.len())),
        "{err}"
    );
    let got: Vec<Value> = server
        .requests()
        .iter()
        .flat_map(|r| {
            String::from_utf8(r.body.clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect::<Vec<Value>>()
        })
        .collect();
    let want: Vec<Value> = events.iter().map(|e| encoded(Format::Native, e)).collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------- metrics

fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn metrics_endpoint_counts_what_was_sent() {
    let dir = tmpdir();
    let port = free_port();
    let file = dir.path().join("out.ndjson");
    let file_sink = format!("file:{}", file.display());
    let mut live = LiveReplay::start(&[
        "-o",
        &file_sink,
        "--metrics",
        &format!("127.0.0.1:{port}"),
        "--metrics-max-pods",
        "1",
    ]);
    let events = all_samples();
    live.send(&events);
    wait_for(
        "the file sink to get everything",
        Duration::from_secs(15),
        || read_lines(&file).len() >= events.len(),
    );
    let (status, text) = http_get(port, "/metrics");
    assert_eq!(status, 200);
    let count = |k: &str| events.iter().filter(|e| e.kind.as_str() == k).count() as f64;
    for k in ["drop", "lost", "stall", "tns"] {
        assert_eq!(
            metric(&text, &format!("droptrace_events_total{{kind=\"{k}\"}}")),
            Some(count(k)),
            "{k}\n{text}"
        );
    }
    // Every NETFILTER_DROP sample with a pod has the shop/checkout pod (admitted first) and
    // port 1521.
    let netfilter: u64 = events
        .iter()
        .filter(|e| {
            e.drop
                .as_ref()
                .is_some_and(|d| d.reason == "NETFILTER_DROP")
                && e.source.is_some()
        })
        .map(|e| e.count)
        .sum();
    assert_eq!(
        metric(
            &text,
            "droptrace_drops_total{reason=\"NETFILTER_DROP\",class=\"network\",namespace=\"shop\",pod=\"checkout-7d9f\",port=\"1521\"}"
        ),
        Some(netfilter as f64),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "droptrace_drops_total{reason=\"TCP_INVALID_SEQUENCE\",class=\"local\",namespace=\"\",pod=\"\",port=\"2484\"}"
        ),
        Some(1.0),
        "{text}"
    );
    for outcome in ["timeout", "established_late", "data_stalled"] {
        let stalls = events
            .iter()
            .filter(|e| e.attempt.as_ref().is_some_and(|a| a.outcome == outcome))
            .count();
        assert!(stalls > 0, "samples cover {outcome}");
        assert_eq!(
            metric(
                &text,
                &format!("droptrace_stalls_total{{outcome=\"{outcome}\"}}")
            ),
            Some(stalls as f64),
            "{text}"
        );
    }
    assert_eq!(
        metric(&text, "droptrace_kernel_lost_total"),
        Some(17.0),
        "{text}"
    );
    let sink = |m: &str| metric(&text, &format!("{m}{{sink=\"{file_sink}\"}}"));
    assert_eq!(
        sink("droptrace_sink_sent_total"),
        Some(events.len() as f64),
        "{text}"
    );
    assert_eq!(sink("droptrace_sink_errors_total"), Some(0.0));
    assert_eq!(sink("droptrace_sink_spooled"), Some(0.0));
    assert_eq!(sink("droptrace_sink_discarded_total"), Some(0.0));
    assert!(text.contains(&format!(
        "droptrace_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    assert_eq!(http_get(port, "/healthz").0, 200);
    assert_eq!(http_get(port, "/readyz").0, 200);
    assert_eq!(http_get(port, "/nope").0, 404);
    live.finish(Duration::from_secs(20));
}

// ---------------------------------------------------------------- receiver down at start

fn counts_of(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["count"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// The SIEM is down when droptrace starts and comes up 5 s later: droptrace starts anyway,
/// says so once (stderr and metrics), spools, and then delivers every event exactly once, in
/// order: the receiver ends up with exactly what stdout got.
#[test]
fn receiver_down_at_start_spools_until_it_appears() {
    let dir = tmpdir();
    let (port, metrics_port) = (free_port(), free_port());
    let sink = format!("tcp://127.0.0.1:{port}");
    let spool = dir.path().join("spool");
    let stdout = dir.path().join("stdout.ndjson");
    let started = Instant::now();
    let mut live = LiveReplay::start_to(
        &[
            "-o",
            "-",
            "-o",
            &sink,
            "--spool-dir",
            spool.to_str().unwrap(),
            "--flush-timeout",
            "60s",
            "--metrics",
            &format!("127.0.0.1:{metrics_port}"),
        ],
        std::fs::File::create(&stdout).unwrap(),
    );
    let events = numbered_drops(600);
    live.send(&events[..300]);
    wait_for("300 events on stdout", Duration::from_secs(15), || {
        read_lines(&stdout).len() >= 300
    });
    let series = |m: &str| format!("{m}{{sink=\"{sink}\"}}");
    wait_for(
        "the receiver's events in the spool",
        Duration::from_secs(10),
        || {
            let text = http_get(metrics_port, "/metrics").1;
            metric(&text, &series("droptrace_sink_spooled")) == Some(300.0)
        },
    );
    let text = http_get(metrics_port, "/metrics").1;
    assert_eq!(
        metric(&text, &series("droptrace_sink_up")),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, &series("droptrace_sink_sent_total")),
        Some(0.0)
    );

    std::thread::sleep(Duration::from_secs(5).saturating_sub(started.elapsed()));
    let receiver = LineReceiver::start(port);
    // Retries back off up to 30 s; the receiver is found within one interval (6.4 s here).
    wait_for(
        "the spooled 300 at the receiver",
        Duration::from_secs(40),
        || receiver.lines().len() >= 300,
    );
    let text = http_get(metrics_port, "/metrics").1;
    assert_eq!(
        metric(&text, &series("droptrace_sink_up")),
        Some(1.0),
        "{text}"
    );
    live.send(&events[300..]);
    let err = live.finish(Duration::from_secs(60));
    wait_for("all 600 at the receiver", Duration::from_secs(10), || {
        receiver.lines().len() >= 600
    });
    std::thread::sleep(Duration::from_millis(300));

    let (got, shown) = (receiver.lines(), read_lines(&stdout));
    println!(
        "stdout: {} events, receiver: {} events, spooled before it appeared: 300\n{err}",
        shown.len(),
        got.len()
    );
    assert_eq!(got, shown, "receiver and stdout hold the same events");
    assert_eq!(
        counts_of(&got),
        (1..=600).collect::<Vec<_>>(),
        "once, in order"
    );
    let said: Vec<_> = err
        .lines()
        .filter(|l| l.contains("receiver unreachable at start"))
        .collect();
    assert_eq!(said.len(), 1, "said once: {err}");
    assert!(said[0].contains("spooling until it answers"), "{err}");
    assert!(!err.contains("sink unavailable"), "not said twice: {err}");
    assert!(
        err.contains(&format!("{sink}: 600 sent, "))
            && err.contains("0 discarded, 0 left in spool"),
        "{err}"
    );
}

/// Without a spool the sink holds what its queue holds and counts the rest as `lost`,
/// announced to the other sinks; droptrace starts and ends normally all the same.
#[test]
fn receiver_down_at_start_without_spool_counts_lost() {
    let dir = tmpdir();
    let sink = format!("tcp://127.0.0.1:{}", free_port());
    let file = dir.path().join("copy.ndjson");
    let file_sink = format!("file:{}", file.display());
    let mut live = LiveReplay::start(&["-o", &sink, "-o", &file_sink, "--flush-timeout", "2s"]);
    live.send(&numbered_drops(300));
    let err = live.finish(Duration::from_secs(30));
    let drops = lines_of_kind(&file, "drop").len();
    assert_eq!(drops, 300, "the healthy sink got everything");
    let lost: u64 = lines_of_kind(&file, "lost")
        .iter()
        .filter(|v| v["lost"]["sink"] == sink.as_str())
        .map(|v| v["count"].as_u64().unwrap())
        .sum();
    println!("lost reported to the file sink: {lost}\n{err}");
    assert_eq!(
        lost, 300,
        "every undelivered event is a counted loss: {err}"
    );
    assert!(
        err.contains("receiver unreachable at start") && err.contains("counting the rest as lost"),
        "{err}"
    );
    assert!(err.contains(&format!("{sink}: 0 sent, ")), "{err}");
    assert!(err.contains("300 discarded, 0 left in spool"), "{err}");
}

// ---------------------------------------------------------------- bad input

fn one_line_exit_2(cmd: &str, args: &[&str], expect: &str) {
    let out = droptrace()
        .arg(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "{args:?}: one line expected:\n{err}"
    );
    assert!(
        err.starts_with("droptrace: ") && err.contains(expect),
        "{args:?}: {err}"
    );
}

#[test]
fn bad_outputs_fail_at_start_with_one_line_and_exit_2() {
    let dir = tmpdir();
    let port = free_port();
    one_line_exit_2("replay", &["-o", "gopher://x:70"], "unknown scheme");
    // A receiver that is down at start is not a configuration error (see
    // receiver_down_at_start_*); a CA that does not load is.
    let bad_ca = dir.path().join("ca.pem");
    std::fs::write(&bad_ca, "not a certificate\n").unwrap();
    one_line_exit_2(
        "replay",
        &[
            "-o",
            &format!("syslog+tls://127.0.0.1:{port}"),
            "--ca",
            bad_ca.to_str().unwrap(),
        ],
        "CA file",
    );
    one_line_exit_2(
        "replay",
        &[
            "-o",
            &format!("https://127.0.0.1:{port}/"),
            "--ca",
            "/nonexistent/ca.pem",
        ],
        "CA file",
    );
    // Root can write anywhere permissions allow; a path under a regular file never works.
    let blocker = dir.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    one_line_exit_2(
        "replay",
        &[
            "-o",
            "-",
            "--spool-dir",
            blocker.join("spool").to_str().unwrap(),
        ],
        "--spool-dir",
    );
    one_line_exit_2(
        "replay",
        &["-o", "file:/nonexistent-dir/x.ndjson"],
        "file:/nonexistent-dir",
    );
    one_line_exit_2("replay", &["-o", "-", "-o", "-"], "twice");
    // `run` validates outputs before touching the kernel.
    one_line_exit_2("run", &["-o", "gopher://x:70"], "unknown scheme");
}
