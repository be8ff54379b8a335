//! Container id of a process, from its cgroup path (node-local identity, no API needed).
use std::fs;

/// The 64-hex container id in a cgroup path: `.../cri-containerd-<id>.scope`,
/// `.../crio-<id>.scope`, `.../docker-<id>.scope`, or cgroupfs `/kubepods/.../pod<uid>/<id>`.
pub fn container_id_from_path(path: &str) -> Option<String> {
    let last = path.rsplit('/').find(|s| !s.is_empty())?;
    let last = last.strip_suffix(".scope").unwrap_or(last);
    let id = last.rsplit(['-', ':']).next()?;
    (id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit())).then(|| id.to_string())
}

/// Container id and pod UID of `tgid` from /proc (the unified hierarchy line first).
pub fn identity(tgid: u32) -> (Option<String>, Option<String>) {
    let Ok(text) = fs::read_to_string(format!("/proc/{tgid}/cgroup")) else {
        return (None, None);
    };
    let mut lines: Vec<&str> = text.lines().collect();
    lines.sort_by_key(|l| !l.starts_with("0::"));
    let paths = || lines.iter().filter_map(|l| l.splitn(3, ':').nth(2));
    let pod = paths().find_map(super::cgroup::parse_cgroup_path);
    let container = pod
        .as_ref()
        .and_then(|p| p.container_id.clone())
        .or_else(|| paths().find_map(container_id_from_path));
    (container, pod.map(|p| p.pod_uid))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4a1b2c3d4e5f60718293a4b5c6d7e8f90123456789abcdef0123456789abcdef";

    #[test]
    fn container_ids_from_runtime_scopes() {
        for path in [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1d2c_3b4a.slice/cri-containerd-{ID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod1d2c.slice/crio-{ID}.scope"),
            format!("/system.slice/docker-{ID}.scope"),
            format!("/kubepods/burstable/pod1d2c3b4a-1111-2222-3333-444455556666/{ID}"),
        ] {
            assert_eq!(container_id_from_path(&path).as_deref(), Some(ID), "{path}");
        }
        assert_eq!(
            container_id_from_path("/user.slice/user-0.slice/session-1.scope"),
            None
        );
        assert_eq!(container_id_from_path("/"), None);
    }
}
