//! A fake Kubernetes API server on 127.0.0.1 that speaks the real list and watch wire format,
//! scripted by the test: hand-written HTTP/1.1, lists as one JSON body with Content-Length,
//! watches as chunked newline-delimited `{"type": ..., "object": ...}` events, errors as
//! `Status` objects. Every request is recorded (method, path, query, Authorization, body).
//! Writes: POST creates an object in a collection (201, 409 if the name is taken), PATCH
//! applies a JSON merge patch to one (200, 404 if there is none); `objects` lists them.
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

pub(crate) const PODS: &str = "/api/v1/pods";
pub(crate) const NAMESPACES: &str = "/api/v1/namespaces";
pub(crate) const SERVICES: &str = "/api/v1/services";
pub(crate) const NODES: &str = "/api/v1/nodes";
pub(crate) const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub(crate) const POLICIES: &str = "/apis/networking.k8s.io/v1/networkpolicies";

/// Collection path, object kind, apiVersion.
pub(crate) const RESOURCES: [(&str, &str, &str); 6] = [
    (PODS, "Pod", "v1"),
    (NAMESPACES, "Namespace", "v1"),
    (SERVICES, "Service", "v1"),
    (NODES, "Node", "v1"),
    (SLICES, "EndpointSlice", "discovery.k8s.io/v1"),
    (POLICIES, "NetworkPolicy", "networking.k8s.io/v1"),
];

/// The collection of an object kind.
pub(crate) fn path_of(kind: &str) -> Option<&'static str> {
    RESOURCES.iter().find(|r| r.1 == kind).map(|r| r.0)
}

#[derive(Debug, Clone)]
pub(crate) struct Request {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// A JSON request body (POST, PATCH).
    pub body: Option<Value>,
}

impl Request {
    pub(crate) fn is_watch(&self) -> bool {
        matches!(self.q("watch"), Some("true" | "1"))
    }

    pub(crate) fn q(&self, key: &str) -> Option<&str> {
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
    /// Objects written by POST, by their path (`collection/name`).
    objects: BTreeMap<String, Value>,
    /// The next writes are answered with these statuses.
    write_errors: VecDeque<u16>,
    next_rv: u64,
}

pub(crate) struct FakeApi {
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
    pub(crate) async fn start() -> Self {
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

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the next list of `path` returns. Items lose kind and apiVersion, as in real
    /// lists (the list carries them).
    pub(crate) fn set_list(&self, path: &str, resource_version: &str, items: Vec<Value>) {
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
    pub(crate) fn fail_lists(&self, path: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .list_errors
            .insert(path.into(), code);
    }

    /// The next watch request on `path` is answered with this HTTP status.
    pub(crate) fn fail_next_watch(&self, path: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .watch_errors
            .entry(path.into())
            .or_default()
            .push_back(code);
    }

    /// One event on the open watch of `path`.
    pub(crate) fn send(&self, path: &str, kind: &str, object: Value) {
        self.send_raw(path, &json!({"type": kind, "object": object}).to_string());
    }

    /// One line as is on the open watch of `path`.
    pub(crate) fn send_raw(&self, path: &str, line: &str) {
        let st = self.state.lock().unwrap();
        let tx = st.watches.get(path).expect("a watch is open");
        tx.send(Line::Event(line.to_string())).expect("watch open");
    }

    /// The server ends the open watch of `path` (the last chunk, as on a timeout).
    pub(crate) fn end_watch(&self, path: &str) {
        if let Some(tx) = self.state.lock().unwrap().watches.remove(path) {
            let _ = tx.send(Line::End);
        }
    }

    /// The next POST/PATCH requests are answered with these statuses instead.
    pub(crate) fn fail_next_writes(&self, codes: &[u16]) {
        self.state
            .lock()
            .unwrap()
            .write_errors
            .extend(codes.iter().copied());
    }

    /// Objects written under `prefix` (a collection path), in path order.
    pub(crate) fn objects(&self, prefix: &str) -> Vec<Value> {
        let st = self.state.lock().unwrap();
        st.objects
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Every POST and PATCH under `prefix`, in arrival order.
    pub(crate) fn writes(&self, prefix: &str) -> Vec<Request> {
        let st = self.state.lock().unwrap();
        st.requests
            .iter()
            .filter(|r| r.method != "GET" && r.path.starts_with(prefix))
            .cloned()
            .collect()
    }

    pub(crate) fn requests(&self, path: &str) -> Vec<Request> {
        let st = self.state.lock().unwrap();
        st.requests
            .iter()
            .filter(|r| r.path == path)
            .cloned()
            .collect()
    }

    pub(crate) fn lists(&self, path: &str) -> usize {
        self.requests(path).iter().filter(|r| !r.is_watch()).count()
    }

    /// The `n`th watch request (1-based) on `path`, waiting for it (once it is recorded its
    /// stream is open: events sent now reach it).
    pub(crate) async fn watch_request(&self, path: &str, n: usize) -> Request {
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
    pub(crate) fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
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
pub(crate) fn status(code: u16, resource_version: &str) -> Value {
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
        409 => ("AlreadyExists", "the object already exists".into()),
        400 => ("BadRequest", "no body".into()),
        _ => ("InternalError", "boom".into()),
    };
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// A POST or PATCH: the reply, and the stored object changed.
fn write(st: &mut State, req: &Request) -> Reply {
    if let Some(code) = st.write_errors.pop_front() {
        return Reply::Body(code, status(code, ""));
    }
    let Some(body) = req.body.clone() else {
        return Reply::Body(400, status(400, ""));
    };
    st.next_rv += 1;
    let rv = (1000 + st.next_rv).to_string();
    match req.method.as_str() {
        "POST" => {
            let name = body["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let key = format!("{}/{name}", req.path);
            if name.is_empty() || st.objects.contains_key(&key) {
                return Reply::Body(409, status(409, ""));
            }
            let mut obj = body;
            obj["metadata"]["resourceVersion"] = rv.into();
            obj["metadata"]["uid"] = format!("uid-{name}").into();
            st.objects.insert(key, obj.clone());
            Reply::Body(201, obj)
        }
        "PATCH" => match st.objects.get_mut(&req.path) {
            Some(obj) => {
                merge_patch(obj, &body);
                obj["metadata"]["resourceVersion"] = rv.into();
                Reply::Body(200, obj.clone())
            }
            None => Reply::Body(404, status(404, "")),
        },
        _ => Reply::Body(405, status(500, "")),
    }
}

async fn serve(mut sock: TcpStream, state: Arc<Mutex<State>>) {
    let mut head = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
        // A TLS ClientHello (record type 0x16) is no HTTP: hang up.
        if head.len() > 65536 || head.first() == Some(&0x16) {
            return;
        }
    };
    let mut body = head.split_off(end);
    let head = String::from_utf8_lossy(&head).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or("GET").to_string();
    let target = request_line.next().unwrap_or("/").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let length: usize = header("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    while body.len() < length {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => body.extend_from_slice(&chunk[..n]),
        }
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let req = Request {
        method,
        path: path.to_string(),
        query: query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        authorization: header("authorization"),
        content_type: header("content-type"),
        body: serde_json::from_slice(&body).ok(),
    };
    let reply = {
        let mut st = state.lock().unwrap();
        st.requests.push(req.clone());
        let rv = req.q("resourceVersion").unwrap_or("").to_string();
        if req.method != "GET" {
            write(&mut st, &req)
        } else if req.is_watch() {
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
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        409 => "Conflict",
        404 => "Not Found",
        410 => "Gone",
        _ => "Internal Server Error",
    }
}
