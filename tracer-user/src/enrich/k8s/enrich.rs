//! Who is behind a flow's addresses and which NetworkPolicy decides it: fills the `source`,
//! `destination` and `policy` sections of drop and stall events.
use std::{net::IpAddr, str::FromStr};

use k8s_openapi::jiff::Timestamp;

use super::cluster::Cluster;
use crate::enrich::model::{Pod, Protocol};
use crate::{
    enrich::policy::{Side, Verdict, fix, fix::FixPorts},
    event::{self, Endpoint, Event, Kind, Shared},
};

/// A connection as policies see it: from the initiator to the port it connected to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowQuery {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    /// When it happened (for addresses reused since); None: now.
    pub at: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FlowReport {
    pub source: Endpoint,
    pub destination: Endpoint,
    /// The destination pod evaluated, when the destination was a Service address.
    pub backend: Option<String>,
    pub verdict: Verdict,
    /// The event's policy section, with the suggested fix when denied.
    pub policy: event::Policy,
}

/// The endpoint behind `ip` at `at`: a pod (deleted ones within the history), a node, an
/// EndpointSlice address (pod known only by name), a Service address, or just the address.
pub fn endpoint(cluster: &Cluster, ip: IpAddr, at: Option<Timestamp>) -> Endpoint {
    let ip = ip.to_canonical();
    if let Some(node) = cluster.node_of_ip(ip) {
        return Endpoint {
            ip: Some(ip),
            node: Some(node.to_string()),
            host_network: true,
            ..Endpoint::default()
        };
    }
    if let Some(pod) = cluster.pod_at(ip, at) {
        return pod_endpoint(cluster, pod, ip);
    }
    if let Some((pod, service)) = cluster.slice_target(ip) {
        return Endpoint {
            ip: Some(ip),
            namespace: pod
                .as_ref()
                .or(service.as_ref())
                .map(|k| k.namespace.clone()),
            pod: pod.map(|k| k.name),
            service: service.map(|k| k.name),
            ..Endpoint::default()
        };
    }
    if let Some(svc) = cluster.service_at_ip(ip) {
        return Endpoint {
            ip: Some(ip),
            namespace: Some(svc.namespace.clone()),
            service: Some(svc.name.clone()),
            ..Endpoint::default()
        };
    }
    Endpoint {
        ip: Some(ip),
        ..Endpoint::default()
    }
}

/// The endpoint of a known pod (found by IP, or by UID from its cgroup).
pub fn pod_endpoint(cluster: &Cluster, pod: &Pod, ip: IpAddr) -> Endpoint {
    Endpoint {
        ip: Some(ip),
        namespace: Some(pod.namespace.clone()),
        pod: Some(pod.name.clone()),
        pod_uid: pod.uid.clone(),
        labels: pod.labels.clone(),
        workload: pod.workload.clone(),
        service: cluster.services_of(pod).into_iter().next(),
        node: pod.node.clone(),
        host_network: pod.host_network,
    }
}

/// Resolve both ends and evaluate the connection. A destination Service address is evaluated
/// against its backends (policies apply after the DNAT); the first denying one is reported.
pub fn evaluate_flow(cluster: &Cluster, q: &FlowQuery, extra_ports: &[u16]) -> FlowReport {
    evaluate_flow_with(cluster, q, Some(&FixPorts::extra(extra_ports)))
}

/// [`evaluate_flow`] with the ports a fix is for (`None`: the verdict only, no fix).
pub fn evaluate_flow_with(cluster: &Cluster, q: &FlowQuery, fix: Option<&FixPorts>) -> FlowReport {
    let src = cluster.side(q.src, q.at);
    let source = endpoint(cluster, q.src, q.at);
    let mut destination = endpoint(cluster, q.dst, q.at);
    if destination.pod.is_none()
        && let Some(svc) = cluster.service_at_ip(q.dst)
    {
        let backends = cluster.backends(svc, q.port, q.protocol);
        let mut chosen = None;
        for (pod, port) in &backends {
            let Some(ip) = pod.ips.first().copied() else {
                continue;
            };
            if pod.host_network {
                continue;
            }
            let dst = Side::pod(ip, cluster.pod_ref(pod));
            let verdict = cluster.policies().evaluate(&src, &dst, q.protocol, *port);
            let denied = !verdict.allowed();
            if chosen.is_none() || denied {
                chosen = Some((pod, dst, verdict));
            }
            if denied {
                break;
            }
        }
        if let Some((pod, dst, verdict)) = chosen {
            if backends.len() == 1 {
                let mut e = pod_endpoint(cluster, pod, q.dst);
                e.service = Some(svc.name.clone());
                destination = e;
            }
            return FlowReport {
                source,
                destination,
                backend: Some(pod.key().to_string()),
                policy: policy_with_fix(cluster, &src, &dst, &verdict, fix),
                verdict,
            };
        }
    }
    let dst = cluster.side(q.dst, q.at);
    let verdict = cluster.policies().evaluate(&src, &dst, q.protocol, q.port);
    FlowReport {
        source,
        destination,
        backend: None,
        policy: policy_with_fix(cluster, &src, &dst, &verdict, fix),
        verdict,
    }
}

fn policy_with_fix(
    cluster: &Cluster,
    src: &Side,
    dst: &Side,
    verdict: &Verdict,
    ports: Option<&FixPorts>,
) -> event::Policy {
    let mut policy = verdict.to_event();
    let Some(ports) = ports else {
        return policy;
    };
    policy.suggested_fix = fix::suggest(verdict, src, dst, ports, cluster);
    if let Some(f) = &policy.suggested_fix {
        policy.fix_check = super::fix_check::check_with_range(
            cluster,
            src,
            dst,
            verdict.protocol,
            &ports.all(verdict.port),
            ports.range(),
            f,
        );
    }
    policy
}

#[derive(Debug, Clone, Default)]
pub struct EnrichOptions {
    /// Ports added to every suggested fix (e.g. where Oracle listeners redirect to).
    pub extra_ports: Vec<u16>,
    /// Ports an Oracle listener redirected clients to over time (`oracle.redirect_ports`):
    /// covered by one `port` + `endPort` range in the fix.
    pub dynamic_ports: Vec<u16>,
}

/// Fill `source`, `destination` and (when a pod is involved) `policy` of a drop or stall
/// event. Other kinds, and events without a flow, are left alone.
pub fn enrich(cluster: &Cluster, event: &mut Event, opts: &EnrichOptions) {
    if !matches!(event.kind, Kind::Drop | Kind::Stall) {
        return;
    }
    let Some(flow) = &event.flow else { return };
    let at = Timestamp::from_str(&event.time).ok();
    let protocol = Protocol::from_str(&flow.proto).unwrap_or_default();
    // Policies judge connections, not packets: evaluate the initiating direction.
    let (src, dst, port) = if let Some(ct) = &event.conntrack {
        (ct.original.src_ip, ct.original.dst_ip, ct.original.dst_port)
    } else if event.tcp.as_ref().is_some_and(|t| t.flags.is_syn_ack()) {
        (flow.dst_ip, flow.src_ip, flow.src_port)
    } else {
        (flow.src_ip, flow.dst_ip, flow.dst_port)
    };
    let q = FlowQuery {
        src,
        dst,
        protocol,
        port,
        at,
    };
    let ports = FixPorts {
        extra: opts.extra_ports.clone(),
        dynamic: opts.dynamic_ports.clone(),
    };
    let report = evaluate_flow_with(cluster, &q, Some(&ports));
    let involves_pod =
        report.source.pod.is_some() || report.destination.pod.is_some() || report.backend.is_some();
    // Endpoints stay in the packet's direction.
    let (flow_src, flow_dst) = (flow.src_ip.to_canonical(), flow.dst_ip.to_canonical());
    let (source, destination) =
        if report.source.ip == Some(flow_src) && report.destination.ip == Some(flow_dst) {
            (report.source, report.destination)
        } else if report.source.ip == Some(flow_dst) && report.destination.ip == Some(flow_src) {
            (report.destination, report.source)
        } else {
            (
                endpoint(cluster, flow_src, at),
                endpoint(cluster, flow_dst, at),
            )
        };
    event.source = Some(Shared::new(source));
    event.destination = Some(Shared::new(destination));
    if involves_pod {
        event.policy = Some(Shared::new(report.policy));
    }
}
