//! What the running kernel looks like: tracefs record formats, BTF struct layouts and enums,
//! and kernel symbols. Everything kernel-specific is read here at load time; nothing is
//! compiled in.
pub mod btf;
pub mod caps;
pub mod kallsyms;
pub mod tracefs;
