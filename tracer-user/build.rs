//! Builds the kernel programs (tracer-ebpf) for bpfel-unknown-none with aya-build and leaves the
//! object in OUT_DIR for `include_bytes_aligned!`.
//!
//! `DROPTRACE_EBPF` picks how:
//! - `build`: always build the real object (what `cargo xtask` sets); fails if the toolchain
//!   (nightly rust-src, bpf-linker) is missing;
//! - `stub`: write an empty object, so `cargo check`/clippy work on a machine without
//!   bpf-linker (the binary then refuses to run and says how to build it);
//! - unset: build when bpf-linker is on PATH, else stub with a warning.
use std::{env, fs, path::PathBuf};

use anyhow::{Context as _, anyhow};

const OBJECT: &str = "tracer-ebpf";

fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-env-changed=DROPTRACE_EBPF");
    println!("cargo:rerun-if-env-changed=PATH");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or_else(|| anyhow!("OUT_DIR not set"))?);
    let mode = env::var("DROPTRACE_EBPF").unwrap_or_default();
    let real = match mode.as_str() {
        "build" => true,
        "stub" => false,
        "" => have_bpf_linker(),
        other => return Err(anyhow!("DROPTRACE_EBPF={other}: expected `build` or `stub`")),
    };
    if real {
        let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
        let ebpf_dir = manifest_dir.join("../tracer-ebpf");
        let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "tracer-ebpf",
                root_dir: ebpf_dir,
                ..Default::default()
            }],
            aya_build::Toolchain::default(),
        )
        .context("building the eBPF object (run `cargo xtask setup` to install rust-src and bpf-linker)")?;
        // tracer-common is shared: kernel structs change with it.
        println!("cargo:rerun-if-changed={ebpf_dir}/../tracer-common/src");
        println!("cargo:rustc-cfg=droptrace_ebpf_real");
    } else {
        println!(
            "cargo:warning=building droptrace with a STUB eBPF object (bpf-linker not found); \
             run `cargo xtask build` for a binary that can trace"
        );
        fs::write(out_dir.join(OBJECT), [])?;
    }
    println!("cargo::rustc-check-cfg=cfg(droptrace_ebpf_real)");
    Ok(())
}

fn have_bpf_linker() -> bool {
    env::var_os("PATH").is_some_and(|paths| {
        env::split_paths(&paths).any(|dir| dir.join("bpf-linker").is_file())
    }) || env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .is_some_and(|home| home.join("bin/bpf-linker").is_file())
}
