//! Oracle Net packets from the cgroup_skb programs on the cgroup v2 root.
use std::path::{Path, PathBuf};

use tracer_common::TnsEvent;

use crate::decode::{self, FlowKey};

pub const INGRESS_PROGRAM: &str = "tns_ingress";
pub const EGRESS_PROGRAM: &str = "tns_egress";

/// The cgroup v2 root: where the programs see every local socket. From mountinfo, a cgroup2
/// mount that shows the hierarchy's real root (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, unified hosts at /sys/fs/cgroup).
///
/// In a container with a cgroup namespace of its own (containerd and CRI-O on cgroup v2
/// hosts, `podman --cgroupns=private`), the host's /sys/fs/cgroup mounted in (the
/// DaemonSet's hostPath) shows a root of `/../..` in mountinfo, and a `/` root is only the
/// container's own cgroup. The real root is the directory without `cgroup.type` (a file every
/// other cgroup has); only where none is mounted does a `/` root stand in.
pub fn cgroup2_root() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    cgroup2_root_in(&info, |dir| {
        dir.join("cgroup.procs").exists() && !dir.join("cgroup.type").exists()
    })
}

fn cgroup2_root_in(mountinfo: &str, is_real_root: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let mounts: Vec<(&str, PathBuf)> = mountinfo
        .lines()
        .filter_map(|line| {
            // id parent major:minor root mount-point options [optional...] - fstype source super
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            let mut f = left.split_whitespace();
            let root = f.nth(3)?;
            let mount = f.next()?;
            (fstype == "cgroup2").then(|| (root, PathBuf::from(mount)))
        })
        .collect();
    mounts
        .iter()
        .find(|(_, m)| is_real_root(m))
        .or_else(|| mounts.iter().find(|(root, _)| *root == "/"))
        .map(|(_, m)| m.clone())
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
        flow: decode::flow_key(&rec.flow),
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
        // Outside containers the `/` root is the real one.
        let real = |p: &Path| p == Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            cgroup2_root_in(hybrid, real),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_root_in(hybrid, |_| false),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A sub-tree seen without a cgroup namespace: not the root.
        let nested = "40 30 0:28 /kubepods.slice/pod1 /sys/fs/cgroup ro - cgroup2 cgroup2 rw\n";
        assert_eq!(cgroup2_root_in(nested, |_| false), None);
        let unified = "29 23 0:26 / /sys/fs/cgroup rw shared:4 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            cgroup2_root_in(unified, |_| true),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn finds_the_host_root_mounted_into_a_cgroup_namespace() {
        // podman --cgroupns=private on a hybrid host with -v /sys/fs/cgroup:/sys/fs/cgroup:ro:
        // the host's v2 root shows as an ancestor of the namespace's root.
        let hybrid = "\
601 590 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs rw,mode=755
602 601 0:28 /../.. /sys/fs/cgroup/unified ro,nosuid - cgroup2 cgroup2 rw
";
        let real = |p: &Path| p == Path::new("/sys/fs/cgroup/unified");
        assert_eq!(
            cgroup2_root_in(hybrid, real),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // containerd on a cgroup v2 host: its own mount (the pod's cgroup, shown as `/`),
        // then the DaemonSet's hostPath over it; the path now opens the host's root.
        let v2 = "\
700 690 0:26 / /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw
710 690 0:26 /../../.. /sys/fs/cgroup ro,nosuid - cgroup2 cgroup2 rw,nsdelegate
";
        assert_eq!(
            cgroup2_root_in(v2, |p| p == Path::new("/sys/fs/cgroup")),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }
}
