//! What the running kernel looks like: tracefs record formats, BTF struct layouts and enums,
//! and kernel symbols. Everything kernel-specific is read here at load time; nothing is
//! compiled in.
pub mod batch;
pub mod btf;
pub mod caps;
pub mod kallsyms;
pub mod loader;
pub mod tracefs;

/// The kernel's hostname: `node` when neither --node-name nor NODE_NAME is given, and the
/// OTLP resource's `host.name`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}
