//! droptrace: finds the packet drop behind a silently stalled connection.
//!
//! Data flows one way, and the folders are its stages, in order (docs/architecture.md walks
//! one event through them):
//!
//! 1. [`kernel`]: what the running kernel looks like (tracefs formats, BTF, kallsyms,
//!    capabilities, release);
//! 2. [`collect`]: the loader that puts the programs in with this kernel's layouts, and one
//!    collector per kernel signal (drops, TCP lifecycle and retransmits, conntrack, Oracle
//!    Net) behind one trait: can it run here, its layout, how it attaches, how its records
//!    decode;
//! 3. [`decode`]: the decoded signals, typed (flows, TCP states and flags, drop classes,
//!    conntrack entries, Oracle Net messages);
//! 4. [`correlate`]: the flow table that joins one connection attempt's signals into one
//!    `stall` incident, storms, Oracle conversations, and the diagnosis in words;
//! 5. [`pipeline`]: the I/O-free core that runs stages 3-4 on raw records and clock ticks and
//!    returns droptrace.v1 [`event`]s, with what the default stream carries;
//! 6. [`enrich`]: pods, services and workloads (`enrich::k8s`, `enrich::identity`), the
//!    NetworkPolicy verdict and its fix (`enrich::policy`);
//! 7. [`encode`]: native, ECS, OCSF and text;
//! 8. [`output`]: sinks, spool, metrics.
//!
//! [`commands`] wire them to the world (`run`, `check`, `explain`, `replay`); [`error`] maps
//! every failure to an exit code.
pub mod clock;
pub mod collect;
pub mod commands;
pub mod correlate;
pub mod decode;
pub mod encode;
pub mod enrich;
pub mod error;
pub mod event;
pub mod kernel;
pub mod output;
pub mod pipeline;
