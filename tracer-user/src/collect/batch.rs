//! BPF_MAP_LOOKUP_BATCH (5.6+) for the drop aggregation map: a flush during a storm reads
//! thousands of keys, and one syscall per few hundred entries replaces two per key
//! (get_next_key, then lookup). Kernels without it answer EINVAL/ENOTSUPP and the caller
//! walks the map key by key as before.
use std::os::fd::{AsRawFd, OwnedFd};

use tracer_common::{DropAgg, DropKey};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call.
const CHUNK: usize = 1024;

/// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h), a stable ABI.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

pub struct BatchReader {
    fd: OwnedFd,
    cpus: usize,
    keys: Vec<DropKey>,
    values: Vec<DropAgg>,
}

/// Why a batch read did not happen: the kernel has no batch operations (walk the map
/// instead), or another error.
#[derive(Debug)]
pub enum BatchError {
    Unsupported,
    Io(std::io::Error),
}

impl BatchReader {
    pub fn new(fd: OwnedFd, cpus: usize) -> Self {
        Self {
            fd,
            cpus: cpus.max(1),
            keys: vec![DropKey::default(); CHUNK],
            values: vec![DropAgg::default(); CHUNK * cpus.max(1)],
        }
    }

    /// Every (key, per-CPU values) of the map, to `each`.
    pub fn read(&mut self, mut each: impl FnMut(DropKey, &[DropAgg])) -> Result<(), BatchError> {
        // The hash map's batch token is a bucket index (u32); room for more, to be safe.
        let mut token_in = [0u64; 2];
        let mut token_out = [0u64; 2];
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first {
                    0
                } else {
                    token_in.as_mut_ptr() as u64
                },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: CHUNK as u32,
                map_fd: self.fd.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: the buffers hold CHUNK keys and CHUNK * cpus per-CPU values (DropAgg is
            // 8-byte aligned, as the kernel lays per-CPU values out) and outlive the call.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &mut attr as *mut BatchAttr,
                    std::mem::size_of::<BatchAttr>() as u32,
                )
            };
            let mut done = false;
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // ENOENT: the last entries (possibly none) are in this answer.
                    Some(libc::ENOENT) => done = true,
                    // 524 = ENOTSUPP: no batch operations for this map type or kernel.
                    Some(libc::EINVAL | 524) if first => return Err(BatchError::Unsupported),
                    _ => return Err(BatchError::Io(e)),
                }
            }
            let n = (attr.count as usize).min(CHUNK);
            for i in 0..n {
                each(
                    self.keys[i],
                    &self.values[i * self.cpus..(i + 1) * self.cpus],
                );
            }
            if done {
                return Ok(());
            }
            token_in = token_out;
            first = false;
        }
    }
}
