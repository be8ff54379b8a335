//! The sinks: where an `--output` delivers its batches.
pub(super) mod file;
pub(super) mod http;
pub mod otlp;
pub(super) mod stream;
