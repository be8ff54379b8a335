//! Oracle Net packets from the cgroup_skb programs on the cgroup v2 root.
use std::path::PathBuf;

use tracer_common::TnsEvent;

use crate::signal::{self, FlowKey};

pub const INGRESS_PROGRAM: &str = "tns_ingress";
pub const EGRESS_PROGRAM: &str = "tns_egress";

/// The cgroup v2 root: where the programs see every local socket. From mountinfo, the
/// cgroup2 mount whose root is the hierarchy's root (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup).
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_root_in(&info)
}

fn cgroup2_root_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source super
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mut f = left.split_whitespace();
        let root = f.nth(3)?;
        let mount = f.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(mount))
    })
}

/// A captured TNS packet prefix.
#[derive(Debug, Clone)]
pub struct TnsSignal {
    pub ts_ns: u64,
    /// Sender as src.
    pub flow: FlowKey,
    pub seq: u32,
    pub payload_len: u32,
    pub data: Vec<u8>,
}

pub fn decode(rec: &TnsEvent) -> TnsSignal {
    let n = (rec.captured as usize).min(rec.data.len());
    TnsSignal {
        ts_ns: rec.hdr.ts_ns,
        flow: signal::flow_key(&rec.flow),
        seq: rec.seq,
        payload_len: rec.payload_len,
        data: rec.data[..n].to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_root_on_hybrid_and_unified_hosts() {
        let hybrid = "\
25 31 0:22 / /sys/fs/cgroup rw,nosuid - tmpfs tmpfs rw,mode=755
32 25 0:28 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
33 25 0:29 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            cgroup2_root_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // Inside a container with a cgroup namespace view of a sub-tree: not the root.
        let nested = "40 30 0:28 /kubepods.slice/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root_in(nested), None);
        let unified = "29 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_root_in(unified),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }
}
