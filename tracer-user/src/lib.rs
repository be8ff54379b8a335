//! droptrace: finds the packet drop behind a silently stalled connection.
//!
//! Data flows one way: kernel records ([`tracer`], [`collectors`]) -> decode -> [`event`] ->
//! [`encode`] -> [`sinks`]. Everything kernel-specific is resolved at load time ([`kernel`]).
//! Flows are attributed to pods ([`k8s`]) and to the NetworkPolicy deciding them ([`policy`]).
pub mod clock;
pub mod collectors;
pub mod daemon;
pub mod encode;
pub mod event;
pub mod explain;
pub mod k8s;
pub mod kernel;
pub mod policy;
pub mod preflight;
pub mod sinks;
pub mod tracer;
