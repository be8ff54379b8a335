//! What the running kernel looks like: tracefs record formats, BTF struct layouts and enums,
//! and kernel symbols. Everything kernel-specific is read here at load time; nothing is
//! compiled in.
pub mod btf;
pub mod caps;
pub mod kallsyms;
pub mod tracefs;

/// The kernel's hostname: `node` when neither --node-name nor NODE_NAME is given, and the
/// OTLP resource's `host.name`.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// The running kernel's release (`uname -r`).
pub fn release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}

/// `major.minor` of a release string such as `5.10.0-46-amd64` or `6.18.44-fc`.
pub fn version_of(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// Whether this kernel charges BPF maps and programs to RLIMIT_MEMLOCK: before 5.11 it does;
/// from 5.11 they are charged to the memory cgroup and the limit plays no part (so a refusal
/// there is never the limit's fault). An unreadable release counts as an old kernel: the
/// message then names the limit as one possible cause among the rest.
pub fn charges_memlock(release: &str) -> bool {
    version_of(release).is_none_or(|v| v < (5, 11))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_before_5_11_charge_bpf_memory_to_memlock() {
        assert_eq!(version_of("5.10.0-46-amd64"), Some((5, 10)));
        assert_eq!(version_of("6.18.44-fc-v857"), Some((6, 18)));
        assert!(charges_memlock("5.10.0-46-amd64"));
        assert!(charges_memlock("4.19.0"));
        assert!(!charges_memlock("5.11.0"));
        assert!(!charges_memlock("6.1.0-57-amd64"));
        assert!(!charges_memlock("7.3.0-1-amd64"));
        assert!(charges_memlock("garbage"));
    }
}
