//! `--k8s-snapshot FILE`: the JSON `List` of `kubectl get pods,services,endpointslices,
//! namespaces,networkpolicies -A -o json`, one object, or YAML manifests (multi-document).
//!
//! Strict mode (startup) stops at the first bad object with a one-line error naming the file
//! and where the object is; tolerant mode (reload) skips bad objects and says why.
use std::{
    fs,
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use k8s_openapi::jiff::Timestamp;
use serde::Deserialize;
use serde_json::Value;

use super::cluster::{Cluster, Object};
use crate::enrich::model::{EndpointSlice, FieldError, Namespace, Pod, Service};
use crate::enrich::policy::CompiledPolicy;

const EXPECTED: &str = "`kubectl get pods,services,endpointslices,namespaces,networkpolicies \
     -A -o json` output or YAML manifests";
const KINDS: &str = "Pod, Service, EndpointSlice, Namespace, NetworkPolicy, Node or a List of them";

/// A snapshot file that cannot be used: `<file>: <where>: <what>`, on one line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {what}")]
pub struct SnapshotError {
    pub file: String,
    pub what: String,
}

/// An object left out by a tolerant load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// `items[3]`, `document 2`, `document 2, items[0]`; empty for a lone object.
    pub position: String,
    /// `Pod app/client` as far as the object says.
    pub object: Option<String>,
    pub reason: String,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts: Vec<&str> = Vec::new();
        if !self.position.is_empty() {
            parts.push(&self.position);
        }
        let obj = self.object.as_ref().map(|o| format!("({o})"));
        if let Some(o) = &obj {
            parts.push(o);
        }
        if parts.is_empty() {
            f.write_str(&self.reason)
        } else {
            write!(f, "{}: {}", parts.join(" "), self.reason)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The first bad object is an error.
    Strict,
    /// Bad objects are skipped and listed.
    Tolerant,
}

#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub objects: Vec<Object>,
    pub skipped: Vec<Skipped>,
}

impl Snapshot {
    pub fn read(path: &Path, mode: Mode) -> Result<Self, SnapshotError> {
        let text = read_text(path)?;
        Self::parse(&text, mode).map_err(|what| error(path, what))
    }

    /// Parse snapshot text; the error is the `<where>: <what>` part.
    pub fn parse(text: &str, mode: Mode) -> Result<Self, String> {
        let mut out = Snapshot::default();
        let trimmed = text.trim_start();
        if trimmed.is_empty() {
            return Err(format!("empty (expected {EXPECTED})"));
        }
        let docs = if trimmed.starts_with('{') || trimmed.starts_with('[') {
            match serde_json::from_str::<Value>(text) {
                Ok(doc) => {
                    out.document(doc, None, mode)?;
                    return Ok(out);
                }
                // YAML documents may start with a flow mapping too; if that fails as well,
                // the JSON error is the one that explains the file.
                Err(json) => yaml_documents(text)
                    .map_err(|_| one_line(&format!("not valid JSON: {json}")))?,
            }
        } else {
            yaml_documents(text)?
        };
        if docs.iter().all(Value::is_null) {
            return Err(format!(
                "no document in it, only comments or separators (expected {EXPECTED})"
            ));
        }
        for (i, doc) in docs.into_iter().enumerate() {
            out.document(doc, Some(i + 1), mode)?;
        }
        Ok(out)
    }

    /// Build a cluster from these objects, all seen at `now`.
    pub fn into_cluster(self, now: Timestamp, ip_history: Duration) -> Cluster {
        let mut cluster = Cluster::new(ip_history);
        // Objects were validated while parsing: nothing is left to fail.
        let _ = cluster.sync(&self.objects, now);
        cluster
    }

    fn document(&mut self, doc: Value, document: Option<usize>, mode: Mode) -> Result<(), String> {
        let at = |item: Option<usize>| match (document, item) {
            (None, None) => String::new(),
            (None, Some(i)) => format!("items[{i}]"),
            (Some(d), None) => format!("document {d}"),
            (Some(d), Some(i)) => format!("document {d}, items[{i}]"),
        };
        let (items, list_kind, list_api) = match doc {
            Value::Null => return Ok(()),
            Value::Array(items) => (items, None, None),
            Value::Object(mut m)
                if m.get("items").is_some_and(Value::is_array) && is_list(m.get("kind")) =>
            {
                let kind = m
                    .get("kind")
                    .and_then(Value::as_str)
                    .and_then(|k| k.strip_suffix("List"))
                    .filter(|k| !k.is_empty())
                    .map(str::to_string);
                let api = m
                    .get("apiVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let items = match m.remove("items") {
                    Some(Value::Array(items)) => items,
                    _ => Vec::new(),
                };
                (items, kind, api)
            }
            single => {
                return self.object(single, at(None), None, None, mode);
            }
        };
        for (i, item) in items.into_iter().enumerate() {
            self.object(
                item,
                at(Some(i)),
                list_kind.as_deref(),
                list_api.as_deref(),
                mode,
            )?;
        }
        Ok(())
    }

    fn object(
        &mut self,
        mut value: Value,
        position: String,
        list_kind: Option<&str>,
        list_api: Option<&str>,
        mode: Mode,
    ) -> Result<(), String> {
        // Items of a typed list (PodList) leave kind and apiVersion to the list.
        if let Value::Object(m) = &mut value {
            if let Some(k) = list_kind {
                m.entry("kind").or_insert_with(|| Value::String(k.into()));
            }
            if let Some(a) = list_api {
                m.entry("apiVersion")
                    .or_insert_with(|| Value::String(a.into()));
            }
        }
        let name = describe(&value);
        match convert(value) {
            Ok(o) => {
                self.objects.push(o);
                Ok(())
            }
            Err(reason) => {
                let skipped = Skipped {
                    position,
                    object: name,
                    reason: one_line(&reason),
                };
                match mode {
                    Mode::Strict => Err(skipped.to_string()),
                    Mode::Tolerant => {
                        self.skipped.push(skipped);
                        Ok(())
                    }
                }
            }
        }
    }
}

fn yaml_documents(text: &str) -> Result<Vec<Value>, String> {
    serde_yaml::Deserializer::from_str(text)
        .enumerate()
        .map(|(i, de)| {
            Value::deserialize(de)
                .map_err(|e| one_line(&format!("document {}: not valid YAML: {e}", i + 1)))
        })
        .collect()
}

fn is_list(kind: Option<&Value>) -> bool {
    kind.and_then(Value::as_str)
        .is_some_and(|k| k.ends_with("List"))
}

/// `Pod app/client`, from the raw value, for messages about objects that may not parse.
fn describe(value: &Value) -> Option<String> {
    let kind = value.get("kind").and_then(Value::as_str)?;
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let ns = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    Some(match (ns, name) {
        (Some(ns), Some(n)) => format!("{kind} {ns}/{n}"),
        (None, Some(n)) => format!("{kind} {n}"),
        _ => kind.to_string(),
    })
}

/// One object as the API serves it (`kind` and `apiVersion` set), typed and validated as a
/// snapshot's objects are; the error names the field. Tests and benches build their
/// clusters through it too.
impl TryFrom<Value> for Object {
    type Error = String;

    fn try_from(value: Value) -> Result<Self, String> {
        convert(value)
    }
}

fn convert(value: Value) -> Result<Object, String> {
    if !value.is_object() {
        return Err(format!(
            "expected an object ({KINDS}), found {}",
            json_type(&value)
        ));
    }
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .ok_or("no kind")?
        .to_string();
    let api = value
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let (want_api, object) = match kind.as_str() {
        "Pod" => ("v1", typed(value, |p| Object::Pod(Box::new(p)))),
        "Service" => ("v1", typed(value, |s| Object::Service(Box::new(s)))),
        "Namespace" => ("v1", typed(value, |n| Object::Namespace(Box::new(n)))),
        "Node" => ("v1", typed(value, |n| Object::Node(Box::new(n)))),
        "EndpointSlice" => (
            "discovery.k8s.io/v1",
            typed(value, |s| Object::EndpointSlice(Box::new(s))),
        ),
        "NetworkPolicy" => (
            "networking.k8s.io/v1",
            typed(value, |p| Object::NetworkPolicy(Box::new(p))),
        ),
        other => return Err(format!("unknown kind {other:?} (expected {KINDS})")),
    };
    if api != want_api {
        return Err(format!(
            "unsupported apiVersion {api:?} for {kind} (expected {want_api})"
        ));
    }
    let object = object?;
    validate(&object).map_err(|e| e.to_string())?;
    Ok(object)
}

fn typed<T: serde::de::DeserializeOwned>(
    value: Value,
    wrap: impl FnOnce(T) -> Object,
) -> Result<Object, String> {
    serde_path_to_error::deserialize::<_, T>(value)
        .map(wrap)
        .map_err(path_error)
}

/// `<json path>: <what>` of a typed deserialisation failure.
pub(crate) fn path_error<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> String {
    let path = e.path().to_string();
    if path == "." {
        e.inner().to_string()
    } else {
        format!("{path}: {}", e.inner())
    }
}

/// What [`Cluster::apply`] would reject, checked up front so errors carry a position.
fn validate(object: &Object) -> Result<(), FieldError> {
    match object {
        Object::Pod(p) => Pod::from_api(p).map(drop),
        Object::Service(s) => Service::from_api(s).map(drop),
        Object::EndpointSlice(s) => EndpointSlice::from_api(s).map(drop),
        Object::Namespace(n) => Namespace::from_api(n).map(drop),
        Object::NetworkPolicy(p) => CompiledPolicy::from_api(p).map(drop),
        Object::Node(_) => {
            // Node addresses are checked on apply; a scratch cluster is the cheapest check.
            Cluster::default().apply(object, Timestamp::UNIX_EPOCH)
        }
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn error(path: &Path, what: impl Into<String>) -> SnapshotError {
    SnapshotError {
        file: path.display().to_string(),
        what: what.into(),
    }
}

fn read_text(path: &Path) -> Result<String, SnapshotError> {
    let bytes = fs::read(path).map_err(|e| error(path, one_line(&e.to_string())))?;
    String::from_utf8(bytes).map_err(|_| error(path, "not UTF-8 text"))
}

/// What a reload did.
#[derive(Debug, Clone, Default)]
pub struct Reload {
    pub objects: usize,
    pub skipped: Vec<Skipped>,
}

/// `--watch-snapshot`: reloads the file into the cluster when it changes. The daemon calls
/// [`SnapshotWatcher::poll`] on its own schedule.
#[derive(Debug, Clone)]
pub struct SnapshotWatcher {
    path: PathBuf,
    /// mtime and size of the last file read: unchanged means no need to read it.
    stamp: Option<(SystemTime, u64)>,
    /// Content hash of the last file read: a touch without a change reloads nothing.
    digest: Option<u64>,
}

impl SnapshotWatcher {
    /// Strict first load (the startup path: any bad object is an error).
    pub fn start(
        path: &Path,
        now: Timestamp,
        ip_history: Duration,
    ) -> Result<(Self, Cluster), SnapshotError> {
        let stamp = stamp(path);
        // Parse on a thread of its own: glibc gives it another heap arena, so the megabytes of
        // text and API objects freed after the load do not leave the long-lived model
        // scattered over pages that can never be returned (10k pods: 84 MiB -> 33 MiB).
        let parsed = std::thread::scope(|scope| {
            scope
                .spawn(|| -> Result<(u64, Snapshot), SnapshotError> {
                    let text = read_text(path)?;
                    let snapshot =
                        Snapshot::parse(&text, Mode::Strict).map_err(|w| error(path, w))?;
                    Ok((digest(&text), snapshot))
                })
                .join()
        });
        let (digest, snapshot) = match parsed {
            Ok(r) => r?,
            Err(_) => return Err(error(path, "the parser thread failed")),
        };
        let watcher = Self {
            path: path.to_path_buf(),
            stamp,
            digest: Some(digest),
        };
        Ok((watcher, snapshot.into_cluster(now, ip_history)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reload into `cluster` if the file changed: Ok(None) when it did not. Bad objects are
    /// skipped (listed in the result); an unreadable or unparsable file leaves the cluster as
    /// it was and is an error.
    pub fn poll(
        &mut self,
        cluster: &mut Cluster,
        now: Timestamp,
    ) -> Result<Option<Reload>, SnapshotError> {
        let stamp = stamp(&self.path);
        if stamp.is_some() && stamp == self.stamp {
            return Ok(None);
        }
        let text = read_text(&self.path)?;
        let d = digest(&text);
        self.stamp = stamp;
        if self.digest == Some(d) {
            return Ok(None);
        }
        let snapshot = Snapshot::parse(&text, Mode::Tolerant).map_err(|w| error(&self.path, w))?;
        self.digest = Some(d);
        let mut skipped = snapshot.skipped;
        for (r, e) in cluster.sync(&snapshot.objects, now) {
            skipped.push(Skipped {
                position: String::new(),
                object: Some(r.to_string()),
                reason: e.to_string(),
            });
        }
        Ok(Some(Reload {
            objects: snapshot.objects.len(),
            skipped,
        }))
    }
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let m = fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

fn digest(text: &str) -> u64 {
    let mut h = DefaultHasher::new();
    text.hash(&mut h);
    h.finish()
}
