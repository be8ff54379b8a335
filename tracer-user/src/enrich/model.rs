//! The parts of Kubernetes objects droptrace needs, converted once from the k8s-openapi types
//! (what both the snapshot loader and a kube-rs reflector hand over).
use std::{collections::BTreeMap, fmt, net::IpAddr, str::FromStr};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
    jiff::Timestamp,
};

use crate::event::Workload;

pub type Labels = BTreeMap<String, String>;

/// Every namespace carries this immutable label (since Kubernetes 1.21).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Label EndpointSlices carry to name their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The wall clock as a Kubernetes timestamp (k8s-openapi's jiff is built without `std`).
pub fn now() -> Timestamp {
    let ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    Timestamp::from_nanosecond(ns).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// `namespace/name` of a namespaced object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// `NAMESPACE/NAME` as people type it; None unless both parts are there.
    pub fn parse(spec: &str) -> Option<Self> {
        spec.split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .map(|(ns, name)| Self::new(ns, name))
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Protocol {
    #[default]
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// The API's spelling (case-sensitive, as the API server validates it); absent means TCP.
    pub fn from_api(value: Option<&str>) -> Result<Self, String> {
        match value {
            None | Some("TCP") => Ok(Protocol::Tcp),
            Some("UDP") => Ok(Protocol::Udp),
            Some("SCTP") => Ok(Protocol::Sctp),
            Some(other) => Err(format!("unsupported protocol {other:?} (TCP, UDP or SCTP)")),
        }
    }
}

impl FromStr for Protocol {
    type Err = String;

    /// Lenient spelling for people typing it: tcp, TCP, Udp, ...
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Protocol::from_api(Some(s.to_ascii_uppercase().as_str()))
            .map_err(|_| format!("unsupported protocol {s:?} (TCP, UDP or SCTP)"))
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an object could not be taken into the model; `field` is a JSON path inside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {what}")]
pub struct FieldError {
    pub field: String,
    pub what: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, what: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            what: what.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub labels: Labels,
    /// status.podIPs (or status.podIP); for hostNetwork pods these are node addresses.
    pub ips: Vec<IpAddr>,
    pub node: Option<String>,
    /// status.hostIPs (or status.hostIP): the addresses of the pod's node.
    pub host_ips: Vec<IpAddr>,
    pub host_network: bool,
    pub ports: Vec<ContainerPort>,
    pub workload: Option<Workload>,
    pub phase: Option<String>,
    pub created: Option<Timestamp>,
    /// metadata.deletionTimestamp: the pod is terminating.
    pub deleting: Option<Timestamp>,
}

impl Pod {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    pub fn from_api(pod: &core::Pod) -> Result<Self, FieldError> {
        let (namespace, name) = names(&pod.metadata)?;
        let spec = pod.spec.as_ref();
        let status = pod.status.as_ref();
        let mut ips = Vec::new();
        if let Some(list) = status.and_then(|s| s.pod_ips.as_ref()) {
            for (i, p) in list.iter().enumerate() {
                push_ip(&mut ips, &p.ip, &format!("status.podIPs[{i}].ip"))?;
            }
        }
        if let Some(ip) = status.and_then(|s| s.pod_ip.as_ref()) {
            push_ip(&mut ips, ip, "status.podIP")?;
        }
        let mut host_ips = Vec::new();
        if let Some(list) = status.and_then(|s| s.host_ips.as_ref()) {
            for (i, p) in list.iter().enumerate() {
                push_ip(&mut host_ips, &p.ip, &format!("status.hostIPs[{i}].ip"))?;
            }
        }
        if let Some(ip) = status.and_then(|s| s.host_ip.as_ref()) {
            push_ip(&mut host_ips, ip, "status.hostIP")?;
        }
        let mut ports = Vec::new();
        for (ci, c) in spec
            .map(|s| s.containers.as_slice())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            for (pi, p) in c.ports.as_deref().unwrap_or_default().iter().enumerate() {
                let field = format!("spec.containers[{ci}].ports[{pi}]");
                let port = port_number(p.container_port)
                    .map_err(|e| FieldError::new(format!("{field}.containerPort"), e))?;
                let protocol = Protocol::from_api(p.protocol.as_deref())
                    .map_err(|e| FieldError::new(format!("{field}.protocol"), e))?;
                ports.push(ContainerPort {
                    name: p.name.clone(),
                    port,
                    protocol,
                });
            }
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        Ok(Pod {
            workload: workload(&pod.metadata, &labels),
            labels,
            namespace,
            name,
            uid: pod.metadata.uid.clone(),
            ips,
            node: spec.and_then(|s| s.node_name.clone()),
            host_ips,
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ports,
            phase: status.and_then(|s| s.phase.clone()),
            created: pod.metadata.creation_timestamp.as_ref().map(|t| t.0),
            deleting: pod.metadata.deletion_timestamp.as_ref().map(|t| t.0),
        })
    }
}

/// The controller that owns a pod, walking ReplicaSet -> Deployment when the names show it.
fn workload(meta: &ObjectMeta, labels: &Labels) -> Option<Workload> {
    let owners = meta.owner_references.as_deref().unwrap_or_default();
    let owner = owners
        .iter()
        .find(|o| o.controller == Some(true))
        .or_else(|| owners.first())?;
    if owner.kind == "ReplicaSet" {
        // A Deployment names its ReplicaSets `<deployment>-<pod-template-hash>`.
        if let Some(hash) = labels.get("pod-template-hash")
            && let Some(deployment) = owner
                .name
                .strip_suffix(hash.as_str())
                .and_then(|n| n.strip_suffix('-'))
            && !deployment.is_empty()
        {
            return Some(Workload {
                kind: "Deployment".into(),
                name: deployment.into(),
            });
        }
    }
    Some(Workload {
        kind: owner.kind.clone(),
        name: owner.name.clone(),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    /// Always includes kubernetes.io/metadata.name.
    pub labels: Labels,
}

impl Namespace {
    /// A namespace known only by name (no Namespace object seen): just the automatic label.
    pub fn implicit(name: &str) -> Self {
        let mut labels = Labels::new();
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.into());
        Self {
            name: name.into(),
            labels,
        }
    }

    pub fn from_api(ns: &core::Namespace) -> Result<Self, FieldError> {
        let name = name(&ns.metadata)?;
        let mut labels = ns.metadata.labels.clone().unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.into(), name.clone());
        Ok(Self { name, labels })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
    pub target: TargetPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub cluster_ips: Vec<IpAddr>,
    /// None for services without a selector (endpoints managed by hand).
    pub selector: Option<Labels>,
    pub ports: Vec<ServicePort>,
}

impl Service {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    pub fn from_api(svc: &core::Service) -> Result<Self, FieldError> {
        let (namespace, name) = names(&svc.metadata)?;
        let spec = svc.spec.as_ref();
        let mut cluster_ips = Vec::new();
        if let Some(list) = spec.and_then(|s| s.cluster_ips.as_ref()) {
            for (i, ip) in list.iter().enumerate() {
                push_service_ip(&mut cluster_ips, ip, &format!("spec.clusterIPs[{i}]"))?;
            }
        }
        if let Some(ip) = spec.and_then(|s| s.cluster_ip.as_ref()) {
            push_service_ip(&mut cluster_ips, ip, "spec.clusterIP")?;
        }
        let mut ports = Vec::new();
        for (i, p) in spec
            .and_then(|s| s.ports.as_deref())
            .unwrap_or_default()
            .iter()
            .enumerate()
        {
            let field = format!("spec.ports[{i}]");
            let port =
                port_number(p.port).map_err(|e| FieldError::new(format!("{field}.port"), e))?;
            let protocol = Protocol::from_api(p.protocol.as_deref())
                .map_err(|e| FieldError::new(format!("{field}.protocol"), e))?;
            let target = match &p.target_port {
                None => TargetPort::Number(port),
                Some(IntOrString::Int(n)) => TargetPort::Number(
                    port_number(*n)
                        .map_err(|e| FieldError::new(format!("{field}.targetPort"), e))?,
                ),
                Some(IntOrString::String(s)) => match s.parse::<i32>() {
                    Ok(n) => TargetPort::Number(
                        port_number(n)
                            .map_err(|e| FieldError::new(format!("{field}.targetPort"), e))?,
                    ),
                    Err(_) => TargetPort::Name(s.clone()),
                },
            };
            ports.push(ServicePort {
                name: p.name.clone(),
                port,
                protocol,
                target,
            });
        }
        Ok(Self {
            namespace,
            name,
            cluster_ips,
            selector: spec
                .and_then(|s| s.selector.clone())
                .filter(|s| !s.is_empty()),
            ports,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// The pod behind the addresses (targetRef of kind Pod).
    pub pod: Option<ObjectKey>,
    pub node: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub namespace: String,
    pub name: String,
    pub service: Option<String>,
    pub endpoints: Vec<SliceEndpoint>,
}

impl EndpointSlice {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    pub fn from_api(slice: &discovery::EndpointSlice) -> Result<Self, FieldError> {
        let (namespace, name) = names(&slice.metadata)?;
        // FQDN slices hold host names, not addresses: nothing to index.
        let by_ip = matches!(slice.address_type.as_str(), "IPv4" | "IPv6");
        let mut endpoints = Vec::new();
        for (i, e) in slice.endpoints.iter().enumerate() {
            let mut addresses = Vec::new();
            if by_ip {
                for (j, a) in e.addresses.iter().enumerate() {
                    push_ip(&mut addresses, a, &format!("endpoints[{i}].addresses[{j}]"))?;
                }
            }
            let pod = e.target_ref.as_ref().and_then(|t| {
                (t.kind.as_deref() == Some("Pod")).then(|| {
                    ObjectKey::new(
                        t.namespace.clone().unwrap_or_else(|| namespace.clone()),
                        t.name.clone().unwrap_or_default(),
                    )
                })
            });
            endpoints.push(SliceEndpoint {
                addresses,
                pod: pod.filter(|p| !p.name.is_empty()),
                node: e.node_name.clone(),
            });
        }
        Ok(Self {
            service: slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL).cloned()),
            namespace,
            name,
            endpoints,
        })
    }
}

/// metadata.name, required.
pub(crate) fn name(meta: &ObjectMeta) -> Result<String, FieldError> {
    meta.name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| FieldError::new("metadata.name", "missing"))
}

/// (namespace, name); manifests without a namespace land in `default`, as kubectl would do.
pub(crate) fn names(meta: &ObjectMeta) -> Result<(String, String), FieldError> {
    let name = name(meta)?;
    let namespace = meta
        .namespace
        .clone()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    Ok((namespace, name))
}

pub(crate) fn port_number(n: i32) -> Result<u16, String> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{n} is not a port (1-65535)"))
}

pub(crate) fn parse_ip(s: &str) -> Option<IpAddr> {
    s.trim().parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

fn push_ip(into: &mut Vec<IpAddr>, s: &str, field: &str) -> Result<(), FieldError> {
    let ip =
        parse_ip(s).ok_or_else(|| FieldError::new(field, format!("{s:?} is not an IP address")))?;
    if !into.contains(&ip) {
        into.push(ip);
    }
    Ok(())
}

/// Headless services say `None` where an address would be.
fn push_service_ip(into: &mut Vec<IpAddr>, s: &str, field: &str) -> Result<(), FieldError> {
    if s.is_empty() || s == "None" {
        return Ok(());
    }
    push_ip(into, s, field)
}
