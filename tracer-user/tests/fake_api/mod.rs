//! A fake Kubernetes API server on 127.0.0.1 that speaks the real list and watch wire format,
//! scripted by the test: hand-written HTTP/1.1, lists as one JSON body with Content-Length,
//! watches as chunked newline-delimited `{"type": ..., "object": ...}` events, errors as
//! `Status` objects. Every request is recorded (path, query, Authorization).
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};

pub const PODS: &str = "/api/v1/pods";
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const SERVICES: &str = "/api/v1/services";
pub const NODES: &str = "/api/v1/nodes";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

/// Collection path, object kind, apiVersion.
pub const RESOURCES: [(&str, &str, &str); 6] = [
    (PODS, "Pod", "v1"),
    (NAMESPACES, "Namespace", "v1"),
    (SERVICES, "Service", "v1"),
    (NODES, "Node", "v1"),
    (SLICES, "EndpointSlice", "discovery.k8s.io/v1"),
    (POLICIES, "NetworkPolicy", "networking.k8s.io/v1"),
];

/// The collection of an object kind.
pub fn path_of(kind: &str) -> Option<&'static str> {
    RESOURCES.iter().find(|r| r.1 == kind).map(|r| r.0)
}

#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
}

impl Request {
    pub fn is_watch(&self) -> bool {
        matches!(self.q("watch"), Some("true" | "1"))
    }

    pub fn q(&self, key: &str) -> Option<&str> {
        self.query.get(key).map(String::as_str)
    }
}

enum Line {
    Event(String),
    End,
}

enum Reply {
    Body(u16, Value),
    Watch(mpsc::UnboundedReceiver<Line>),
}

#[derive(Default)]
struct State {
    lists: HashMap<String, Value>,
    list_errors: HashMap<String, u16>,
    watch_errors: HashMap<String, VecDeque<u16>>,
    /// The open watch stream of each collection (the latest request's).
    watches: HashMap<String, mpsc::UnboundedSender<Line>>,
    requests: Vec<Request>,
}

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    /// Every collection starts empty at resourceVersion 1.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let api = {
            let s = Arc::clone(&state);
            let task = tokio::spawn(async move {
                while let Ok((sock, _)) = listener.accept().await {
                    tokio::spawn(serve(sock, Arc::clone(&s)));
                }
            });
            Self { addr, state, task }
        };
        for (path, _, _) in RESOURCES {
            api.set_list(path, "1", Vec::new());
        }
        api
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the next list of `path` returns. Items lose kind and apiVersion, as in real
    /// lists (the list carries them).
    pub fn set_list(&self, path: &str, resource_version: &str, items: Vec<Value>) {
        let (_, kind, api_version) = RESOURCES.iter().find(|r| r.0 == path).unwrap();
        let items: Vec<Value> = items
            .into_iter()
            .map(|mut i| {
                if let Some(m) = i.as_object_mut() {
                    m.remove("kind");
                    m.remove("apiVersion");
                }
                i
            })
            .collect();
        let list = json!({
            "kind": format!("{kind}List"),
            "apiVersion": api_version,
            "metadata": {"resourceVersion": resource_version},
            "items": items,
        });
        self.state.lock().unwrap().lists.insert(path.into(), list);
    }

    /// Lists of `path` answer with this HTTP status from now on.
    pub fn fail_lists(&self, path: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .list_errors
            .insert(path.into(), code);
    }

    /// The next watch request on `path` is answered with this HTTP status.
    pub fn fail_next_watch(&self, path: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .watch_errors
            .entry(path.into())
            .or_default()
            .push_back(code);
    }

    /// One event on the open watch of `path`.
    pub fn send(&self, path: &str, kind: &str, object: Value) {
        self.send_raw(path, &json!({"type": kind, "object": object}).to_string());
    }

    /// One line as is on the open watch of `path`.
    pub fn send_raw(&self, path: &str, line: &str) {
        let st = self.state.lock().unwrap();
        let tx = st.watches.get(path).expect("a watch is open");
        tx.send(Line::Event(line.to_string())).expect("watch open");
    }

    /// The server ends the open watch of `path` (the last chunk, as on a timeout).
    pub fn end_watch(&self, path: &str) {
        if let Some(tx) = self.state.lock().unwrap().watches.remove(path) {
            let _ = tx.send(Line::End);
        }
    }

    pub fn requests(&self, path: &str) -> Vec<Request> {
        let st = self.state.lock().unwrap();
        st.requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub fn lists(&self, path: &str) -> usize {
        self.requests(path).iter().filter(|r| !r.is_watch()).count()
    }

    /// The `n`th watch request (1-based) on `path`, waiting for it (once it is recorded its
    /// stream is open: events sent now reach it).
    pub async fn watch_request(&self, path: &str, n: usize) -> Request {
        for _ in 0..2000 {
            if let Some(r) = self
                .requests(path)
                .into_iter()
                .filter(Request::is_watch)
                .nth(n - 1)
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("no watch request #{n} on {path}");
    }

    /// A kubeconfig naming this server (plain http, a bearer token).
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("kubeconfig-{}", self.addr.port()));
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {}
    insecure-skip-tls-verify: true
contexts:
- name: fake
  context:
    cluster: fake
    user: tester
    namespace: app
current-context: fake
users:
- name: tester
  user:
    token: test-token
",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// A `Status` as the API server sends it for an HTTP error or an ERROR watch event.
pub fn status(code: u16, resource_version: &str) -> Value {
    let (reason, message) = match code {
        410 => (
            "Expired",
            format!("too old resource version: {resource_version} (999)"),
        ),
        403 => (
            "Forbidden",
            "nodes is forbidden: User \"system:serviceaccount:droptrace:droptrace\" cannot list \
             resource \"nodes\" in API group \"\" at the cluster scope"
                .to_string(),
        ),
        404 => (
            "NotFound",
            "the server could not find the requested resource".into(),
        ),
        _ => ("InternalError", "boom".into()),
    };
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        // A TLS ClientHello (record type 0x16) is no HTTP: hang up.
        if head.len() > 65536 || head.first() == Some(&0x16) {
            return;
        }
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let target = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .unwrap_or("/")
        .to_string();
    let authorization = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v.trim().to_string());
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let req = Request {
        path: path.to_string(),
        query: query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        authorization,
    };
    let reply = {
        let mut st = state.lock().unwrap();
        st.requests.push(req.clone());
        let rv = req.q("resourceVersion").unwrap_or("").to_string();
        if req.is_watch() {
            match st
                .watch_errors
                .get_mut(&req.path)
                .and_then(VecDeque::pop_front)
            {
                Some(code) => Reply::Body(code, status(code, &rv)),
                None => {
                    let (tx, rx) = mpsc::unbounded_channel();
                    st.watches.insert(req.path.clone(), tx);
                    Reply::Watch(rx)
                }
            }
        } else if let Some(code) = st.list_errors.get(&req.path) {
            Reply::Body(*code, status(*code, &rv))
        } else {
            match st.lists.get(&req.path) {
                Some(list) => Reply::Body(200, list.clone()),
                None => Reply::Body(404, status(404, &rv)),
            }
        }
    };
    match reply {
        Reply::Body(code, body) => {
            let body = body.to_string();
            let text = format!(
                "HTTP/1.1 {code} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                reason_phrase(code),
                body.len()
            );
            let _ = sock.write_all(text.as_bytes()).await;
        }
        Reply::Watch(mut rx) => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                        Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n";
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            while let Some(Line::Event(line)) = rx.recv().await {
                let data = format!("{line}\n");
                let frame = format!("{:x}\r\n{data}\r\n", data.len());
                if sock.write_all(frame.as_bytes()).await.is_err() {
                    return;
                }
            }
            let _ = sock.write_all(b"0\r\n\r\n").await;
        }
    }
    let _ = sock.shutdown().await;
}

fn reason_phrase(code: u16) -> &'static str {
    match code {
        200 => "OK",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        _ => "Internal Server Error",
    }
}
