//! Header reads from skb memory for the shared parser in `tracer_common::packet`.
use aya_ebpf::helpers::bpf_probe_read_kernel;
pub(crate) use tracer_common::packet::{Reader, TcpPacket};

/// Reads kernel memory with bpf_probe_read_kernel.
pub(crate) struct Kernel;

impl Reader for Kernel {
    #[inline(always)]
    fn read<const N: usize>(&self, addr: u64) -> Result<[u8; N], i64> {
        // SAFETY: bpf_probe_read_kernel tolerates any address; any bytes are a [u8; N].
        unsafe { bpf_probe_read_kernel(addr as *const [u8; N]).map_err(|e| e as i64) }
    }
}

#[inline(always)]
pub(crate) fn parse_tcp(ip: u64, protocol: u16) -> Result<Option<TcpPacket>, i64> {
    tracer_common::packet::parse_tcp(&Kernel, ip, protocol)
}
