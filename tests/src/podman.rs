//! The image of `cargo xtask image` under podman + crun, started the way the DaemonSet in
//! deploy/40-daemonset.yaml starts it: every flag below is read from that manifest and its
//! ConfigMap (user, capabilities, read-only root, no privilege escalation, seccomp profile,
//! host network and PID, host paths, spool, env, args), none is written by hand.
use std::{collections::BTreeMap, path::PathBuf, process::Command, sync::OnceLock};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, PodSpec},
};

use serde::Deserialize as _;

use crate::{netns::sh, workspace_root};

const TAG: &str = "localhost/droptrace:e2e";

/// The image, built once per test run from the droptrace under test (`cargo xtask image
/// --binary`), unless DROPTRACE_IMAGE names one already built (`cargo xtask test` does).
pub fn image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            if let Ok(i) = std::env::var("DROPTRACE_IMAGE") {
                return i;
            }
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let bin = crate::tracer::binary();
            let st = Command::new(cargo)
                .current_dir(workspace_root())
                .args([
                    "run", "-q", "-p", "xtask", "--", "image", "--tag", TAG, "--binary",
                ])
                .arg(&bin)
                .status()
                .expect("run cargo xtask image");
            assert!(
                st.success(),
                "cargo xtask image --binary {} failed",
                bin.display()
            );
            TAG.to_string()
        })
        .clone()
}

/// crun refuses hybrid cgroup hosts whose v2 hierarchy still holds controllers ("cgroups in
/// hybrid mode not supported, drop all controllers from cgroupv2"). Where /sys/fs/cgroup is a
/// v1 tmpfs, each controller left on the v2 hierarchy (hugetlb here) moves to a v1 hierarchy
/// of its own, as on any systemd hybrid host. Returns what it moved.
pub fn crun_ready() -> Vec<String> {
    let controllers = "/sys/fs/cgroup/unified/cgroup.controllers";
    let Ok(list) = std::fs::read_to_string(controllers) else {
        return Vec::new();
    };
    let mut moved = Vec::new();
    for c in list.split_whitespace() {
        let _ = std::fs::write(
            "/sys/fs/cgroup/unified/cgroup.subtree_control",
            format!("-{c}"),
        );
        let dir = format!("/sys/fs/cgroup/{c}");
        std::fs::create_dir_all(&dir).expect("mount point for a v1 controller");
        sh(&["mount", "-t", "cgroup", "-o", c, "cgroup", &dir]);
        moved.push(c.to_string());
    }
    moved
}

fn docs<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> T {
    let path = workspace_root().join("deploy").join(file);
    let text = std::fs::read_to_string(&path).expect("read manifest");
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = serde_yaml::Value::deserialize(doc).expect("YAML");
        if v["kind"].as_str() == Some(kind) {
            return serde_yaml::from_value(v).expect("typed object");
        }
    }
    panic!("no {kind} in {file}")
}

/// The DaemonSet's container, pod and ConfigMap.
pub struct Manifest {
    pub pod: PodSpec,
    pub container: Container,
    pub config: BTreeMap<String, String>,
}

impl Manifest {
    pub fn load() -> Self {
        let ds: DaemonSet = docs("40-daemonset.yaml", "DaemonSet");
        let cm: ConfigMap = docs("30-configmap.yaml", "ConfigMap");
        let pod = ds.spec.and_then(|s| s.template.spec).expect("pod spec");
        let container = pod.containers.first().cloned().expect("container");
        Self {
            pod,
            container,
            config: cm.data.unwrap_or_default(),
        }
    }

    /// The container's environment as Kubernetes would set it (ConfigMap keys, the node name
    /// from the downward API; optional Secrets that do not exist are left out).
    fn env(&self, node: &str) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        for e in self.container.env.iter().flatten() {
            let from = e.value_from.as_ref();
            let value = if let Some(v) = &e.value {
                Some(v.clone())
            } else if let Some(k) = from.and_then(|f| f.config_map_key_ref.as_ref()) {
                Some(self.config.get(&k.key).cloned().expect("ConfigMap key"))
            } else if from.and_then(|f| f.field_ref.as_ref()).is_some() {
                Some(node.to_string())
            } else {
                None
            };
            if let Some(v) = value {
                env.insert(e.name.clone(), v);
            }
        }
        env
    }

    /// `podman run` for this container: `name`, the spool at `spool`, `seccomp`: the
    /// manifest's profile (true) or the runtime's default (false). `extra_args` replace
    /// nothing, they follow the manifest's args (as a kubectl patch adding args would).
    pub fn podman_run(
        &self,
        name: &str,
        spool: &std::path::Path,
        seccomp: bool,
        extra_args: &[&str],
    ) -> Command {
        let sc = self
            .container
            .security_context
            .as_ref()
            .expect("securityContext");
        let mut c = Command::new("podman");
        c.args(["run", "--rm", "--name", name, "--runtime", "crun"]);
        // A cgroup namespace of its own, as containerd and CRI-O give every container on
        // cgroup v2 nodes: the host's /sys/fs/cgroup (hostPath) is then not at the namespace's
        // root, and droptrace must still find the real v2 root for its TNS programs.
        c.arg("--cgroupns=private");
        // This session's machine has no CAP_SYS_RESOURCE in its bounding set: podman would
        // raise RLIMIT_NOFILE/NPROC past the limits it runs with and crun fail. A kubelet
        // passes none; keep the limits we have.
        let (nofile, nproc) = (
            limit(libc::RLIMIT_NOFILE),
            limit(libc::RLIMIT_NPROC).min(32768),
        );
        c.arg(format!("--ulimit=nofile={nofile}:{nofile}"));
        c.arg(format!("--ulimit=nproc={nproc}:{nproc}"));
        c.arg(format!(
            "--user={}:{}",
            sc.run_as_user.expect("runAsUser"),
            sc.run_as_group.unwrap_or(0)
        ));
        let caps = sc.capabilities.as_ref().expect("capabilities");
        for d in caps.drop.iter().flatten() {
            c.arg(format!("--cap-drop={d}"));
        }
        for a in caps.add.iter().flatten() {
            c.arg(format!("--cap-add={a}"));
        }
        assert_ne!(sc.privileged, Some(true));
        if sc.read_only_root_filesystem == Some(true) {
            c.arg("--read-only");
        }
        if sc.allow_privilege_escalation == Some(false) {
            c.arg("--security-opt=no-new-privileges");
        }
        if seccomp {
            let p = sc.seccomp_profile.as_ref().expect("seccompProfile");
            match p.type_.as_str() {
                "Localhost" => {
                    let file = workspace_root()
                        .join("deploy/seccomp")
                        .join(p.localhost_profile.as_deref().expect("localhostProfile"));
                    c.arg(format!("--security-opt=seccomp={}", file.display()));
                }
                "Unconfined" => {
                    c.arg("--security-opt=seccomp=unconfined");
                }
                _ => {}
            }
        }
        if self.pod.host_network == Some(true) {
            c.arg("--network=host");
        }
        if self.pod.host_pid == Some(true) {
            c.arg("--pid=host");
        }
        let volumes = self.pod.volumes.clone().unwrap_or_default();
        for m in self.container.volume_mounts.iter().flatten() {
            let v = volumes.iter().find(|v| v.name == m.name).expect("volume");
            let source = match (&v.host_path, &v.empty_dir) {
                (Some(h), _) => PathBuf::from(&h.path),
                (None, Some(_)) => spool.to_path_buf(),
                _ => panic!("volume {} is neither hostPath nor emptyDir", v.name),
            };
            let ro = if m.read_only == Some(true) { ":ro" } else { "" };
            c.arg(format!(
                "--volume={}:{}{ro}",
                source.display(),
                m.mount_path
            ));
        }
        let node = crate::netns::sh(&["hostname"]);
        let env = self.env(String::from_utf8_lossy(&node.stdout).trim());
        for (k, v) in &env {
            c.arg(format!("--env={k}={v}"));
        }
        c.arg(image());
        for a in self.container.args.iter().flatten() {
            c.arg(expand(a, &env));
        }
        c.args(extra_args);
        c
    }
}

/// Kubernetes' `$(VAR)` expansion in args.
fn expand(arg: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = arg.to_string();
    for (k, v) in env {
        out = out.replace(&format!("$({k})"), v);
    }
    out
}

fn limit(resource: libc::__rlimit_resource_t) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    unsafe { libc::getrlimit(resource, &mut r) };
    r.rlim_cur.min(r.rlim_max)
}

/// `podman rm -f` on drop: a killed `podman run` client would leave its container running.
pub struct Removed(pub String);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = Command::new("podman")
            .args(["rm", "-f", "-t", "2", &self.0])
            .output();
    }
}
