//! droptrace kernel programs. One module per signal; each hook is a thin wrapper around a
//! `try_*` function that returns `Result`, so error paths stay readable and the verifier
//! sees every read checked.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod kmem;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod retransmit;
#[cfg(target_arch = "bpf")]
mod skb_drop;
#[cfg(target_arch = "bpf")]
mod tcp_state;
#[cfg(target_arch = "bpf")]
mod tns;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

// Host builds (cargo check/clippy over the workspace) get an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
