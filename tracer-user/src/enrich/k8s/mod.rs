//! Kubernetes identity for flows: a model of the cluster fed by snapshot files or by API
//! watchers ([`live`]) through [`Cluster::apply`] / [`Cluster::delete`], address history,
//! cgroup identity and event enrichment.
pub mod change;
pub mod cluster;
pub mod enrich;
pub mod fix_check;
pub mod ip_history;
pub mod live;
pub mod snapshot;

pub use cluster::{Cluster, DEFAULT_IP_HISTORY, Object, ObjectKind, ObjectRef};
pub use enrich::{EnrichOptions, FlowQuery, FlowReport, enrich, evaluate_flow, evaluate_flow_with};
pub use live::{ApiArgs, KubeSource, LiveError, LiveOptions};
pub use snapshot::{Mode, Reload, Skipped, Snapshot, SnapshotError, SnapshotWatcher};
