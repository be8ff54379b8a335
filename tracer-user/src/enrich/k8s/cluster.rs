//! The cluster as droptrace knows it: upserts and deletes of API objects (from a snapshot
//! file now, from kube-rs reflectors later) and the lookups event enrichment needs.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery, networking::v1 as networking},
    jiff::Timestamp,
};

use super::ip_history::IpHistory;
use crate::enrich::model::{
    self, EndpointSlice, FieldError, Labels, Namespace, ObjectKey, Pod, Protocol, Service,
    TargetPort,
};
use crate::enrich::policy::{CompiledPolicy, Direction, PodRef, PolicySet, Side, fix::Isolation};

/// How long addresses of deleted or replaced pods stay attributable.
pub const DEFAULT_IP_HISTORY: Duration = Duration::from_secs(600);

/// An API object the cluster model takes.
#[derive(Debug, Clone)]
pub enum Object {
    Pod(Box<core::Pod>),
    Service(Box<core::Service>),
    EndpointSlice(Box<discovery::EndpointSlice>),
    Namespace(Box<core::Namespace>),
    NetworkPolicy(Box<networking::NetworkPolicy>),
    Node(Box<core::Node>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ObjectKind {
    Pod,
    Service,
    EndpointSlice,
    Namespace,
    NetworkPolicy,
    Node,
}

impl ObjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ObjectKind::Pod => "Pod",
            ObjectKind::Service => "Service",
            ObjectKind::EndpointSlice => "EndpointSlice",
            ObjectKind::Namespace => "Namespace",
            ObjectKind::NetworkPolicy => "NetworkPolicy",
            ObjectKind::Node => "Node",
        }
    }

    /// Cluster-scoped kinds have no namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, ObjectKind::Namespace | ObjectKind::Node)
    }
}

/// Kind and name of an object; `namespace` is empty for cluster-scoped kinds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: ObjectKind,
    pub key: ObjectKey,
}

impl std::fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.kind.namespaced() {
            write!(f, "{} {}", self.kind.as_str(), self.key)
        } else {
            write!(f, "{} {}", self.kind.as_str(), self.key.name)
        }
    }
}

macro_rules! object_from {
    ($($variant:ident: $ty:ty),*) => {$(
        impl From<$ty> for Object {
            fn from(o: $ty) -> Self {
                Object::$variant(Box::new(o))
            }
        }
    )*};
}

// What a reflector store hands over becomes an Object with `.into()`.
object_from!(
    Pod: core::Pod,
    Service: core::Service,
    EndpointSlice: discovery::EndpointSlice,
    Namespace: core::Namespace,
    NetworkPolicy: networking::NetworkPolicy,
    Node: core::Node
);

impl Object {
    pub fn kind(&self) -> ObjectKind {
        match self {
            Object::Pod(_) => ObjectKind::Pod,
            Object::Service(_) => ObjectKind::Service,
            Object::EndpointSlice(_) => ObjectKind::EndpointSlice,
            Object::Namespace(_) => ObjectKind::Namespace,
            Object::NetworkPolicy(_) => ObjectKind::NetworkPolicy,
            Object::Node(_) => ObjectKind::Node,
        }
    }

    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Namespace(o) => &o.metadata,
            Object::NetworkPolicy(o) => &o.metadata,
            Object::Node(o) => &o.metadata,
        }
    }

    /// Kind, namespace and name as far as the object says (for messages and deletes).
    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::from_meta(self.kind(), self.meta())
    }
}

impl ObjectRef {
    /// The reference of a `kind` object with this metadata (the namespace defaults to
    /// `default` for namespaced kinds, as kubectl does).
    pub fn from_meta(
        kind: ObjectKind,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Self {
        let namespace = if kind.namespaced() {
            meta.namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| "default".into())
        } else {
            String::new()
        };
        ObjectRef {
            kind,
            key: ObjectKey::new(namespace, meta.name.clone().unwrap_or_default()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Cluster {
    namespaces: HashMap<String, Namespace>,
    /// Namespaces known from a Namespace object (others exist because pods name them).
    explicit_namespaces: BTreeSet<String>,
    /// namespace -> name -> pod, so namespace-scoped scans stay cheap.
    pods: HashMap<String, BTreeMap<String, Arc<Pod>>>,
    pods_by_uid: HashMap<String, ObjectKey>,
    /// Ordered by namespace, for namespace-scoped scans.
    services: BTreeMap<ObjectKey, Service>,
    service_by_ip: HashMap<IpAddr, ObjectKey>,
    slices: BTreeMap<ObjectKey, EndpointSlice>,
    /// Address -> slices listing it.
    slices_by_ip: HashMap<IpAddr, BTreeSet<ObjectKey>>,
    policies: PolicySet,
    ips: IpHistory,
    node_ips: BTreeMap<String, Vec<IpAddr>>,
    node_by_ip: HashMap<IpAddr, String>,
    /// Nodes known from Node objects (a reload deletes those no longer listed).
    node_objects: BTreeSet<String>,
}

impl Default for Cluster {
    fn default() -> Self {
        Self::new(DEFAULT_IP_HISTORY)
    }
}

impl Cluster {
    /// An empty cluster keeping addresses of gone pods for `ip_history`.
    pub fn new(ip_history: Duration) -> Self {
        Self {
            namespaces: HashMap::new(),
            explicit_namespaces: BTreeSet::new(),
            pods: HashMap::new(),
            pods_by_uid: HashMap::new(),
            services: BTreeMap::new(),
            service_by_ip: HashMap::new(),
            slices: BTreeMap::new(),
            slices_by_ip: HashMap::new(),
            policies: PolicySet::default(),
            ips: IpHistory::new(ip_history),
            node_ips: BTreeMap::new(),
            node_by_ip: HashMap::new(),
            node_objects: BTreeSet::new(),
        }
    }

    /// Upsert an object seen at `now`. On error the cluster is unchanged.
    pub fn apply(&mut self, object: &Object, now: Timestamp) -> Result<(), FieldError> {
        match object {
            Object::Pod(p) => self.apply_pod(Pod::from_api(p)?, now),
            Object::Service(s) => self.apply_service(Service::from_api(s)?),
            Object::EndpointSlice(s) => self.apply_slice(EndpointSlice::from_api(s)?),
            Object::Namespace(n) => {
                let ns = Namespace::from_api(n)?;
                self.explicit_namespaces.insert(ns.name.clone());
                self.namespaces.insert(ns.name.clone(), ns);
            }
            Object::NetworkPolicy(p) => {
                let policy = CompiledPolicy::from_api(p)?;
                self.namespaces
                    .entry(policy.namespace.clone())
                    .or_insert_with(|| Namespace::implicit(&policy.namespace));
                self.policies.insert(policy);
            }
            Object::Node(n) => {
                let (name, ips) = node_addresses(n)?;
                self.node_objects.insert(name.clone());
                self.add_node_ips(&name, &ips);
            }
        }
        Ok(())
    }

    /// Remove an object, as of `at` (pods' addresses stay attributable for the history).
    pub fn delete(&mut self, object: &ObjectRef, at: Timestamp) {
        let key = &object.key;
        match object.kind {
            ObjectKind::Pod => {
                let removed = self
                    .pods
                    .get_mut(&key.namespace)
                    .and_then(|m| m.remove(&key.name));
                if let Some(uid) = removed.as_ref().and_then(|p| p.uid.as_ref()) {
                    self.pods_by_uid.remove(uid);
                }
                if self
                    .pods
                    .get(&key.namespace)
                    .is_some_and(BTreeMap::is_empty)
                {
                    self.pods.remove(&key.namespace);
                }
                self.ips.release(key, at);
            }
            ObjectKind::Service => {
                if let Some(old) = self.services.remove(key) {
                    for ip in &old.cluster_ips {
                        self.service_by_ip.remove(ip);
                    }
                }
            }
            ObjectKind::EndpointSlice => self.remove_slice(key),
            ObjectKind::Namespace => {
                // Pods may still name it: fall back to the automatic label only.
                self.explicit_namespaces.remove(&key.name);
                self.namespaces
                    .insert(key.name.clone(), Namespace::implicit(&key.name));
            }
            ObjectKind::NetworkPolicy => {
                self.policies.remove(key);
            }
            ObjectKind::Node => {
                self.node_objects.remove(&key.name);
                if let Some(ips) = self.node_ips.remove(&key.name) {
                    for ip in ips {
                        self.node_by_ip.remove(&ip);
                    }
                }
            }
        }
    }

    /// Make the cluster hold exactly `objects` (a reloaded snapshot): upsert each, then delete
    /// what is no longer there as of `now`. Objects that fail to apply are returned, not fatal.
    pub fn sync(&mut self, objects: &[Object], now: Timestamp) -> Vec<(ObjectRef, FieldError)> {
        let mut failed = Vec::new();
        let mut seen = BTreeSet::new();
        for o in objects {
            let r = o.object_ref();
            match self.apply(o, now) {
                Ok(()) => {
                    seen.insert(r);
                }
                Err(e) => failed.push((r, e)),
            }
        }
        let mut present: Vec<ObjectRef> = Vec::new();
        let nr = |kind, key: ObjectKey| ObjectRef { kind, key };
        for (ns, pods) in &self.pods {
            present.extend(
                pods.keys()
                    .map(|n| nr(ObjectKind::Pod, ObjectKey::new(ns, n))),
            );
        }
        present.extend(
            self.services
                .keys()
                .map(|k| nr(ObjectKind::Service, k.clone())),
        );
        present.extend(
            self.slices
                .keys()
                .map(|k| nr(ObjectKind::EndpointSlice, k.clone())),
        );
        present.extend(
            self.policies
                .keys()
                .into_iter()
                .map(|k| nr(ObjectKind::NetworkPolicy, k)),
        );
        present.extend(
            self.explicit_namespaces
                .iter()
                .map(|n| nr(ObjectKind::Namespace, ObjectKey::new("", n))),
        );
        present.extend(
            self.node_objects
                .iter()
                .map(|n| nr(ObjectKind::Node, ObjectKey::new("", n))),
        );
        for r in present.into_iter().filter(|r| !seen.contains(r)) {
            self.delete(&r, now);
        }
        failed
    }

    fn apply_pod(&mut self, pod: Pod, now: Timestamp) {
        let pod = Arc::new(pod);
        if let Some(node) = &pod.node {
            let mut ips = pod.host_ips.clone();
            if pod.host_network {
                ips.extend(pod.ips.iter().copied());
            }
            self.add_node_ips(node, &ips);
        }
        self.namespaces
            .entry(pod.namespace.clone())
            .or_insert_with(|| Namespace::implicit(&pod.namespace));
        let old = self
            .pods
            .entry(pod.namespace.clone())
            .or_default()
            .insert(pod.name.clone(), Arc::clone(&pod));
        if let Some(uid) = old.as_ref().and_then(|p| p.uid.as_ref())
            && pod.uid.as_ref() != Some(uid)
        {
            self.pods_by_uid.remove(uid);
        }
        if let Some(uid) = &pod.uid {
            self.pods_by_uid.insert(uid.clone(), pod.key());
        }
        self.ips.hold(&pod, now);
    }

    fn apply_service(&mut self, svc: Service) {
        let key = svc.key();
        if let Some(old) = self.services.remove(&key) {
            for ip in &old.cluster_ips {
                self.service_by_ip.remove(ip);
            }
        }
        for ip in &svc.cluster_ips {
            self.service_by_ip.insert(*ip, key.clone());
        }
        self.services.insert(key, svc);
    }

    fn apply_slice(&mut self, slice: EndpointSlice) {
        let key = slice.key();
        self.remove_slice(&key);
        for ip in slice.endpoints.iter().flat_map(|e| &e.addresses) {
            self.slices_by_ip
                .entry(*ip)
                .or_default()
                .insert(key.clone());
        }
        self.slices.insert(key, slice);
    }

    fn remove_slice(&mut self, key: &ObjectKey) {
        let Some(old) = self.slices.remove(key) else {
            return;
        };
        for ip in old.endpoints.iter().flat_map(|e| &e.addresses) {
            if let Some(set) = self.slices_by_ip.get_mut(ip) {
                set.remove(key);
                if set.is_empty() {
                    self.slices_by_ip.remove(ip);
                }
            }
        }
    }

    /// Addresses of a node (from an operator-provided list, say; kept across reloads):
    /// node-local traffic is always allowed and node addresses are never pods.
    pub fn add_node_ips(&mut self, node: &str, ips: &[IpAddr]) {
        let list = self.node_ips.entry(node.to_string()).or_default();
        for ip in ips {
            let ip = ip.to_canonical();
            if !list.contains(&ip) {
                list.push(ip);
            }
            self.node_by_ip.insert(ip, node.to_string());
        }
    }

    pub fn policies(&self) -> &PolicySet {
        &self.policies
    }

    pub fn pod(&self, key: &ObjectKey) -> Option<&Arc<Pod>> {
        self.pods.get(&key.namespace)?.get(&key.name)
    }

    pub fn pod_by_uid(&self, uid: &str) -> Option<&Arc<Pod>> {
        self.pod(self.pods_by_uid.get(uid)?)
    }

    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = &Arc<Pod>> {
        self.pods
            .get(namespace)
            .into_iter()
            .flat_map(|m| m.values())
    }

    /// The namespaces that have pods.
    pub fn pod_namespaces(&self) -> impl Iterator<Item = &str> {
        self.pods.keys().map(String::as_str)
    }

    pub fn pod_count(&self) -> usize {
        self.pods.values().map(BTreeMap::len).sum()
    }

    /// The pod that had `ip` at `at` (None: now), deleted ones included within the history.
    pub fn pod_at(&self, ip: IpAddr, at: Option<Timestamp>) -> Option<&Arc<Pod>> {
        self.ips.lookup(ip, at)
    }

    pub fn node_of_ip(&self, ip: IpAddr) -> Option<&str> {
        self.node_by_ip.get(&ip.to_canonical()).map(String::as_str)
    }

    pub fn node_ips(&self, node: &str) -> &[IpAddr] {
        self.node_ips
            .get(node)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    pub fn namespace_labels(&self, namespace: &str) -> Option<&Labels> {
        self.namespaces.get(namespace).map(|n| &n.labels)
    }

    pub fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services.get(key)
    }

    pub fn service_at_ip(&self, ip: IpAddr) -> Option<&Service> {
        self.services
            .get(self.service_by_ip.get(&ip.to_canonical())?)
    }

    /// What EndpointSlices say about an address: the pod (targetRef) and the Service behind
    /// it, for addresses whose Pod object we do not have.
    pub fn slice_target(&self, ip: IpAddr) -> Option<(Option<ObjectKey>, Option<ObjectKey>)> {
        let ip = ip.to_canonical();
        let key = self.slices_by_ip.get(&ip)?.iter().next()?;
        let slice = self.slices.get(key)?;
        let pod = slice
            .endpoints
            .iter()
            .find(|e| e.addresses.contains(&ip))
            .and_then(|e| e.pod.clone());
        let service = slice
            .service
            .as_ref()
            .map(|s| ObjectKey::new(&slice.namespace, s));
        Some((pod, service))
    }

    /// Services fronting `pod`: through EndpointSlices listing it, or selectors matching it.
    pub fn services_of(&self, pod: &Pod) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        for ip in &pod.ips {
            for key in self.slices_by_ip.get(ip).into_iter().flatten() {
                let Some(slice) = self.slices.get(key) else {
                    continue;
                };
                let targets_pod = slice.endpoints.iter().any(|e| {
                    e.addresses.contains(ip)
                        && e.pod
                            .as_ref()
                            .is_none_or(|p| p.name == pod.name && p.namespace == pod.namespace)
                });
                if let (true, Some(svc)) = (targets_pod, &slice.service) {
                    out.insert(svc.clone());
                }
            }
        }
        for svc in in_namespace(&self.services, &pod.namespace) {
            if svc
                .selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
            {
                out.insert(svc.name.clone());
            }
        }
        out
    }

    /// The pods behind `svc` for a connection to its `port`/`protocol`, each with the port the
    /// connection reaches on the pod (targetPort, named ones resolved per pod).
    pub fn backends(&self, svc: &Service, port: u16, protocol: Protocol) -> Vec<(Arc<Pod>, u16)> {
        let Some(sp) = svc
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == protocol)
        else {
            return Vec::new();
        };
        let mut pods: BTreeMap<ObjectKey, Arc<Pod>> = BTreeMap::new();
        for slice in in_namespace(&self.slices, &svc.namespace) {
            if slice.service.as_deref() != Some(svc.name.as_str()) {
                continue;
            }
            for e in &slice.endpoints {
                let pod = match &e.pod {
                    Some(k) => self.pod(k),
                    None => e.addresses.first().and_then(|ip| self.pod_at(*ip, None)),
                };
                if let Some(p) = pod {
                    pods.insert(p.key(), Arc::clone(p));
                }
            }
        }
        if let Some(sel) = &svc.selector {
            for p in self.pods_in(&svc.namespace) {
                if sel.iter().all(|(k, v)| p.labels.get(k) == Some(v)) {
                    pods.insert(p.key(), Arc::clone(p));
                }
            }
        }
        pods.into_values()
            .filter_map(|p| {
                let target = match &sp.target {
                    TargetPort::Number(n) => Some(*n),
                    TargetPort::Name(name) => p
                        .ports
                        .iter()
                        .find(|cp| {
                            cp.name.as_deref() == Some(name.as_str()) && cp.protocol == protocol
                        })
                        .map(|cp| cp.port),
                };
                target.map(|t| (p, t))
            })
            .collect()
    }

    /// The evaluator's view of `ip` at `at`: a selectable pod, a node, or just an address.
    pub fn side(&self, ip: IpAddr, at: Option<Timestamp>) -> Side<'_> {
        let ip = ip.to_canonical();
        let node = self.node_of_ip(ip);
        match self.pod_at(ip, at) {
            Some(pod) if node.is_none() => Side {
                ip,
                pod: Some(self.pod_ref(pod)),
                node: None,
            },
            _ => Side {
                ip,
                pod: None,
                node,
            },
        }
    }

    /// `pod` as policies see it (hostNetwork pods are never selected: use [`Cluster::side`]).
    pub fn pod_ref<'a>(&'a self, pod: &'a Pod) -> PodRef<'a> {
        PodRef {
            pod,
            namespace_labels: self
                .namespace_labels(&pod.namespace)
                .unwrap_or(&EMPTY_LABELS),
            node_ips: match &pod.node {
                Some(n) if self.node_ips.contains_key(n) => self.node_ips(n),
                _ => &pod.host_ips,
            },
        }
    }
}

static EMPTY_LABELS: Labels = Labels::new();

fn in_namespace<'a, T>(
    map: &'a BTreeMap<ObjectKey, T>,
    namespace: &'a str,
) -> impl Iterator<Item = &'a T> {
    map.range(ObjectKey::new(namespace, "")..)
        .take_while(move |(k, _)| k.namespace == namespace)
        .map(|(_, v)| v)
}

impl Isolation for Cluster {
    fn newly_isolated(&self, direction: Direction, namespace: &str, selector: &Labels) -> usize {
        self.pods_in(namespace)
            .filter(|p| !p.host_network && selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
            .filter(|p| !self.policies.isolates(namespace, &p.labels, direction))
            .count()
    }
}

fn node_addresses(node: &core::Node) -> Result<(String, Vec<IpAddr>), FieldError> {
    let name = model::name(&node.metadata)?;
    let mut ips = Vec::new();
    for (i, a) in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_deref())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
            let ip = model::parse_ip(&a.address).ok_or_else(|| {
                FieldError::new(
                    format!("status.addresses[{i}].address"),
                    format!("{:?} is not an IP address", a.address),
                )
            })?;
            ips.push(ip);
        }
    }
    Ok((name, ips))
}
