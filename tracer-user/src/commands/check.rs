//! Can tracing work here? Shared by `droptrace check` and the start of `droptrace run`.
use std::path::PathBuf;

use serde::Serialize;

use crate::{
    collect::{
        self,
        collector::{self, Collector as _},
        drops,
    },
    kernel::{
        btf::{KernelBtf, VMLINUX},
        caps, tracefs,
    },
};

/// Capabilities `run` needs, each proven necessary by tests/tests/privileges.rs (the same list
/// as deploy/capabilities.txt): BPF to load, PERFMON to attach tracepoints and read kernel
/// memory, NET_ADMIN for the cgroup_skb programs, SYSLOG for kallsyms addresses (drop
/// locations), DAC_READ_SEARCH for the root-only tracefs.
pub const REQUIRED_CAPS: [u32; 5] = [
    caps::CAP_BPF,
    caps::CAP_PERFMON,
    caps::CAP_NET_ADMIN,
    caps::CAP_SYSLOG,
    caps::CAP_DAC_READ_SEARCH,
];

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// Required for tracing (false: a feature is degraded but tracing runs).
    pub required: bool,
    pub detail: String,
}

#[derive(Serialize)]
pub struct Report {
    pub kernel: String,
    pub ok: bool,
    pub checks: Vec<Check>,
    #[serde(skip)]
    pub tracefs: Option<PathBuf>,
    /// Every layout and name table, when the required checks passed: `run` starts from it.
    #[serde(skip)]
    pub resolved: Option<collect::Resolved>,
}

impl Report {
    pub fn first_failure(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.required && !c.ok)
    }
}

/// One line naming what is missing, or None when every capability is there and bpf() works.
pub fn missing_privileges() -> Option<String> {
    let missing = caps::missing(caps::effective(), &REQUIRED_CAPS);
    if missing.is_empty() {
        return bpf_refused();
    }
    let names: Vec<_> = missing.iter().map(|&c| caps::name(c)).collect();
    Some(format!(
        "missing capability {} (run as root, or grant CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, \
         CAP_SYSLOG and CAP_DAC_READ_SEARCH)",
        names.join(", ")
    ))
}

/// With CAP_BPF held, bpf() can still be refused by a seccomp filter: the default profiles of
/// container runtimes (containers-common's for podman and CRI-O) allow bpf() and
/// perf_event_open() only with CAP_SYS_ADMIN. Probed with the smallest call there is (a
/// one-entry array map, closed at once) so the answer is one line at start, not a map error.
fn bpf_refused() -> Option<String> {
    // Before 5.11 even this map is charged to RLIMIT_MEMLOCK, against everything the user
    // (root: every other droptrace, every BPF agent) has locked: raise it first, and where
    // that is refused, say so rather than blame a security module.
    let memlock = crate::collect::loader::raise_memlock_limit();
    #[repr(C)]
    #[derive(Default)]
    struct MapCreate {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        _rest: [u32; 28],
    }
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_MAP_TYPE_ARRAY: u32 = 2;
    let attr = MapCreate {
        map_type: BPF_MAP_TYPE_ARRAY,
        key_size: 4,
        value_size: 4,
        max_entries: 1,
        ..MapCreate::default()
    };
    // SAFETY: BPF_MAP_CREATE reads `size` bytes of `attr`, which lives across the call; the
    // returned descriptor is ours and closed right away.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_CREATE,
            &attr as *const MapCreate,
            std::mem::size_of::<MapCreate>() as libc::c_uint,
        )
    };
    if fd >= 0 {
        // SAFETY: a descriptor this call created and nobody else holds.
        unsafe { libc::close(fd as libc::c_int) };
        return None;
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EPERM) {
        // Not a privilege problem; loading says what it is.
        return None;
    }
    if let Some(limit) = memlock {
        return Some(
            crate::collect::loader::TracerError::Memlock { kib: limit / 1024 }.to_string(),
        );
    }
    let filtered = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Seccomp:"))
                .map(|v| v.trim() != "0")
        })
        .unwrap_or(false);
    Some(if filtered {
        "bpf() is refused (Operation not permitted) although CAP_BPF is held: a seccomp filter \
         blocks it. Container runtimes' default profiles allow bpf() and perf_event_open() only \
         with CAP_SYS_ADMIN: run under deploy/seccomp/droptrace.json (the default plus those \
         two; docs/deploy.md)"
            .to_string()
    } else {
        format!(
            "bpf() is refused ({err}) although CAP_BPF is held (a Linux security module, or \
             kernel.unprivileged_bpf_disabled in a user namespace)"
        )
    })
}

/// `probe_hooks`: also try to attach hooks whose availability BTF alone cannot tell (needs a
/// tokio runtime). `run` skips it: it attaches them for real right after.
pub fn run(probe_hooks: bool) -> Report {
    let mut checks = Vec::new();
    let mut resolved = None;
    let mut push = |name: &str, ok: bool, required: bool, detail: String| {
        checks.push(Check {
            name: name.to_string(),
            ok,
            required,
            detail,
        })
    };

    match missing_privileges() {
        None => push(
            "privileges",
            true,
            true,
            "CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN".into(),
        ),
        Some(why) => push("privileges", false, true, why),
    }

    let btf = KernelBtf::vmlinux();
    match &btf {
        Ok(_) => push("btf", true, true, VMLINUX.to_string()),
        Err(e) => push("btf", false, true, e.to_string()),
    }

    let tracefs = match tracefs::ensure_mounted() {
        Ok(p) => {
            push("tracefs", true, true, p.display().to_string());
            Some(p)
        }
        Err(e) => {
            push("tracefs", false, true, e.to_string());
            None
        }
    };

    if let Some(root) = &tracefs {
        match drops::read_format(root) {
            Ok(format) => {
                push(
                    "tracepoint skb:kfree_skb",
                    true,
                    true,
                    "present".to_string(),
                );
                let has_reason = format.field("reason").is_ok();
                let names = btf
                    .as_ref()
                    .ok()
                    .and_then(|b| b.enum_values("skb_drop_reason").ok())
                    .map(|v| v.len());
                push(
                    "drop reasons",
                    has_reason,
                    false,
                    match (has_reason, names) {
                        (true, Some(n)) => format!("{n} names from BTF enum skb_drop_reason"),
                        (true, None) => "names from the tracepoint format".to_string(),
                        (false, _) => "kernel < 5.17 (no reason field): every drop reports UNAVAILABLE, classed by its code location".to_string(),
                    },
                );
                if let Ok(b) = &btf {
                    match collect::resolve(root, b) {
                        Ok(r) => {
                            let r = resolved.insert(r);
                            push(
                                "sk_buff layout",
                                true,
                                true,
                                "offsets resolved from BTF".into(),
                            );
                            for (name, result) in optional_checks(r, probe_hooks) {
                                let (ok, detail) = match result {
                                    Ok(d) => (true, d),
                                    Err(e) => (false, e),
                                };
                                push(name, ok, false, detail);
                            }
                        }
                        Err(e) => push("sk_buff layout", false, true, e.to_string()),
                    }
                }
            }
            Err(e) => push("tracepoint skb:kfree_skb", false, true, e.to_string()),
        }
    }

    let ok = checks.iter().all(|c| c.ok || !c.required);
    Report {
        kernel: crate::kernel::release(),
        ok,
        checks,
        tracefs,
        resolved: if ok { resolved } else { None },
    }
}

/// The optional collectors, each skipped by name with its reason where this kernel refuses
/// it, with the conntrack layout drops read and the ctnetlink fallback for removals.
fn optional_checks(
    r: &collect::Resolved,
    probe_hooks: bool,
) -> Vec<(&'static str, Result<String, String>)> {
    let ct_netlink = crate::collect::conntrack::netlink::CtDestroyEvents::open(
        crate::collect::conntrack::CtNames::default(),
        crate::collect::conntrack::netlink::Filter {
            ports: Vec::new(),
            all_tcp: false,
        },
    )
    .map(|_| {
        "unreplied conntrack entries of this network namespace, where no kernel hook can \
         trace removals"
            .to_string()
    })
    .map_err(|e| e.to_string());
    let ct_layout =
        r.ct.as_ref()
            .map(|_| {
                format!(
                    "NAT tuples of dropped packets (struct nf_conn from {} BTF)",
                    r.ct_btf
                )
            })
            .map_err(Clone::clone);
    let mut checks: Vec<_> = collector::ALL
        .iter()
        .filter(|c| !c.required())
        .map(|c| {
            let result = c.can_run(r).and_then(|what| {
                if probe_hooks && c.probe_needed() {
                    probe(*c, r)
                } else {
                    Ok(what)
                }
            });
            (c.name(), result)
        })
        .collect();
    // Drops read the conntrack entry where its layout resolved (listed before removals);
    // removals without a kernel hook come from ctnetlink.
    let removals = checks
        .iter()
        .position(|(n, _)| *n == collector::ConntrackRemovals.name());
    checks.insert(
        removals.unwrap_or(checks.len()),
        ("conntrack layout", ct_layout),
    );
    checks.push(("ctnetlink conntrack DESTROY events", ct_netlink));
    checks
}

/// Whether this kernel lets the collector attach, tried on a throwaway load: lockdown and
/// kernels without trampolines refuse fentry even when BTF has the function; kernels without
/// kprobes refuse the kprobe.
fn probe(c: &dyn collector::Collector, r: &collect::Resolved) -> Result<String, String> {
    let mut t = crate::collect::loader::Tracer::load(&crate::collect::loader::TracerOptions {
        layout: tracer_common::SkbLayout::UNSET,
        tcp: None,
        ct: None,
        ports: Vec::new(),
        all_tcp: false,
        ringbuf_bytes: 4096,
        agg_entries: 1,
        new_flows_per_sec: 0,
    })
    .map_err(|e| e.to_string())?;
    let result = c.attach(r, &mut t).map_err(|e| e.to_string());
    t.detach();
    result
}
