//! droptrace: finds the packet drop behind a silently stalled connection.
//!
//! Data flows one way: kernel records ([`tracer`], [`collectors`]) -> decode -> [`event`] ->
//! [`encode`] -> [`sinks`]. Everything kernel-specific is resolved at load time ([`kernel`]).
pub mod clock;
pub mod collectors;
pub mod daemon;
pub mod encode;
pub mod event;
pub mod kernel;
pub mod metrics;
pub mod preflight;
pub mod replay;
pub mod sinks;
pub mod tracer;
