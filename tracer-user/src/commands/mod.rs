//! The subcommands: `run` traces (the pipeline wired to the kernel and the outputs), `check`
//! is the preflight, `explain` evaluates a connection against the cluster's NetworkPolicies,
//! `replay` sends a recorded stream through the outputs.
pub mod check;
pub mod explain;
pub mod replay;
pub mod run;
