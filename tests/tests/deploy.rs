//! The cluster deployment: the plain manifests in deploy/ and the Helm chart rendered by
//! `helm template`, read as typed Kubernetes objects. Unprivileged (any user); needs helm,
//! which `cargo xtask setup` puts in .tools/helm/ (or set DROPTRACE_HELM).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    process::Command,
};

use droptrace_tests::{deploy::capabilities, scratch_dir, workspace_root};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, Namespace, PodSpec, Probe, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize as _;
use serde_yaml::Value;

const NAMESPACE: &str = "droptrace";
const NAME: &str = "droptrace";
const CHART: &str = "deploy/helm/droptrace";
/// What droptrace reads from the API, and nothing else.
const READ_ONLY: [&str; 3] = ["get", "list", "watch"];
/// What `--k8s-events` does with events.events.k8s.io, and nothing else.
const EVENT_WRITES: [&str; 2] = ["create", "patch"];
const RESOURCES: [(&str, &str); 6] = [
    ("", "pods"),
    ("", "namespaces"),
    ("", "services"),
    ("", "nodes"),
    ("discovery.k8s.io", "endpointslices"),
    ("networking.k8s.io", "networkpolicies"),
];
/// Host paths the pod mounts (read-only), by volume name.
const HOST_PATHS: [(&str, &str); 3] = [
    ("btf", "/sys/kernel/btf"),
    ("tracefs", "/sys/kernel/tracing"),
    ("cgroup", "/sys/fs/cgroup"),
];

/// Every object of a set of manifests, by kind. Any other kind fails the parse: nothing
/// (a Role, a Service, a privileged Pod) slips in unchecked.
#[derive(Default)]
struct Objects {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    cluster_roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    config_maps: Vec<ConfigMap>,
    daemon_sets: Vec<DaemonSet>,
    /// The untyped documents, for checks over every field.
    raw: Vec<Value>,
}

/// The typed object, which must serialise back to the same document: the types ignore
/// fields they do not know, so a misspelt field (`readOnlyRootFileSystem`) shows up here.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value, origin: &str) -> T {
    let t: T = serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| panic!("{origin}: {e}"));
    let written: serde_json::Value = serde_yaml::from_value(doc.clone()).expect("YAML as JSON");
    let read = serde_json::to_value(&t).expect("serialise");
    if let Some(path) = first_difference(&written, &read, String::new()) {
        panic!("{origin}: {path} is not what Kubernetes reads (unknown field or wrong type?)");
    }
    t
}

/// Path of the first place where `a` has something `b` has not, or has otherwise.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, at: String) -> Option<String> {
    use serde_json::Value as J;
    match (a, b) {
        (J::Object(a), J::Object(b)) => a.iter().find_map(|(k, v)| match b.get(k) {
            Some(w) => first_difference(v, w, format!("{at}.{k}")),
            None => Some(format!("{at}.{k}")),
        }),
        (J::Array(a), J::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}[{i}]"))),
        _ => (a != b).then_some(at),
    }
}

impl Objects {
    fn add(&mut self, text: &str, origin: &str) {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let doc = Value::deserialize(doc).unwrap_or_else(|e| panic!("{origin}: {e}"));
            if doc.is_null() {
                continue; // an empty document (helm starts each file with `---`)
            }
            match doc["kind"].as_str().unwrap_or_default() {
                "Namespace" => self.namespaces.push(typed(&doc, origin)),
                "ServiceAccount" => self.service_accounts.push(typed(&doc, origin)),
                "ClusterRole" => self.cluster_roles.push(typed(&doc, origin)),
                "ClusterRoleBinding" => self.bindings.push(typed(&doc, origin)),
                "ConfigMap" => self.config_maps.push(typed(&doc, origin)),
                "DaemonSet" => self.daemon_sets.push(typed(&doc, origin)),
                other => panic!("{origin}: unexpected kind {other:?}"),
            }
            self.raw.push(doc);
        }
    }

    fn role(&self) -> &ClusterRole {
        one(&self.cluster_roles, "ClusterRole")
    }
    fn binding(&self) -> &ClusterRoleBinding {
        one(&self.bindings, "ClusterRoleBinding")
    }
    fn config_map(&self) -> &ConfigMap {
        one(&self.config_maps, "ConfigMap")
    }
    fn daemon_set(&self) -> &DaemonSet {
        one(&self.daemon_sets, "DaemonSet")
    }
    fn pod(&self) -> &PodSpec {
        let ds = self.daemon_set();
        ds.spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .expect("DaemonSet has a pod spec")
    }
    fn container(&self) -> &Container {
        let pod = self.pod();
        assert!(pod.init_containers.is_none(), "no init containers expected");
        one(&pod.containers, "container")
    }
}

fn one<'a, T>(items: &'a [T], what: &str) -> &'a T {
    assert_eq!(items.len(), 1, "expected exactly one {what}");
    &items[0]
}

/// deploy/*.yaml, in the order `kubectl apply -f deploy/` applies them (file name order).
fn plain_files() -> Vec<PathBuf> {
    let dir = workspace_root().join("deploy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| {
            p.is_file() && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
        })
        .collect();
    files.sort();
    files
}

fn plain() -> Objects {
    let mut o = Objects::default();
    for f in plain_files() {
        let text = std::fs::read_to_string(&f).expect("read manifest");
        o.add(&text, &f.display().to_string());
    }
    o
}

fn helm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("DROPTRACE_HELM") {
        return p.into();
    }
    let local = workspace_root().join(".tools/helm/helm");
    if local.is_file() {
        return local;
    }
    std::env::var_os("PATH")
        .and_then(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("helm"))
                .find(|h| h.is_file())
        })
        .expect(
            "helm not found: run `cargo xtask setup` (installs it in .tools/helm/) or set \
             DROPTRACE_HELM",
        )
}

/// `helm` with its cache and config kept out of the user's home.
fn helm_cmd(args: &[&str]) -> std::process::Output {
    let home = scratch_dir().join("helm");
    Command::new(helm_bin())
        .args(args)
        .current_dir(workspace_root())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("start helm")
}

/// `helm template RELEASE deploy/helm/droptrace --namespace NS EXTRA...`, parsed.
fn render(release: &str, namespace: &str, extra: &[&str]) -> Objects {
    let mut args = vec!["template", release, CHART, "--namespace", namespace];
    args.extend_from_slice(extra);
    let out = helm_cmd(&args);
    assert!(
        out.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut o = Objects::default();
    o.add(&String::from_utf8_lossy(&out.stdout), "helm template");
    o
}

fn assert_rbac(o: &Objects, name: &str, namespace: &str) {
    let role = o.role();
    assert_eq!(role.metadata.name.as_deref(), Some(name));
    assert!(role.aggregation_rule.is_none());
    let mut granted = BTreeSet::new();
    for rule in role.rules.as_deref().unwrap_or_default() {
        let verbs: BTreeSet<&str> = rule.verbs.iter().map(String::as_str).collect();
        let groups = rule.api_groups.as_deref().unwrap_or_default();
        let resources = rule.resources.as_deref().unwrap_or_default();
        if groups == ["events.k8s.io"] {
            // --k8s-events writes Events, and may do nothing else with them.
            assert_eq!(resources, ["events"], "{rule:?}");
            assert_eq!(verbs, BTreeSet::from(EVENT_WRITES), "verbs of {rule:?}");
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
            assert!(granted.insert(("events.k8s.io".to_string(), "events".to_string())));
            continue;
        }
        assert_eq!(verbs, BTreeSet::from(READ_ONLY), "verbs of {rule:?}");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for group in rule.api_groups.as_deref().unwrap_or_default() {
            for resource in rule.resources.as_deref().unwrap_or_default() {
                assert!(
                    granted.insert((group.clone(), resource.clone())),
                    "{group}/{resource} granted twice"
                );
            }
        }
    }
    let wanted: BTreeSet<(String, String)> = RESOURCES
        .iter()
        .chain([&("events.k8s.io", "events")])
        .map(|(g, r)| (g.to_string(), r.to_string()))
        .collect();
    assert_eq!(granted, wanted, "ClusterRole resources");

    let sa = one(&o.service_accounts, "ServiceAccount");
    assert_eq!(sa.metadata.name.as_deref(), Some(name));
    assert_eq!(sa.metadata.namespace.as_deref(), Some(namespace));
    let binding = o.binding();
    assert_eq!(binding.role_ref.api_group, "rbac.authorization.k8s.io");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(binding.role_ref.name, name);
    let subject = one(binding.subjects.as_deref().unwrap_or_default(), "subject");
    assert_eq!(
        (
            subject.kind.as_str(),
            subject.name.as_str(),
            subject.namespace.as_deref()
        ),
        ("ServiceAccount", name, Some(namespace))
    );
    assert_eq!(o.pod().service_account_name.as_deref(), Some(name));
}

/// `privileged: true` at any depth of any document.
fn privileged_anywhere(v: &Value) -> bool {
    match v {
        Value::Mapping(m) => m.iter().any(|(k, v)| {
            (k.as_str() == Some("privileged") && v.as_bool() == Some(true))
                || privileged_anywhere(v)
        }),
        Value::Sequence(s) => s.iter().any(privileged_anywhere),
        Value::Tagged(t) => privileged_anywhere(&t.value),
        _ => false,
    }
}

fn assert_security(o: &Objects, caps: &[String]) {
    for doc in &o.raw {
        assert!(!privileged_anywhere(doc), "privileged: true in {doc:?}");
    }
    let sc = o
        .container()
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(sc.privileged, Some(false));
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    // Capabilities are only effective for UID 0 (no ambient capabilities in Kubernetes).
    assert_eq!(sc.run_as_user, Some(0));
    let c = sc.capabilities.as_ref().expect("capabilities");
    assert_eq!(c.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(c.add.as_deref(), Some(caps), "capabilities.add");
    // bpf() under the runtimes' default seccomp profiles (tests/tests/container.rs).
    let sp = sc.seccomp_profile.as_ref().expect("seccompProfile");
    assert_eq!(sp.type_, "Localhost");
    assert_eq!(sp.localhost_profile.as_deref(), Some("droptrace.json"));
    let pod = o.pod();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.host_pid, Some(true));
    assert_ne!(pod.host_ipc, Some(true));
}

fn assert_scheduling(o: &Objects) {
    let pod = o.pod();
    let tolerations = pod.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "a toleration of every taint (operator: Exists, no key, no effect): {tolerations:?}"
    );
    let res = o.container().resources.as_ref().expect("resources");
    for (what, set) in [("requests", &res.requests), ("limits", &res.limits)] {
        let set = set.as_ref().unwrap_or_else(|| panic!("resources.{what}"));
        for r in ["cpu", "memory"] {
            assert!(set.contains_key(r), "resources.{what}.{r}");
        }
    }
}

/// Port number of the container port named `metrics`.
fn metrics_port(c: &Container) -> i32 {
    c.ports
        .as_deref()
        .unwrap_or_default()
        .iter()
        .find(|p| p.name.as_deref() == Some("metrics"))
        .expect("a container port named metrics")
        .container_port
}

fn assert_probe(probe: Option<&Probe>, path: &str, port: i32) {
    let get = probe
        .and_then(|p| p.http_get.as_ref())
        .unwrap_or_else(|| panic!("httpGet probe on {path}"));
    assert_eq!(get.path.as_deref(), Some(path));
    match &get.port {
        IntOrString::String(name) => assert_eq!(name, "metrics"),
        IntOrString::Int(n) => assert_eq!(*n, port),
    }
}

fn config_data(o: &Objects) -> &BTreeMap<String, String> {
    o.config_map().data.as_ref().expect("ConfigMap data")
}

/// Probes on the metrics port, the metrics flag serving that port, NODE_NAME from the
/// downward API, and every flag wired through: each `$(VAR)` in the arguments is an env
/// var, each env var from the ConfigMap names a key it has, and each key is used.
fn assert_wiring(o: &Objects) {
    let c = o.container();
    let port = metrics_port(c);
    assert_probe(c.readiness_probe.as_ref(), "/readyz", port);
    assert_probe(c.liveness_probe.as_ref(), "/healthz", port);

    let data = config_data(o);
    let metrics = data.get("metrics").expect("ConfigMap key metrics");
    assert!(
        metrics.ends_with(&format!(":{port}")),
        "ConfigMap metrics {metrics:?} must serve the probes' port {port}"
    );

    let env = c.env.as_deref().unwrap_or_default();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from.as_ref()?.field_ref.as_ref())
        .expect("NODE_NAME from a fieldRef");
    assert_eq!(node.field_path, "spec.nodeName");

    let cm_name = o.config_map().metadata.name.as_deref();
    let mut used_keys = BTreeSet::new();
    for e in env {
        if let Some(r) = e
            .value_from
            .as_ref()
            .and_then(|v| v.config_map_key_ref.as_ref())
        {
            assert_eq!(
                Some(r.name.as_str()),
                cm_name,
                "env {} names another ConfigMap",
                e.name
            );
            assert!(
                data.contains_key(&r.key),
                "env {}: no ConfigMap key {}",
                e.name,
                r.key
            );
            assert_ne!(
                r.optional,
                Some(true),
                "flag {} must not be optional",
                r.key
            );
            used_keys.insert(r.key.as_str());
        }
    }
    let keys: BTreeSet<&str> = data.keys().map(String::as_str).collect();
    assert_eq!(used_keys, keys, "every ConfigMap key reaches the container");

    let args = c.args.as_deref().unwrap_or_default();
    assert_eq!(args.first().map(String::as_str), Some("run"));
    let names: BTreeSet<&str> = env.iter().map(|e| e.name.as_str()).collect();
    for arg in args {
        let mut rest = arg.as_str();
        while let Some(start) = rest.find("$(") {
            let end = rest[start..].find(')').expect("closed $(") + start;
            let var = &rest[start + 2..end];
            assert!(names.contains(var), "argument {arg} uses undefined ${var}");
            rest = &rest[end..];
        }
    }
    assert!(
        args.contains(&"--metrics=$(DROPTRACE_METRICS)".to_string()),
        "{args:?}"
    );
    for flag in ["--ports=", "--format=", "--output="] {
        assert!(
            args.iter().any(|a| a.starts_with(flag)),
            "{flag} in {args:?}"
        );
    }
}

fn assert_volumes(o: &Objects) {
    let pod = o.pod();
    let volumes = pod.volumes.as_deref().unwrap_or_default();
    let mounts = o.container().volume_mounts.as_deref().unwrap_or_default();
    let mut host_paths = BTreeMap::new();
    // The spool is written: an emptyDir, or by choice (chart value) a host directory.
    for v in volumes.iter().filter(|v| v.name != "spool") {
        if let Some(h) = &v.host_path {
            host_paths.insert(v.name.as_str(), h.path.as_str());
            for m in mounts.iter().filter(|m| m.name == v.name) {
                assert_eq!(
                    m.read_only,
                    Some(true),
                    "host path {} mounted writable",
                    h.path
                );
            }
        }
    }
    assert_eq!(
        host_paths,
        BTreeMap::from(HOST_PATHS),
        "host paths (none other: hostPID already shows /proc)"
    );
    let spool = volumes
        .iter()
        .find(|v| v.name == "spool")
        .expect("spool volume");
    assert!(
        spool.empty_dir.is_some() || spool.host_path.is_some(),
        "spool is an emptyDir or a host directory"
    );
    let spool_mount = mounts
        .iter()
        .find(|m| m.name == "spool")
        .expect("spool mounted");
    assert_ne!(spool_mount.read_only, Some(true), "the spool is written");
    let args = o.container().args.as_deref().unwrap_or_default();
    assert!(
        args.contains(&format!("--spool-dir={}", spool_mount.mount_path)),
        "--spool-dir points at the spool mount: {args:?}"
    );
    for m in mounts {
        assert!(
            volumes.iter().any(|v| v.name == m.name),
            "mount of undefined volume {}",
            m.name
        );
    }
}

fn assert_all(o: &Objects, name: &str, namespace: &str, caps: &[String]) {
    assert_rbac(o, name, namespace);
    assert_security(o, caps);
    assert_scheduling(o);
    assert_wiring(o);
    assert_volumes(o);
    for (what, ns) in [
        (
            "ServiceAccount",
            &one(&o.service_accounts, "ServiceAccount")
                .metadata
                .namespace,
        ),
        ("ConfigMap", &o.config_map().metadata.namespace),
        ("DaemonSet", &o.daemon_set().metadata.namespace),
    ] {
        assert_eq!(ns.as_deref(), Some(namespace), "{what} namespace");
    }
}

#[test]
fn capability_list_is_well_formed() {
    let caps = capabilities();
    assert!(!caps.is_empty());
    let unique: BTreeSet<&String> = caps.iter().collect();
    assert_eq!(unique.len(), caps.len(), "duplicates in {caps:?}");
    for c in &caps {
        assert!(
            !c.starts_with("CAP_") && c.chars().all(|ch| ch.is_ascii_uppercase() || ch == '_'),
            "{c}: Kubernetes spelling (BPF, not CAP_BPF or bpf)"
        );
    }
    // SYS_ADMIN would make the narrow list pointless; ALL is for drop only.
    for forbidden in ["SYS_ADMIN", "ALL"] {
        assert!(
            !caps.iter().any(|c| c == forbidden),
            "{forbidden} in {caps:?}"
        );
    }
    for needed in ["BPF", "PERFMON"] {
        assert!(caps.iter().any(|c| c == needed), "{needed} missing");
    }
    // The chart reads the file inside it; deploy/capabilities.txt must be that same file.
    let chart_copy = workspace_root().join(CHART).join("capabilities.txt");
    assert_eq!(
        std::fs::canonicalize(droptrace_tests::deploy::capabilities_file()).unwrap(),
        std::fs::canonicalize(chart_copy).unwrap()
    );
}

#[test]
fn plain_manifests_are_read_only_unprivileged_and_wired() {
    let o = plain();
    let caps = capabilities();
    let add = o
        .container()
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.add.clone())
        .unwrap_or_default();
    assert_eq!(
        add,
        caps,
        "deploy/40-daemonset.yaml disagrees with deploy/capabilities.txt; make its line\n              add: [{}]",
        caps.join(", ")
    );
    assert_all(&o, NAME, NAMESPACE, &caps);
    let ns = one(&o.namespaces, "Namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some(NAMESPACE));
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("pod-security.kubernetes.io/enforce")
            .map(String::as_str),
        Some("privileged"),
        "hostNetwork/hostPID/hostPath pods are rejected below the privileged level"
    );
}

#[test]
fn namespace_comes_first_for_kubectl_apply() {
    let first = plain_files().into_iter().next().expect("manifests");
    let mut o = Objects::default();
    o.add(&std::fs::read_to_string(&first).unwrap(), "first file");
    assert_eq!(
        o.raw.len(),
        o.namespaces.len(),
        "{} must hold only the Namespace: kubectl apply -f deploy/ goes in file name order",
        first.display()
    );
}

#[test]
fn image_tag_is_the_workspace_version() {
    let version = env!("CARGO_PKG_VERSION");
    let o = plain();
    let image = o.container().image.clone().unwrap_or_default();
    assert!(image.ends_with(&format!(":{version}")), "{image}");
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(workspace_root().join(CHART).join("Chart.yaml")).unwrap(),
    )
    .unwrap();
    assert_eq!(chart["appVersion"].as_str(), Some(version));
    // `cargo xtask image` tags what the manifests pull.
    let xtask = std::fs::read_to_string(workspace_root().join("xtask/src/image.rs")).unwrap();
    let repo = image.rsplit_once(':').unwrap().0;
    assert!(
        xtask.contains(&format!("\"{repo}\"")),
        "xtask image tags {repo}"
    );
}

#[test]
fn helm_default_render_equals_the_plain_manifests() {
    let h = render(NAME, NAMESPACE, &[]);
    let p = plain();
    assert_all(&h, NAME, NAMESPACE, &capabilities());
    // Helm cannot create the namespace it stores the release in (docs/deploy.md).
    assert!(h.namespaces.is_empty());
    assert_eq!(h.role().rules, p.role().rules);
    assert_eq!(h.binding().role_ref, p.binding().role_ref);
    assert_eq!(h.binding().subjects, p.binding().subjects);
    assert_eq!(config_data(&h), config_data(&p));
    let (hs, ps) = (
        h.daemon_set().spec.as_ref().unwrap(),
        p.daemon_set().spec.as_ref().unwrap(),
    );
    assert_eq!(hs.selector, ps.selector);
    assert_eq!(hs.update_strategy, ps.update_strategy);
    assert_eq!(
        hs.template.metadata.as_ref().unwrap().labels,
        ps.template.metadata.as_ref().unwrap().labels
    );
    assert_eq!(
        h.pod(),
        p.pod(),
        "pod spec: chart defaults vs deploy/40-daemonset.yaml"
    );
    let annotations = |o: &Objects| {
        o.daemon_set()
            .spec
            .as_ref()
            .unwrap()
            .template
            .metadata
            .as_ref()
            .unwrap()
            .annotations
            .clone()
            .unwrap_or_default()
    };
    let (ha, pa) = (annotations(&h), annotations(&p));
    for (k, v) in &pa {
        assert_eq!(ha.get(k), Some(v), "pod annotation {k}");
    }
}

#[test]
fn helm_values_reach_the_objects() {
    let h = render(
        "dt",
        "monitoring",
        &[
            "--set",
            "outputs={-,https://siem.example:9200/_bulk}",
            "--set",
            "metrics.port=9999",
            "--set",
            "ports={1521,1630}",
            "--set",
            "format=ecs",
            "--set",
            "capabilities={BPF,PERFMON,NET_ADMIN}",
            "--set",
            "extraArgs={--all-tcp}",
            "--set",
            "image.tag=test",
            "--set",
            "nodeSelector.pool=db",
            "--set",
            "resources.limits.memory=1Gi",
            "--set",
            "extraVolumes[0].name=siem-tls,extraVolumes[0].secret.secretName=siem-tls",
            "--set",
            "extraVolumeMounts[0].name=siem-tls,extraVolumeMounts[0].mountPath=/etc/tls",
            "--set",
            "spool.hostPath=/var/lib/droptrace/spool",
        ],
    );
    let caps: Vec<String> = ["BPF", "PERFMON", "NET_ADMIN"].map(String::from).to_vec();
    assert_all(&h, "dt", "monitoring", &caps);
    let data = config_data(&h);
    assert_eq!(data["ports"], "1521,1630");
    assert_eq!(data["format"], "ecs");
    assert_eq!(data["output-0"], "-");
    assert_eq!(data["output-1"], "https://siem.example:9200/_bulk");
    assert_eq!(data["metrics"], "0.0.0.0:9999");
    let c = h.container();
    assert_eq!(metrics_port(c), 9999);
    let args = c.args.as_deref().unwrap();
    for a in ["--output=$(DROPTRACE_OUTPUT_1)", "--all-tcp"] {
        assert!(args.contains(&a.to_string()), "{a} in {args:?}");
    }
    assert!(c.image.as_deref().unwrap().ends_with(":test"));
    assert_eq!(
        h.pod()
            .node_selector
            .as_ref()
            .unwrap()
            .get("pool")
            .map(String::as_str),
        Some("db")
    );
    let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "1Gi");
    let tls = h
        .pod()
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == "siem-tls");
    assert_eq!(
        tls.and_then(|v| v.secret.as_ref()?.secret_name.as_deref()),
        Some("siem-tls")
    );
    let spool = h
        .pod()
        .volumes
        .as_deref()
        .unwrap()
        .iter()
        .find(|v| v.name == "spool");
    assert_eq!(
        spool.and_then(|v| Some(v.host_path.as_ref()?.path.as_str())),
        Some("/var/lib/droptrace/spool")
    );
    let mounts = c.volume_mounts.as_deref().unwrap();
    assert!(
        mounts
            .iter()
            .any(|m| m.name == "siem-tls" && m.mount_path == "/etc/tls")
    );
}

#[test]
fn helm_lint_passes() {
    let out = helm_cmd(&["lint", CHART, "--strict", "--namespace", NAMESPACE]);
    assert!(
        out.status.success(),
        "helm lint: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dockerfile_runs_droptrace_as_a_non_root_user_by_default() {
    let text = std::fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    let last_from = lines
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("FROM");
    let runtime = &lines[last_from..];
    assert!(
        runtime[0].starts_with("FROM debian:bookworm-slim"),
        "{}",
        runtime[0]
    );
    let user = runtime
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER in the runtime stage");
    let uid = user.split(':').next().unwrap();
    assert!(uid != "0" && uid != "root", "USER {user}");
    assert!(
        runtime.contains(&r#"ENTRYPOINT ["droptrace"]"#),
        "{runtime:?}"
    );
    assert!(runtime.contains(&r#"CMD ["run"]"#), "{runtime:?}");
    assert!(
        text.contains("cargo xtask build --release"),
        "the image builds with the project's own build chain"
    );
}

/// deploy/seccomp/droptrace.json is the runtime default profile (containers-common's, where
/// installed) with exactly bpf() and perf_event_open() allowed: nothing else is opened.
#[test]
fn seccomp_profile_is_the_default_plus_bpf_and_perf_event_open() {
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let ours = read(&workspace_root().join("deploy/seccomp/droptrace.json"));
    let chart = read(&workspace_root().join("deploy/helm/droptrace/seccomp/droptrace.json"));
    assert_eq!(ours, chart, "deploy/seccomp links the chart's profile");
    let opened = ["bpf", "perf_event_open"];
    let rules = ours["syscalls"].as_array().unwrap();
    let mentions = |r: &serde_json::Value| {
        r["names"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| opened.contains(&n.as_str().unwrap()))
    };
    let allow: Vec<_> = rules.iter().filter(|r| mentions(r)).collect();
    assert_eq!(allow.len(), 1, "one rule names them: {allow:?}");
    assert_eq!(allow[0]["action"], "SCMP_ACT_ALLOW");
    assert_eq!(allow[0]["names"], serde_json::json!(opened));
    assert!(allow[0]["args"].as_array().is_none_or(|a| a.is_empty()));
    assert!(
        allow[0]["includes"]
            .as_object()
            .is_none_or(|m| m.is_empty())
    );
    let default = std::path::Path::new("/usr/share/containers/seccomp.json");
    if !default.exists() {
        return;
    }
    // The same profile once those two names are taken out of both.
    let strip = |v: &serde_json::Value| -> serde_json::Value {
        let mut v = v.clone();
        let rules: Vec<_> = v["syscalls"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|r| {
                let mut r = r.clone();
                let names: Vec<_> = r["names"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|n| !opened.contains(&n.as_str().unwrap()))
                    .cloned()
                    .collect();
                (!names.is_empty()).then(|| {
                    r["names"] = serde_json::json!(names);
                    r
                })
            })
            .collect();
        v["syscalls"] = serde_json::json!(rules);
        v
    };
    assert_eq!(strip(&ours), strip(&read(default)));
}
