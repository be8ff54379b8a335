//! Stage 6, enrich: who the addresses of an event are and what the cluster's policy says.
//!
//! - [`model`]: the Kubernetes objects droptrace reads (pods, namespaces, services, endpoint
//!   slices, NetworkPolicies, nodes), typed from the API's JSON;
//! - [`policy`]: NetworkPolicy evaluation without I/O: the verdict for a connection, the
//!   policy that isolates it, the narrowest fix, and what that fix would newly admit;
//! - [`k8s`]: the cluster model fed by a snapshot file or by API watchers, address history,
//!   cgroup identity, and the enrichment of one event (pods, service, verdict, fix);
//! - [`identity`]: the daemon's handle on all of it (snapshot reloads or the live source).
//!
//! Dependencies run one way: `model` <- `policy` <- `k8s` <- `identity`.
pub mod identity;
pub mod k8s;
pub mod model;
pub mod policy;
