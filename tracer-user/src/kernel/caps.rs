//! Effective capabilities of this process, for naming the one that is missing.
use std::fs;

pub const CAP_DAC_OVERRIDE: u32 = 1;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_SYSLOG: u32 = 34;
pub const CAP_PERFMON: u32 = 38;
pub const CAP_BPF: u32 = 39;

pub fn name(cap: u32) -> &'static str {
    match cap {
        CAP_NET_ADMIN => "CAP_NET_ADMIN",
        CAP_SYS_ADMIN => "CAP_SYS_ADMIN",
        CAP_PERFMON => "CAP_PERFMON",
        CAP_BPF => "CAP_BPF",
        CAP_SYSLOG => "CAP_SYSLOG",
        CAP_DAC_READ_SEARCH => "CAP_DAC_READ_SEARCH",
        CAP_DAC_OVERRIDE => "CAP_DAC_OVERRIDE",
        _ => "CAP_?",
    }
}

/// Effective capability mask from /proc/self/status.
pub fn effective() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| parse_cap_eff(&s))
        .unwrap_or(0)
}

pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// The capabilities tracing needs that `mask` lacks. CAP_SYS_ADMIN stands in for CAP_BPF and
/// CAP_PERFMON (kernels before 5.8 only know it), CAP_DAC_OVERRIDE for CAP_DAC_READ_SEARCH.
pub fn missing(mask: u64, needed: &[u32]) -> Vec<u32> {
    let has = |c: u32| mask & (1u64 << c) != 0;
    needed
        .iter()
        .copied()
        .filter(|&c| !(has(c) || (matches!(c, CAP_BPF | CAP_PERFMON) && has(CAP_SYS_ADMIN))))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cap_eff_and_names_the_missing_one() {
        let status = "Name:\tx\nCapEff:\t000001c000001000\n";
        let mask = parse_cap_eff(status).unwrap();
        assert!(missing(mask, &[CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN]).is_empty());
        let no_bpf = mask & !(1 << CAP_BPF);
        assert_eq!(missing(no_bpf, &[CAP_BPF, CAP_PERFMON]), vec![CAP_BPF]);
        assert!(missing(1 << CAP_SYS_ADMIN, &[CAP_BPF, CAP_PERFMON]).is_empty());
    }
}
