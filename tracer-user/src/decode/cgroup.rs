//! Pod and container identity from a process's cgroup path, without the API: the kubelet
//! puts every container under a `pod<uid>` cgroup, named differently by each cgroup driver
//! and runtime.
//!
//! - systemd driver: `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with
//!   '_'>.slice/cri-containerd-<id>.scope` (also `crio-<id>.scope`, `docker-<id>.scope`);
//! - cgroupfs driver: `/kubepods/burstable/pod<uid>/<id>`;
//! - nested (kind, k3s in docker): any prefix before the `kubepods` part.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupIdentity {
    /// With dashes, as in metadata.uid.
    pub pod_uid: String,
    /// The container id (64 hex digits); None for the pod-level cgroup or a sandbox helper.
    pub container_id: Option<String>,
}

/// Pod UID and container id from a cgroup path, or a `/proc/<pid>/cgroup` line
/// (`0::/kubepods.slice/...`). None when the path is not a pod's.
pub fn parse_cgroup_path(path: &str) -> Option<CgroupIdentity> {
    // `hierarchy-id:controllers:path` lines: the path is after the second colon.
    let path = match path.trim().splitn(3, ':').collect::<Vec<_>>().as_slice() {
        [_, _, p] => *p,
        _ => path.trim(),
    };
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let start = parts.iter().position(|p| p.contains("kubepods"))?;
    let mut pod_uid = None;
    let mut container_id = None;
    for part in &parts[start..] {
        if pod_uid.is_none() {
            pod_uid = pod_segment(part);
            continue;
        }
        if let Some(id) = container_segment(part) {
            container_id = Some(id);
            break;
        }
    }
    Some(CgroupIdentity {
        pod_uid: pod_uid?,
        container_id,
    })
}

/// `pod<uid>` (cgroupfs) or `...-pod<uid_with_underscores>.slice` (systemd).
fn pod_segment(part: &str) -> Option<String> {
    let raw = if let Some(slice) = part.strip_suffix(".slice") {
        let (_, uid) = slice.rsplit_once("-pod")?;
        uid
    } else {
        part.strip_prefix("pod")?
    };
    let uid = raw.replace('_', "-").to_ascii_lowercase();
    is_uid(&uid).then_some(uid)
}

/// `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`, `libpod-<id>.scope`,
/// or a bare `<id>` (cgroupfs). Runtime helpers (`crio-conmon-<id>.scope`) are not containers.
fn container_segment(part: &str) -> Option<String> {
    let id = match part.strip_suffix(".scope") {
        Some(scope) => {
            let (_, id) = scope.rsplit_once('-')?;
            if scope.contains("conmon") {
                return None;
            }
            id
        }
        None => part,
    };
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_ascii_lowercase())
}

/// 8-4-4-4-12 hex digits.
fn is_uid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "6c4b8a3e-1f2d-4e5a-9b7c-0d1e2f3a4b5c";
    const CID: &str = "3f1c0e2b9a8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b";

    fn id(container: Option<&str>) -> Option<CgroupIdentity> {
        Some(CgroupIdentity {
            pod_uid: UID.into(),
            container_id: container.map(str::to_string),
        })
    }

    #[test]
    fn systemd_driver_containerd() {
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6c4b8a3e_1f2d_4e5a_9b7c_0d1e2f3a4b5c.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
    }

    #[test]
    fn systemd_driver_guaranteed_qos_has_no_qos_slice() {
        let p = format!(
            "/kubepods.slice/kubepods-pod6c4b8a3e_1f2d_4e5a_9b7c_0d1e2f3a4b5c.slice/crio-{CID}.scope"
        );
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
    }

    #[test]
    fn proc_cgroup_line_and_docker_scope() {
        let p = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod6c4b8a3e_1f2d_4e5a_9b7c_0d1e2f3a4b5c.slice/docker-{CID}.scope\n"
        );
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
    }

    #[test]
    fn cgroupfs_driver() {
        let p = format!("/kubepods/burstable/pod{UID}/{CID}");
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
        let p = format!("/kubepods/pod{UID}/{CID}");
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
        // cgroup v1 line with controllers
        let p = format!("4:cpu,cpuacct:/kubepods/besteffort/pod{UID}/{CID}");
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
    }

    #[test]
    fn kind_node_nested_under_kubelet_slice() {
        let p = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod6c4b8a3e_1f2d_4e5a_9b7c_0d1e2f3a4b5c.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
        let p = format!("/docker/{CID}/kubepods/burstable/pod{UID}/{CID}");
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
    }

    #[test]
    fn crio_nested_container_cgroup() {
        // CRI-O with cgroup v2 and systemd puts the processes one level below the scope.
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6c4b8a3e_1f2d_4e5a_9b7c_0d1e2f3a4b5c.slice/crio-{CID}.scope/container"
        );
        assert_eq!(parse_cgroup_path(&p), id(Some(CID)));
    }

    #[test]
    fn pod_level_and_runtime_helpers_have_no_container() {
        let p = "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6c4b8a3e_1f2d_4e5a_9b7c_0d1e2f3a4b5c.slice";
        assert_eq!(parse_cgroup_path(p), id(None));
        let p = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod6c4b8a3e_1f2d_4e5a_9b7c_0d1e2f3a4b5c.slice/crio-conmon-{CID}.scope"
        );
        assert_eq!(parse_cgroup_path(&p), id(None));
    }

    #[test]
    fn not_a_pod() {
        for p in [
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            "0::/",
            "",
            "/kubepods.slice/kubepods-burstable.slice",
            "/kubepods/burstable/podnot-a-uid/abc",
        ] {
            assert_eq!(parse_cgroup_path(p), None, "{p}");
        }
    }
}
