//! Loads the kernel object with this kernel's layout, attaches the collect, and hands out
//! ring buffer records and loss counters.
use std::{
    collections::HashSet,
    os::fd::{AsFd as _, AsRawFd as _},
};

use super::drops::AggEntry;
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{
        BtfTracePoint, CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, FEntry, KProbe, TracePoint,
    },
};
use tokio::io::{Interest, unix::AsyncFd};
use tracer_common::{
    CtLayout, DropAgg, DropKey, HostPort, Settings, SkbLayout, TcpLayout, counter,
};

use crate::collect::conntrack;

/// The perf event source kprobes attach through; absent where the kernel has none.
const KPROBE_PMU: &str = "/sys/bus/event_source/devices/kprobe";

/// The compiled kernel programs (see build.rs; empty when built as a stub).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer-ebpf"));

#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    #[error(
        "this droptrace binary was built without its eBPF object (bpf-linker was missing); \
         build it with `cargo xtask build`"
    )]
    StubObject,
    #[error("loading the eBPF object failed: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("program {prog}: {source}")]
    Program {
        prog: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The kernel refused the cgroup attachment; `why` names the likely cause.
    #[error("program {prog}: cannot attach to {cgroup} ({direction}): {io}{why}")]
    CgroupAttach {
        prog: &'static str,
        cgroup: String,
        direction: &'static str,
        io: std::io::Error,
        why: String,
    },
    #[error("kernel BTF for fentry: {0}")]
    Btf(String),
    /// BPF_PROG_LOAD failed before the verifier said anything (aya's message would end in an
    /// empty "Verifier output:").
    #[error(
        "program {prog}: perf events refused: kernel.perf_event_paranoid is {level}, at which \
         this kernel (Debian's and Ubuntu's patch) allows them only with CAP_SYS_ADMIN; grant \
         CAP_SYS_ADMIN or set the sysctl kernel.perf_event_paranoid=2"
    )]
    PerfParanoid { prog: &'static str, level: i32 },
    #[error(
        "creating BPF maps refused: this kernel charges them to RLIMIT_MEMLOCK (kernels \
         before 5.11), which is {kib} KiB here and cannot be raised without CAP_SYS_RESOURCE; \
         run droptrace with an unlimited memlock limit (LimitMEMLOCK=infinity, ulimit -l \
         unlimited) or grant CAP_SYS_RESOURCE"
    )]
    Memlock { kib: u64 },
    #[error("program {prog}: this kernel has no kprobes ({KPROBE_PMU} is missing)")]
    NoKprobes { prog: &'static str },
    #[error("{first}; {second}")]
    BothRefused {
        first: Box<TracerError>,
        second: Box<TracerError>,
    },
    /// A hook this kernel cannot give (from its layouts, or a refusal already worded).
    #[error("{0}")]
    Unavailable(String),
    #[error("program {prog}: the kernel refused to load it ({io}){hint}")]
    Refused {
        prog: &'static str,
        io: std::io::Error,
        hint: &'static str,
    },
}

/// kernel.perf_event_paranoid: above 2, Debian's and Ubuntu's kernels refuse perf events
/// (tracepoints, kprobes) to anyone without CAP_SYS_ADMIN, CAP_PERFMON or not.
const PERF_PARANOID: &str = "/proc/sys/kernel/perf_event_paranoid";

fn perf_paranoid() -> Option<i32> {
    std::fs::read_to_string(PERF_PARANOID)
        .ok()?
        .trim()
        .parse()
        .ok()
}

impl TracerError {
    /// Refused for want of something the host must grant (a perf_event_paranoid level, a
    /// memlock limit), with its fix in the message: the run stops and says so.
    pub fn is_privilege_refusal(&self) -> bool {
        matches!(self, Self::PerfParanoid { .. } | Self::Memlock { .. })
    }

    /// An attach failure; a perf event refused under kernel.perf_event_paranoid > 2 says so.
    fn attach(prog: &'static str, source: aya::programs::ProgramError) -> Self {
        if let aya::programs::ProgramError::SyscallError(e) = &source
            && e.io_error.raw_os_error() == Some(libc::EACCES)
            && let Some(level) = perf_paranoid().filter(|l| *l > 2)
        {
            return Self::PerfParanoid { prog, level };
        }
        Self::Program { prog, source }
    }

    fn load(prog: &'static str, source: aya::programs::ProgramError) -> Self {
        match source {
            aya::programs::ProgramError::LoadError {
                io_error,
                verifier_log,
            } if verifier_log.to_string().trim().is_empty() => {
                let hint = if io_error.raw_os_error() == Some(libc::EPERM) {
                    ": this kernel does not allow this program type here (kernel lockdown, or \
                     no BPF trampoline support)"
                } else {
                    ""
                };
                Self::Refused {
                    prog,
                    io: io_error,
                    hint,
                }
            }
            source => Self::Program { prog, source },
        }
    }
}

impl TracerError {
    fn cgroup(
        prog: &'static str,
        cgroup: &std::path::Path,
        ingress: bool,
        source: aya::programs::ProgramError,
    ) -> Self {
        let aya::programs::ProgramError::SyscallError(aya::sys::SyscallError { io_error, .. }) =
            source
        else {
            return Self::Program { prog, source };
        };
        let cgroup = cgroup.display().to_string();
        let why = match io_error.raw_os_error() {
            // __cgroup_bpf_attach: the hook's existing programs were attached with other flags.
            Some(libc::EPERM) => format!(
                ": another program holds this hook in exclusive or override mode (see \
                 `bpftool cgroup show {cgroup}`); droptrace only attaches in multi mode, \
                 next to other programs"
            ),
            Some(libc::EBADF) => ": not a cgroup v2 directory".to_string(),
            _ => String::new(),
        };
        Self::CgroupAttach {
            prog,
            cgroup,
            direction: if ingress { "ingress" } else { "egress" },
            io: io_error,
            why,
        }
    }
}

/// Whether this kernel attaches cgroup programs through BPF links (5.7+), the way aya
/// decides it.
fn cgroup_links() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(5, 7, 0))
}

pub struct TracerOptions {
    pub layout: SkbLayout,
    /// None: the TCP lifecycle programs stay unattached.
    pub tcp: Option<TcpLayout>,
    /// None: drops carry no conntrack entry and nf_ct_delete stays unattached.
    pub ct: Option<CtLayout>,
    pub ports: Vec<u16>,
    pub all_tcp: bool,
    pub ringbuf_bytes: u32,
    /// Capacity of the in-kernel drop aggregation map.
    pub agg_entries: u32,
    /// New-flow drop records per second per CPU before storms are folded (0: no limit).
    pub new_flows_per_sec: u32,
}

/// Registers a map-backed reader with the reactor for readability.
pub(crate) fn readable<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its map fd and keeps it open, unchanged, until the AsyncFd drops it.
    Ok(unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }?)
}

/// The in-kernel watch sets the daemon extends at run time.
pub struct Watch {
    ports: Array<MapData, u8>,
    hostports: BpfHashMap<MapData, HostPort, u64>,
}

impl Watch {
    /// Watch `addr` (until `expires_ns`, CLOCK_MONOTONIC; 0 = forever).
    pub fn host_port(
        &mut self,
        addr: std::net::SocketAddr,
        expires_ns: u64,
    ) -> Result<(), TracerError> {
        let mut key = HostPort {
            port: addr.port(),
            ..HostPort::default()
        };
        match addr.ip() {
            std::net::IpAddr::V4(v4) => {
                key.family = tracer_common::AF_INET;
                key.addr[..4].copy_from_slice(&v4.octets());
            }
            std::net::IpAddr::V6(v6) => {
                key.family = tracer_common::AF_INET6;
                key.addr = v6.octets();
            }
        }
        self.hostports
            .insert(key, expires_ns, 0)
            .map_err(|source| TracerError::Map {
                map: "WATCH_HOSTPORTS",
                source,
            })?;
        self.set_port_bit(addr.port(), tracer_common::watch::PORT_HOSTS)
    }

    /// Watch a port on every address.
    pub fn port(&mut self, port: u16) -> Result<(), TracerError> {
        self.set_port_bit(port, tracer_common::watch::PORT_ALL)
    }

    fn set_port_bit(&mut self, port: u16, bit: u8) -> Result<(), TracerError> {
        let err = |source| TracerError::Map {
            map: "WATCH_PORTS",
            source,
        };
        let old = self.ports.get(&u32::from(port), 0).map_err(err)?;
        self.ports.set(u32::from(port), old | bit, 0).map_err(err)
    }
}

/// Kernel-side aya-log records, readable when the program logged something.
pub type KernelLog = AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>;

/// The per-CPU counters the programs keep (see `tracer_common::counter`).
pub struct Counters(PerCpuArray<MapData, u64>);

impl Counters {
    /// Sum over CPUs of one counter.
    pub fn get(&self, index: u32) -> u64 {
        self.0.get(&index, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }

    /// Records the kernel could not put in the ring buffer.
    pub fn lost_in_kernel(&self) -> u64 {
        self.get(counter::RINGBUF_FULL)
    }

    /// Every counter, summed over CPUs, with its name.
    pub fn all(&self) -> Vec<(&'static str, u64)> {
        (0..counter::MAX)
            .map(|i| (counter::NAMES[i as usize], self.get(i)))
            .collect()
    }
}

/// Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK (often 64 KiB): the
/// ring buffer alone is larger. Raises it to unlimited; where that is refused (no
/// CAP_SYS_RESOURCE, a lower hard limit) on such a kernel, returns the limit in bytes. Newer
/// kernels charge memory cgroups and ignore the limit: None there, whatever the limit (a
/// refusal there has another cause, such as a seccomp filter in a container).
pub fn raise_memlock_limit() -> Option<u64> {
    let limit = raise_memlock_rlimit()?;
    crate::kernel::charges_memlock(&crate::kernel::release()).then_some(limit)
}

fn raise_memlock_rlimit() -> Option<u64> {
    let mut cur = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit structs for the calling process.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut cur) != 0
            || cur.rlim_cur == libc::RLIM_INFINITY
        {
            return None;
        }
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        (libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) != 0).then_some(cur.rlim_cur)
    }
}

pub struct Tracer {
    // Dropping `ebpf` detaches every link and closes every map: nothing is pinned.
    ebpf: Ebpf,
    pub events: AsyncFd<RingBuf<MapData>>,
    pub counters: Counters,
    /// Per (flow, reason, location) drop counts (see `pipeline::repeats`).
    drop_agg: Option<PerCpuHashMap<MapData, DropKey, DropAgg>>,
    /// The same map read in batches, while the kernel supports it.
    agg_batch: Option<super::batch::BatchReader>,
    /// Learned (address, port) pairs to watch, e.g. Oracle redirect targets.
    pub watch: Option<Watch>,
    pub logger: Option<KernelLog>,
    attached: Vec<(&'static str, Hook)>,
    /// The running kernel's BTF as aya reads it, parsed once for the BTF-typed hooks
    /// (tp_btf, fentry).
    btf: Option<aya::Btf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    TracePoint,
    BtfTracePoint,
    FEntry,
    KProbe,
    CgroupSkb,
}

impl Tracer {
    pub fn load(opts: &TracerOptions) -> Result<Self, TracerError> {
        if OBJECT.is_empty() {
            return Err(TracerError::StubObject);
        }
        let memlock = raise_memlock_limit();
        let settings = Settings {
            all_tcp: u32::from(opts.all_tcp),
            // Wake the reader at 1/8 full; below that it drains on its timer.
            wakeup_bytes: opts.ringbuf_bytes / 8,
            new_flows_per_sec: opts.new_flows_per_sec,
            _pad: 0,
        };
        let tcp = opts.tcp.unwrap_or(TcpLayout::UNSET);
        let ct = opts.ct.unwrap_or(CtLayout::UNSET);
        let mut ebpf = EbpfLoader::new()
            .override_global("SKB_LAYOUT", &opts.layout, true)
            .override_global("TCP_LAYOUT", &tcp, true)
            .override_global("CT_LAYOUT", &ct, true)
            .override_global("SETTINGS", &settings, true)
            .map_max_entries("EVENTS", opts.ringbuf_bytes)
            .map_max_entries("DROP_AGG", opts.agg_entries.max(1))
            .load(OBJECT)
            .map_err(|e| match (memlock, &e) {
                // Refused for want of locked memory: a kernel before 5.11 at a limit we
                // could not raise.
                (
                    Some(limit),
                    aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. }),
                ) if io_error.raw_os_error() == Some(libc::EPERM) => {
                    TracerError::Memlock { kib: limit / 1024 }
                }
                _ => TracerError::Load(e),
            })?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(readable(l)?),
            Err(e) => {
                tracing::debug!("kernel-side logging unavailable: {e}");
                None
            }
        };

        let mut watch = Watch {
            ports: Array::try_from(
                ebpf.take_map("WATCH_PORTS")
                    .expect("object defines WATCH_PORTS"),
            )
            .map_err(|source| TracerError::Map {
                map: "WATCH_PORTS",
                source,
            })?,
            hostports: BpfHashMap::try_from(
                ebpf.take_map("WATCH_HOSTPORTS")
                    .expect("object defines WATCH_HOSTPORTS"),
            )
            .map_err(|source| TracerError::Map {
                map: "WATCH_HOSTPORTS",
                source,
            })?,
        };
        for p in opts.ports.iter().copied().collect::<HashSet<_>>() {
            watch.port(p)?;
        }

        let events = RingBuf::try_from(ebpf.take_map("EVENTS").expect("object defines EVENTS"))
            .map_err(|source| TracerError::Map {
                map: "EVENTS",
                source,
            })?;
        let counters =
            PerCpuArray::try_from(ebpf.take_map("COUNTERS").expect("object defines COUNTERS"))
                .map_err(|source| TracerError::Map {
                    map: "COUNTERS",
                    source,
                })?;
        let agg_map = ebpf.take_map("DROP_AGG").expect("object defines DROP_AGG");
        let agg_batch = match (&agg_map, aya::util::nr_cpus()) {
            (aya::maps::Map::PerCpuHashMap(data), Ok(cpus)) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .ok()
                .map(|fd| super::batch::BatchReader::new(fd, cpus)),
            _ => None,
        };
        let drop_agg = PerCpuHashMap::try_from(agg_map).map_err(|source| TracerError::Map {
            map: "DROP_AGG",
            source,
        })?;
        Ok(Self {
            ebpf,
            events: readable(events)?,
            counters: Counters(counters),
            drop_agg: Some(drop_agg),
            agg_batch,
            watch: Some(watch),
            logger,
            attached: Vec::new(),
            btf: None,
        })
    }

    pub fn attach_tracepoint(
        &mut self,
        prog: &'static str,
        category: &str,
        name: &str,
    ) -> Result<(), TracerError> {
        let p: &mut TracePoint = self.program(prog)?;
        p.load().map_err(|source| TracerError::load(prog, source))?;
        p.attach(category, name)
            .map_err(|source| TracerError::attach(prog, source))?;
        self.attached.push((prog, Hook::TracePoint));
        Ok(())
    }

    /// cgroup_skb program on a cgroup v2 directory (the root sees every local socket), never
    /// exclusively: other programs on the same hook (a CNI's host firewall, systemd's IP
    /// accounting, another droptrace) keep running, and can still attach after us.
    ///
    /// From 5.7 aya attaches through a BPF link, which the kernel always adds in multi mode
    /// (link creation takes no attach flags, hence `Single` there, as libbpf does). Older
    /// kernels get BPF_PROG_ATTACH, where `Single` would be exclusive: ask for multi.
    pub fn attach_cgroup_skb(
        &mut self,
        prog: &'static str,
        cgroup: &std::path::Path,
        ingress: bool,
    ) -> Result<(), TracerError> {
        let dir = std::fs::File::open(cgroup)?;
        let p: &mut CgroupSkb = self.program(prog)?;
        p.load().map_err(|source| TracerError::load(prog, source))?;
        let ty = if ingress {
            CgroupSkbAttachType::Ingress
        } else {
            CgroupSkbAttachType::Egress
        };
        let mode = if cgroup_links() {
            CgroupAttachMode::Single
        } else {
            CgroupAttachMode::AllowMultiple
        };
        p.attach(&dir, ty, mode)
            .map_err(|source| TracerError::cgroup(prog, cgroup, ingress, source))?;
        self.attached.push((prog, Hook::CgroupSkb));
        Ok(())
    }

    /// `f` with the running kernel's BTF, parsed on first use and kept.
    fn with_btf<R>(
        &mut self,
        f: impl FnOnce(&mut Self, &aya::Btf) -> Result<R, TracerError>,
    ) -> Result<R, TracerError> {
        let btf = match self.btf.take() {
            Some(b) => b,
            None => aya::Btf::from_sys_fs().map_err(|e| TracerError::Btf(e.to_string()))?,
        };
        let r = f(self, &btf);
        self.btf = Some(btf);
        r
    }

    /// BTF tracepoint (tp_btf) `name`, typed by the running kernel's BTF.
    pub fn attach_btf_tracepoint(
        &mut self,
        prog: &'static str,
        name: &str,
    ) -> Result<(), TracerError> {
        self.with_btf(|t, btf| {
            let p: &mut BtfTracePoint = t.program(prog)?;
            p.load(name, btf)
                .map_err(|source| TracerError::load(prog, source))?;
            p.attach()
                .map_err(|source| TracerError::Program { prog, source })?;
            t.attached.push((prog, Hook::BtfTracePoint));
            Ok(())
        })
    }

    /// fentry on a kernel function found in the running kernel's BTF.
    pub fn attach_fentry(&mut self, prog: &'static str, function: &str) -> Result<(), TracerError> {
        self.with_btf(|t, btf| {
            let p: &mut FEntry = t.program(prog)?;
            p.load(function, btf)
                .map_err(|source| TracerError::load(prog, source))?;
            p.attach()
                .map_err(|source| TracerError::Program { prog, source })?;
            t.attached.push((prog, Hook::FEntry));
            Ok(())
        })
    }

    /// kprobe on a kernel function by name (module functions included, once loaded).
    pub fn attach_kprobe(&mut self, prog: &'static str, function: &str) -> Result<(), TracerError> {
        if !std::path::Path::new(KPROBE_PMU).exists() {
            return Err(TracerError::NoKprobes { prog });
        }
        let p: &mut KProbe = self.program(prog)?;
        p.load().map_err(|source| TracerError::load(prog, source))?;
        p.attach(function, 0)
            .map_err(|source| TracerError::attach(prog, source))?;
        self.attached.push((prog, Hook::KProbe));
        Ok(())
    }

    /// The conntrack-removal hook: `first` (fentry where vmlinux has the function), else the
    /// kprobe. Returns the one attached; the error names why each was refused.
    pub fn attach_ct_removal(
        &mut self,
        first: conntrack::Removal,
    ) -> Result<conntrack::Removal, TracerError> {
        use conntrack::Removal;
        let kprobe = |t: &mut Self| {
            t.attach_kprobe(conntrack::KPROBE_PROGRAM, conntrack::FUNCTION)
                .map(|()| Removal::KProbe)
        };
        match first {
            Removal::KProbe => kprobe(self),
            Removal::FEntry => match self.attach_fentry(conntrack::PROGRAM, conntrack::FUNCTION) {
                Ok(()) => Ok(Removal::FEntry),
                Err(fentry) => kprobe(self).map_err(|kp| TracerError::BothRefused {
                    first: Box::new(fentry),
                    second: Box::new(kp),
                }),
            },
        }
    }

    fn program<'a, P>(&'a mut self, prog: &'static str) -> Result<&'a mut P, TracerError>
    where
        &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        self.ebpf
            .program_mut(prog)
            .ok_or(TracerError::Program {
                prog,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| TracerError::Program { prog, source })
    }

    pub fn attached(&self) -> Vec<&'static str> {
        self.attached.iter().map(|(p, _)| *p).collect()
    }

    /// Forwards kernel-side aya-log records to `tracing`.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.get_mut().flush();
        }
    }

    /// The kernel's drop aggregation map, summed over CPUs.
    pub fn drop_counts(&mut self, out: &mut Vec<AggEntry>) {
        out.clear();
        if let Some(batch) = self.agg_batch.as_mut() {
            match batch.read(|key, per_cpu| out.push(sum_cpus(key, per_cpu))) {
                Ok(()) => return,
                Err(e) => {
                    if let super::batch::BatchError::Io(e) = e {
                        tracing::warn!("reading DROP_AGG in batches: {e}; key by key from now");
                    }
                    self.agg_batch = None;
                    out.clear();
                }
            }
        }
        let Some(map) = self.drop_agg.as_ref() else {
            return;
        };
        let keys: Vec<DropKey> = map.keys().filter_map(Result::ok).collect();
        for key in keys {
            let Ok(per_cpu) = map.get(&key, 0) else {
                continue;
            };
            out.push(sum_cpus(key, &per_cpu));
        }
    }

    /// Removes an idle key from the kernel's drop aggregation map, if its repeats are still
    /// `reported` (all of them reported): the flush that found it idle read the map a while
    /// ago (under emulation, long enough for a flow's next drop to land), and removing a key
    /// that repeated since would lose those drops. Read again right before the removal; a
    /// key that grew is kept for the next flush. True when the key is gone.
    pub fn forget_drop_key(&mut self, key: &DropKey, reported: u64) -> bool {
        let Some(map) = self.drop_agg.as_mut() else {
            return false;
        };
        match map.get(key, 0) {
            Ok(per_cpu) if per_cpu.iter().map(|v| v.repeats).sum::<u64>() != reported => false,
            Ok(_) => map.remove(key).is_ok(),
            // Gone already.
            Err(_) => true,
        }
    }

    /// Detaches every program now (also done on drop).
    pub fn detach(&mut self) {
        for (name, hook) in std::mem::take(&mut self.attached) {
            let Some(p) = self.ebpf.program_mut(name) else {
                continue;
            };
            let result = match hook {
                Hook::TracePoint => <&mut TracePoint>::try_from(p).and_then(|p| p.unload()),
                Hook::BtfTracePoint => <&mut BtfTracePoint>::try_from(p).and_then(|p| p.unload()),
                Hook::FEntry => <&mut FEntry>::try_from(p).and_then(|p| p.unload()),
                Hook::KProbe => <&mut KProbe>::try_from(p).and_then(|p| p.unload()),
                Hook::CgroupSkb => <&mut CgroupSkb>::try_from(p).and_then(|p| p.unload()),
            };
            if let Err(e) = result {
                tracing::warn!("detaching {name}: {e}");
            }
        }
        tracing::debug!(fd = self.events.get_ref().as_raw_fd(), "programs detached");
    }
}

/// One aggregation key summed over CPUs.
fn sum_cpus(key: DropKey, per_cpu: &[DropAgg]) -> AggEntry {
    let mut e = AggEntry {
        key,
        repeats: 0,
        last_ns: 0,
        netns: 0,
        ifindex: 0,
        tcp_flags: 0,
        redirected: false,
    };
    for v in per_cpu {
        e.repeats += v.repeats;
        e.last_ns = e.last_ns.max(v.last_ns);
        e.redirected |= v.redirected != 0;
        if v.netns != 0 {
            (e.netns, e.ifindex, e.tcp_flags) = (v.netns, v.ifindex, v.tcp_flags);
        }
    }
    e
}
