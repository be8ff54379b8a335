//! NetworkPolicy objects compiled into the form the evaluator walks, with the API server's
//! defaulting (policyTypes, protocol) and validation applied, since raw YAML has neither.
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{cidr::Cidr, selector::Selector};
use crate::enrich::model::{self, FieldError, ObjectKey, Protocol};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerMatch {
    /// podSelector and/or namespaceSelector in one peer (both = AND). No namespaceSelector
    /// means the policy's own namespace; no podSelector means every pod.
    Pods {
        pods: Option<Selector>,
        namespaces: Option<Selector>,
    },
    Block {
        cidr: Cidr,
        except: Vec<Cidr>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// Every port of the protocol.
    All,
    /// Inclusive range; a single port is `Range(p, p)`.
    Range(u16, u16),
    /// Resolved against the destination pod's containerPorts.
    Named(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortMatch {
    pub protocol: Protocol,
    pub port: PortSpec,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    /// Empty: every port and protocol.
    pub ports: Vec<PortMatch>,
    /// Empty: every peer.
    pub peers: Vec<PeerMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledPolicy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    /// Some while the policy has policyType Ingress (an empty list allows nothing).
    pub ingress: Option<Vec<Rule>>,
    pub egress: Option<Vec<Rule>>,
}

impl CompiledPolicy {
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(&self.namespace, &self.name)
    }

    pub fn from_api(np: &NetworkPolicy) -> Result<Self, FieldError> {
        let (namespace, name) = model::names(&np.metadata)?;
        let spec = np
            .spec
            .as_ref()
            .ok_or_else(|| FieldError::new("spec", "missing"))?;
        let pod_selector = match &spec.pod_selector {
            Some(s) => Selector::compile(s).map_err(|e| prefix("spec.podSelector", e))?,
            None => Selector::default(),
        };
        let (mut has_ingress, mut has_egress) = (false, false);
        match spec.policy_types.as_deref() {
            // The API server's default: Ingress always, Egress only with egress rules.
            None | Some([]) => {
                has_ingress = true;
                has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
            }
            Some(types) => {
                for (i, t) in types.iter().enumerate() {
                    match t.as_str() {
                        "Ingress" => has_ingress = true,
                        "Egress" => has_egress = true,
                        other => {
                            return Err(FieldError::new(
                                format!("spec.policyTypes[{i}]"),
                                format!("unknown policy type {other:?} (Ingress, Egress)"),
                            ));
                        }
                    }
                }
            }
        }
        let mut ingress = Vec::new();
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            let field = format!("spec.ingress[{i}]");
            ingress.push(rule(&field, "from", r.ports.as_deref(), r.from.as_deref())?);
        }
        let mut egress = Vec::new();
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            let field = format!("spec.egress[{i}]");
            egress.push(rule(&field, "to", r.ports.as_deref(), r.to.as_deref())?);
        }
        Ok(Self {
            namespace,
            name,
            pod_selector,
            ingress: has_ingress.then_some(ingress),
            egress: has_egress.then_some(egress),
        })
    }
}

fn prefix(base: &str, e: FieldError) -> FieldError {
    FieldError::new(format!("{base}.{}", e.field), e.what)
}

fn rule(
    field: &str,
    peers_field: &str,
    ports: Option<&[NetworkPolicyPort]>,
    peers: Option<&[NetworkPolicyPeer]>,
) -> Result<Rule, FieldError> {
    let mut out = Rule::default();
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        out.ports.push(port(&format!("{field}.ports[{i}]"), p)?);
    }
    for (i, p) in peers.unwrap_or_default().iter().enumerate() {
        out.peers
            .push(peer(&format!("{field}.{peers_field}[{i}]"), p)?);
    }
    Ok(out)
}

fn port(field: &str, p: &NetworkPolicyPort) -> Result<PortMatch, FieldError> {
    let protocol = Protocol::from_api(p.protocol.as_deref())
        .map_err(|e| FieldError::new(format!("{field}.protocol"), e))?;
    let port = match (&p.port, p.end_port) {
        (None, None) => PortSpec::All,
        (None, Some(_)) => {
            return Err(FieldError::new(format!("{field}.endPort"), "needs port"));
        }
        (Some(IntOrString::Int(n)), end) => {
            let start =
                model::port_number(*n).map_err(|e| FieldError::new(format!("{field}.port"), e))?;
            let end = match end {
                None => start,
                Some(e) => model::port_number(e)
                    .ok()
                    .filter(|e| *e >= start)
                    .ok_or_else(|| {
                        FieldError::new(
                            format!("{field}.endPort"),
                            format!("{e} must be a port at or above port {start}"),
                        )
                    })?,
            };
            PortSpec::Range(start, end)
        }
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err(FieldError::new(
                    format!("{field}.endPort"),
                    "not allowed with a named port",
                ));
            }
            check_port_name(name).map_err(|e| FieldError::new(format!("{field}.port"), e))?;
            PortSpec::Named(name.clone())
        }
    };
    Ok(PortMatch { protocol, port })
}

/// An IANA service name, as containerPort names are: at most 15 lowercase alphanumerics or
/// '-', with a letter, no leading, trailing or double '-'.
fn check_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?} is neither a port number nor a port name"))
    }
}

fn peer(field: &str, p: &NetworkPolicyPeer) -> Result<PeerMatch, FieldError> {
    match (&p.ip_block, &p.pod_selector, &p.namespace_selector) {
        (None, None, None) => Err(FieldError::new(
            field,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        )),
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(FieldError::new(
            field,
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        )),
        (Some(block), None, None) => {
            let cidr: Cidr = block
                .cidr
                .parse()
                .map_err(|e| FieldError::new(format!("{field}.ipBlock.cidr"), e))?;
            let mut except = Vec::new();
            for (i, e) in block.except.iter().flatten().enumerate() {
                let f = format!("{field}.ipBlock.except[{i}]");
                let c: Cidr = e.parse().map_err(|w| FieldError::new(&f, w))?;
                if !cidr.covers(&c) {
                    return Err(FieldError::new(
                        &f,
                        format!("{c} is outside the cidr {cidr}"),
                    ));
                }
                except.push(c);
            }
            Ok(PeerMatch::Block { cidr, except })
        }
        (None, pods, namespaces) => Ok(PeerMatch::Pods {
            pods: pods
                .as_ref()
                .map(Selector::compile)
                .transpose()
                .map_err(|e| prefix(&format!("{field}.podSelector"), e))?,
            namespaces: namespaces
                .as_ref()
                .map(Selector::compile)
                .transpose()
                .map_err(|e| prefix(&format!("{field}.namespaceSelector"), e))?,
        }),
    }
}
