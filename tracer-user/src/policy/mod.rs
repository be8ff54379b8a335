//! NetworkPolicy (networking.k8s.io/v1) evaluation, without I/O: which policy lets a
//! connection through or isolates it, and the policy that would let it through.
//!
//! Connections, not packets: replies of an allowed connection are never re-evaluated, so
//! callers pass the initiating direction.
pub mod change;
pub mod cidr;
pub mod evaluate;
pub mod fix;
pub mod fix_check;
pub mod rules;
pub mod selector;

pub use evaluate::{Direction, DirectionVerdict, PodRef, PolicySet, Reason, Side, Verdict};
pub use rules::CompiledPolicy;
