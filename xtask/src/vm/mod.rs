//! `cargo xtask test-kernels`: the privileged e2e tests inside VMs booting Debian's kernels
//! (5.10, 6.1, 6.12, the newest). Each kernel is fetched (cached), booted under qemu TCG with
//! no NIC on the host's own root (read-only 9p, tmpfs overlay: the same droptrace, test
//! binaries, iptables, hping3 and .venv python-oracledb as the host suite), runs `droptrace
//! check`, attaches every hook once, runs the planned tests, and powers off. One line per
//! kernel and test is printed; target/vm/results.json keeps the run; a kernel's leg that ran
//! every test is kept as its column of the README's compatibility table (see `table`).
mod btf_min;
pub(crate) mod guest;
mod initramfs;
pub(crate) mod kernels;
mod qemu;
mod table;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::{cargo, step, workspace_root};

/// The full matrix: Debian 11's, 12's and 13's kernels and the newest Debian builds.
pub(crate) const MATRIX: &[&str] = &["5.10", "6.1", "6.12", "newest"];
/// What CI runs inside VMs after the host suite (`cargo xtask test`).
pub(crate) const CI_KERNELS: &[&str] = &["5.10", "6.1"];
/// The core subset: the sqlplus stall, the Service path, the listener redirect.
pub(crate) const CORE: &[(&str, &str)] = &[
    ("stalls", "sqlplus_stall_is_one_incident"),
    ("stalls", "service_ip_dnat"),
    ("oracle", "sqlplus_stall_on_redirected_port"),
];
/// e2e targets the VMs do not run: `deploy` never touches the kernel (manifests and Helm
/// rendering); `container` builds an OCI image with cargo and runs it under podman, which
/// tests the runtime's seccomp profile rather than the kernel, and would build for an hour
/// under emulation.
const HOST_ONLY_TARGETS: &[&str] = &["deploy", "container"];
/// Programs every kernel of the matrix must load and attach (the conntrack-removal hook is
/// one of two programs, see `REMOVAL_PROGRAMS`).
pub(crate) const PROGRAMS: &[&str] = &[
    "inet_sock_set_state",
    "tcp_retransmit_skb",
    "tns_ingress",
    "tns_egress",
];
/// fentry where the function is in vmlinux's BTF, kprobe where conntrack is a module.
pub(crate) const REMOVAL_PROGRAMS: &[&str] = &["nf_ct_delete", "nf_ct_delete_kprobe"];
/// The drop hook: the BTF tracepoint where the kernel's hook prototype carries the reason
/// (6.1+), the classic tracepoint otherwise (5.10) or when the first is refused.
pub(crate) const DROP_PROGRAMS: &[&str] = &["kfree_skb_btf", "kfree_skb"];
const TEST_TIMEOUT_SECS: u64 = 300;
/// Tracepoints whose record formats droptrace reads (copied out of each guest).
pub(crate) const FORMATS: &[(&str, &str)] = &[
    ("skb", "kfree_skb"),
    ("sock", "inet_sock_set_state"),
    ("tcp", "tcp_retransmit_skb"),
];
/// The BTF types droptrace resolves (tracer-user/src/collect): kept in the fixtures.
const BTF_ROOTS: &[&str] = &[
    "sk_buff",
    "net_device",
    "sock",
    "tcp_sock",
    "net",
    "nf_conn",
    "nf_conntrack_tuple_hash",
    "nf_conntrack_tuple",
    "skb_drop_reason",
    "ip_conntrack_status",
    "ip_conntrack_info",
    "nf_ct_delete",
];
/// Where `--save-fixtures` writes each kernel's facts for the host-only unit tests.
const FIXTURES: &str = "tracer-user/tests/fixtures/kernels";

pub(crate) struct Options {
    pub kernels: Vec<String>,
    /// Only the core subset.
    pub core: bool,
    /// Only tests whose `target::name` contains one of these.
    pub filters: Vec<String>,
    pub refresh: bool,
    pub memory_mib: u32,
    pub cpus: u32,
    /// Write each kernel's (minimized) BTF and tracepoint formats to FIXTURES.
    pub save_fixtures: bool,
}

impl Options {
    pub(crate) fn matrix() -> Self {
        Self {
            kernels: MATRIX.iter().map(|s| s.to_string()).collect(),
            core: false,
            filters: Vec::new(),
            refresh: false,
            memory_mib: 2048,
            cpus: 2,
            save_fixtures: false,
        }
    }

    /// Every test ran (no `--core`, no `--test`): each kernel's leg is a matrix column.
    fn runs_every_test(&self) -> bool {
        !self.core && self.filters.is_empty()
    }
}

/// What the guest reads from /vm/out/plan.json.
#[derive(Serialize, Deserialize)]
pub(crate) struct Plan {
    pub droptrace: PathBuf,
    pub python: PathBuf,
    pub workspace: PathBuf,
    pub ci: String,
    pub test_timeout_secs: u64,
    pub tests: Vec<PlannedTest>,
}

#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct PlannedTest {
    pub target: String,
    pub name: String,
    pub binary: PathBuf,
}

/// Where kernels, initramfs images and run outputs are kept (DROPTRACE_VM_CACHE overrides).
pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("DROPTRACE_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/vm"))
}

/// Whether this machine can run the VM legs at all; the reason when it cannot.
pub(crate) fn unavailable() -> Option<String> {
    if !crate::setup::on_path(qemu::QEMU) {
        return Some(format!(
            "{} is not installed (`sudo cargo xtask setup` installs qemu-system-x86)",
            qemu::QEMU
        ));
    }
    if !crate::is_root() {
        return Some(
            "the VM legs need root (the guest reads the host's whole / over 9p)".to_string(),
        );
    }
    None
}

/// The e2e test executables, built without running them: (target name, path).
fn build_test_binaries() -> anyhow::Result<Vec<(String, PathBuf)>> {
    step("building the e2e test binaries (cargo test -p droptrace-tests --no-run)");
    let out = cargo()
        .args([
            "test",
            "--package",
            "droptrace-tests",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the e2e tests failed");
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if v["reason"] == "compiler-artifact"
            && v["profile"]["test"] == true
            && v["target"]["kind"][0] == "test"
            && let (Some(name), Some(exe)) =
                (v["target"]["name"].as_str(), v["executable"].as_str())
        {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if bins.is_empty() {
        bail!("cargo test --no-run reported no e2e test executables");
    }
    Ok(bins)
}

fn list_tests(binary: &Path) -> anyhow::Result<Vec<String>> {
    let out = Command::new(binary)
        .args(["--list", "--format", "terse"])
        .output()
        .with_context(|| format!("{} --list", binary.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect())
}

fn plan_tests(opts: &Options) -> anyhow::Result<Vec<PlannedTest>> {
    let bins = build_test_binaries()?;
    let mut tests = Vec::new();
    for (target, binary) in &bins {
        if HOST_ONLY_TARGETS.contains(&target.as_str()) {
            continue;
        }
        for name in list_tests(binary)? {
            let full = format!("{target}::{name}");
            let wanted = if opts.core {
                CORE.contains(&(target.as_str(), name.as_str()))
            } else {
                true
            } && (opts.filters.is_empty()
                || opts.filters.iter().any(|f| full.contains(f)));
            if wanted {
                tests.push(PlannedTest {
                    target: target.clone(),
                    name,
                    binary: binary.clone(),
                });
            }
        }
    }
    if opts.core {
        for (target, name) in CORE {
            if !tests.iter().any(|t| t.target == *target && t.name == *name) {
                bail!("core test {target}::{name} not found in the e2e binaries");
            }
        }
    }
    if tests.is_empty() {
        bail!("no e2e test matches {:?}", opts.filters);
    }
    tests.sort_by(|a, b| (&a.target, &a.name).cmp(&(&b.target, &b.name)));
    Ok(tests)
}

/// One kernel's leg as the guest reported it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(crate) struct KernelRun {
    pub spec: String,
    pub release: String,
    pub version: String,
    pub attempts: u32,
    pub secs: f64,
    pub error: Option<String>,
    pub check: Value,
    pub hooks: Value,
    pub tests: Vec<Value>,
    /// Why this leg failed (empty: passed).
    pub failures: Vec<String>,
}

impl KernelRun {
    fn new(spec: &str) -> Self {
        Self {
            spec: spec.to_string(),
            release: String::new(),
            version: String::new(),
            attempts: 0,
            secs: 0.0,
            error: None,
            check: Value::Null,
            hooks: Value::Null,
            tests: Vec::new(),
            failures: Vec::new(),
        }
    }

    /// The leg's own assertions on top of each test's: `check` passes, every program loads
    /// and attaches, droptrace stops cleanly, every planned test passed.
    fn evaluate(&mut self, planned: &[PlannedTest], done: bool) {
        let mut f = Vec::new();
        if let Some(e) = &self.error {
            // Nothing ran: the rest would only repeat it.
            self.failures = vec![e.clone()];
            return;
        }
        if !done && self.error.is_none() {
            f.push("the guest stopped before finishing its plan".into());
        }
        if self.check["report"]["ok"] != true {
            f.push(format!("droptrace check failed: {}", self.check));
        }
        let programs: Vec<&str> = self.hooks["programs"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for p in PROGRAMS {
            if !programs.contains(p) {
                f.push(format!("program {p} did not attach"));
            }
        }
        if !REMOVAL_PROGRAMS.iter().any(|p| programs.contains(p)) {
            f.push("no conntrack-removal program attached".into());
        }
        if !DROP_PROGRAMS.iter().any(|p| programs.contains(p)) {
            f.push("no skb:kfree_skb program attached".into());
        }
        if self.hooks["exit"] != 0 {
            f.push(format!(
                "droptrace run did not stop cleanly on SIGINT (exit {}, after {} s)",
                self.hooks["exit"], self.hooks["stop_secs"]
            ));
        }
        for t in planned {
            match self
                .tests
                .iter()
                .find(|r| r["target"] == t.target.as_str() && r["name"] == t.name.as_str())
            {
                None => f.push(format!("{}::{}: not run", t.target, t.name)),
                Some(r) if r["status"] != "pass" => f.push(format!(
                    "{}::{}: {} {}",
                    t.target,
                    t.name,
                    r["status"].as_str().unwrap_or("?"),
                    r["failure"].as_str().unwrap_or("")
                )),
                Some(_) => {}
            }
        }
        self.failures = f;
    }
}

impl KernelRun {
    /// Why this leg failed, in one line (its first failure's first line, and how many more);
    /// None when it passed.
    fn one_line(&self) -> Option<String> {
        let first = self.failures.first()?;
        let k = if self.release.is_empty() {
            &self.spec
        } else {
            &self.release
        };
        let mut line: String = first
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        if self.failures.len() > 1 {
            line.push_str(&format!(" (and {} more)", self.failures.len() - 1));
        }
        Some(format!("{k}: {line}"))
    }
}

fn read_results(path: &Path, run: &mut KernelRun) -> bool {
    let mut done = false;
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        match v["step"].as_str() {
            Some("boot") => run.release = v["kernel"].as_str().unwrap_or("").to_string(),
            Some("check") => run.check = v,
            Some("hooks") => run.hooks = v,
            Some("test") => run.tests.push(v),
            Some("error") => run.error = v["error"].as_str().map(str::to_string),
            Some("done") => done = true,
            _ => {}
        }
    }
    done
}

fn leg(
    opts: &Options,
    apt: &kernels::Apt,
    candidates: &[kernels::Candidate],
    spec: &str,
    tests: &[PlannedTest],
    droptrace: &Path,
) -> KernelRun {
    let mut run = KernelRun::new(spec);
    let t0 = Instant::now();
    let result = (|| -> anyhow::Result<bool> {
        let c = kernels::select(candidates, spec).with_context(|| {
            format!("no Debian kernel package matches {spec:?} in the configured suites")
        })?;
        run.release = c.release.clone();
        run.version = c.version.clone();
        let cache = cache_dir();
        let k = kernels::prepare(apt, &cache, c)?;
        let initrd = initramfs::build(&k)?;
        let out = cache.join("runs").join(&k.release);
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out)?;
        let plan = Plan {
            droptrace: droptrace.to_path_buf(),
            python: crate::setup::venv_python(),
            workspace: workspace_root(),
            ci: std::env::var("CI").unwrap_or_default(),
            test_timeout_secs: TEST_TIMEOUT_SECS,
            tests: tests.to_vec(),
        };
        fs::write(out.join("plan.json"), serde_json::to_vec_pretty(&plan)?)?;
        let guest = std::env::current_exe()?;
        step(&format!(
            "kernel {}: booting (qemu TCG, {} vCPUs, {} MiB, no NIC); {} tests",
            k.release,
            opts.cpus,
            opts.memory_mib,
            tests.len()
        ));
        let limit = Duration::from_secs(600 + tests.len() as u64 * TEST_TIMEOUT_SECS);
        let spec = qemu::Spec {
            kernel: &k,
            initrd: &initrd,
            out: &out,
            guest: &guest,
            memory_mib: opts.memory_mib,
            cpus: opts.cpus,
        };
        run.attempts = qemu::run(&spec, limit)?;
        let done = read_results(&out.join("results.jsonl"), &mut run);
        if opts.save_fixtures {
            save_fixtures(&out.join("kernel"), &k.release)?;
        }
        if !done {
            run.error = Some(format!(
                "the guest stopped early; console:\n{}",
                qemu::console_tail(&out.join("console.log"), 30)
            ));
        }
        Ok(done)
    })();
    let done = match result {
        Ok(d) => d,
        Err(e) => {
            run.error = Some(format!("{e:#}"));
            false
        }
    };
    run.secs = (t0.elapsed().as_secs_f64() * 10.0).round() / 10.0;
    run.evaluate(tests, done);
    run
}

/// The kernel's facts from the guest, BTF cut down to what droptrace resolves, into
/// FIXTURES/RELEASE.
fn save_fixtures(facts: &Path, release: &str) -> anyhow::Result<()> {
    let dir = workspace_root().join(FIXTURES).join(release);
    fs::create_dir_all(&dir)?;
    let vmlinux = fs::read(facts.join("vmlinux.btf")).context("the guest copied no BTF")?;
    let module = fs::read(facts.join("nf_conntrack.btf")).ok();
    let (base, split) = btf_min::minimize(&vmlinux, module.as_deref(), BTF_ROOTS)?;
    fs::write(dir.join("vmlinux.btf"), base)?;
    if let Some(split) = split {
        fs::write(dir.join("nf_conntrack.btf"), split)?;
    }
    for (_, name) in FORMATS {
        let f = format!("{name}.format");
        fs::write(dir.join(&f), fs::read(facts.join(&f))?)?;
    }
    step(&format!("fixtures of {release}: {}", dir.display()));
    Ok(())
}

/// One line per kernel and test.
fn print(run: &KernelRun) {
    let k = if run.release.is_empty() {
        &run.spec
    } else {
        &run.release
    };
    let verdict = if run.failures.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    println!(
        "{k:<24} {verdict} leg ({:.0} s, boot attempts {})",
        run.secs, run.attempts
    );
    if let Some(e) = &run.error {
        println!("{k:<24} FAIL {e}");
        return;
    }
    let check = if run.check["report"]["ok"] == true {
        "ok"
    } else {
        "FAIL"
    };
    println!("{k:<24} {check:<4} droptrace check");
    let programs: Vec<&str> = run.hooks["programs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!(
        "{k:<24} {:<4} hooks attached in {} s: {}",
        if run.hooks["ok"] == true {
            "ok"
        } else {
            "FAIL"
        },
        run.hooks["attach_secs"],
        programs.join(" ")
    );
    for t in &run.tests {
        println!(
            "{k:<24} {:<4} {}::{} ({} s)",
            t["status"].as_str().unwrap_or("?"),
            t["target"].as_str().unwrap_or(""),
            t["name"].as_str().unwrap_or(""),
            t["secs"]
        );
    }
    for f in &run.failures {
        println!("{k:<24} FAIL {f}");
    }
}

pub(crate) fn run(opts: &Options, droptrace: &Path) -> anyhow::Result<Vec<KernelRun>> {
    if let Some(why) = unavailable() {
        bail!("cannot run the VM legs: {why}");
    }
    let tests = plan_tests(opts)?;
    let cache = cache_dir();
    fs::create_dir_all(&cache)?;
    let apt = kernels::Apt::new(&cache)?;
    apt.update(opts.refresh)?;
    let mut candidates = apt.candidates()?;
    if opts
        .kernels
        .iter()
        .any(|s| kernels::select(&candidates, s).is_none())
    {
        // A kernel not in lists fetched earlier today: fetch them again once.
        apt.update(true)?;
        candidates = apt.candidates()?;
    }
    let t0 = Instant::now();
    let mut runs = Vec::new();
    let source = table::Source::of_this_tree();
    for spec in &opts.kernels {
        let r = leg(opts, &apt, &candidates, spec, &tests, droptrace);
        print(&r);
        if opts.runs_every_test() {
            // The leg is this kernel's column until the next full leg on it.
            table::save_column(&cache, &r, &source)?;
        }
        runs.push(r);
    }
    let total = t0.elapsed().as_secs_f64();
    let report = json!({
        "date": crate::today(),
        "secs": total.round(),
        "core": opts.core,
        "filters": opts.filters,
        "kernels": runs,
    });
    let path = cache.join("results.json");
    fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    step(&format!(
        "VM legs: {} kernel(s) in {:.0} s; results in {}",
        runs.len(),
        total,
        path.display()
    ));
    if opts.runs_every_test() {
        match table::update_readme(&cache)? {
            table::Update::Rewritten => step(
                "README.md: kernel compatibility table rewritten from each matrix kernel's last full leg",
            ),
            table::Update::Missing(specs) => step(&format!(
                "README.md not rewritten: no full leg yet for {} (run `cargo xtask test-kernels --kernel ...`)",
                specs.join(", ")
            )),
        }
    }
    let failed: Vec<String> = runs.iter().filter_map(KernelRun::one_line).collect();
    if !failed.is_empty() {
        bail!("VM legs failed: {}", failed.join("; "));
    }
    Ok(runs)
}
