//! Loads the kernel object with this kernel's layout, attaches the collectors, and hands out
//! ring buffer records and loss counters.
use std::{collections::HashSet, os::fd::AsRawFd as _};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
};
use tokio::io::{Interest, unix::AsyncFd};
use tracer_common::{FilterConfig, SkbLayout, counter};

use crate::collectors::skb_drop;

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
}

pub struct TracerOptions {
    pub layout: SkbLayout,
    pub ports: Vec<u16>,
    pub all_tcp: bool,
    pub ringbuf_bytes: u32,
}

/// Registers a map-backed reader with the reactor for readability.
fn readable<T: std::os::fd::AsRawFd>(inner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its map fd and keeps it open, unchanged, until the AsyncFd drops it.
    Ok(unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }?)
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
}

pub struct Tracer {
    // Dropping `ebpf` detaches every link and closes every map: nothing is pinned.
    ebpf: Ebpf,
    pub events: AsyncFd<RingBuf<MapData>>,
    pub counters: Counters,
    pub logger: Option<KernelLog>,
    attached: Vec<&'static str>,
}

impl Tracer {
    pub fn load(opts: &TracerOptions) -> Result<Self, TracerError> {
        if OBJECT.is_empty() {
            return Err(TracerError::StubObject);
        }
        let filter = FilterConfig {
            all_tcp: u32::from(opts.all_tcp),
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("SKB_LAYOUT", &opts.layout, true)
            .override_global("FILTER", &filter, true)
            .map_max_entries("EVENTS", opts.ringbuf_bytes)
            .load(OBJECT)
            .map_err(TracerError::Load)?;

        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(readable(l)?),
            Err(e) => {
                tracing::debug!("kernel-side logging unavailable: {e}");
                None
            }
        };

        {
            let map = ebpf.map_mut("WATCH_PORTS").expect("object defines WATCH_PORTS");
            let mut ports: BpfHashMap<_, u16, u8> =
                BpfHashMap::try_from(map).map_err(|source| TracerError::Map {
                    map: "WATCH_PORTS",
                    source,
                })?;
            for p in opts.ports.iter().copied().collect::<HashSet<_>>() {
                ports.insert(p, 1, 0).map_err(|source| TracerError::Map {
                    map: "WATCH_PORTS",
                    source,
                })?;
            }
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
        Ok(Self {
            ebpf,
            events: readable(events)?,
            counters: Counters(counters),
            logger,
            attached: Vec::new(),
        })
    }

    pub fn attach_tracepoint(
        &mut self,
        prog: &'static str,
        category: &str,
        name: &str,
    ) -> Result<(), TracerError> {
        let p: &mut TracePoint = self
            .ebpf
            .program_mut(prog)
            .ok_or(TracerError::Program {
                prog,
                source: aya::programs::ProgramError::UnexpectedProgramType,
            })?
            .try_into()
            .map_err(|source| TracerError::Program { prog, source })?;
        p.load().map_err(|source| TracerError::Program { prog, source })?;
        p.attach(category, name)
            .map_err(|source| TracerError::Program { prog, source })?;
        self.attached.push(prog);
        Ok(())
    }

    pub fn attach_all(&mut self) -> Result<(), TracerError> {
        self.attach_tracepoint(skb_drop::PROGRAM, skb_drop::CATEGORY, skb_drop::TRACEPOINT)
    }

    pub fn attached(&self) -> &[&'static str] {
        &self.attached
    }

    /// Forwards kernel-side aya-log records to `tracing`.
    pub fn flush_logs(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.get_mut().flush();
        }
    }

    /// Detaches every program now (also done on drop).
    pub fn detach(&mut self) {
        for name in std::mem::take(&mut self.attached) {
            if let Some(p) = self.ebpf.program_mut(name)
                && let Ok(tp) = <&mut TracePoint>::try_from(p)
                && let Err(e) = tp.unload()
            {
                tracing::warn!("detaching {name}: {e}");
            }
        }
        tracing::debug!(fd = self.events.get_ref().as_raw_fd(), "programs detached");
    }
}
