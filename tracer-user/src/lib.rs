//! droptrace: finds the packet drop behind a silently stalled connection.
//!
//! Data flows one way: kernel records ([`tracer`], [`collectors`]) -> decode ([`signal`]) ->
//! correlate ([`correlate`], [`aggregate`]) -> enrich ([`k8s`], [`policy`], [`oracle`]) ->
//! [`event`] -> [`encode`] -> [`output`] (sinks, spool, metrics). Everything kernel-specific is
//! resolved at load time ([`kernel`]).
pub mod cgroup;
pub mod clock;
pub mod collectors;
pub mod correlate;
pub mod daemon;
pub mod drop_class;
pub mod encode;
pub mod error;
pub mod event;
pub mod explain;
pub mod identity;
pub mod k8s;
pub mod kernel;
pub mod oracle;
pub mod output;
pub mod pipeline;
pub mod policy;
pub mod preflight;
pub mod replay;
pub mod report;
pub mod signal;
pub mod tns_track;
pub mod tracer;
