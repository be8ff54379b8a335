//! The initramfs of a VM leg: busybox, the modules Debian builds as modules but the boot needs
//! (virtio PCI, 9p over virtio, overlayfs; decompressed for busybox insmod), and an init that
//! mounts the host's / read-only over 9p under a tmpfs overlay, the kernel's own modules at
//! /lib/modules/RELEASE and the leg's output directory at /vm/out, then hands over to
//! `xtask vm-guest` (named by `dt_init=` on the kernel command line).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use super::kernels::Kernel;

const BUSYBOX: &str = "/bin/busybox";
/// Modules the boot needs before the root filesystem is there.
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
/// 9p mount tags (see qemu.rs).
pub(super) const TAG_ROOT: &str = "hostroot";
pub(super) const TAG_MODULES: &str = "modules";
pub(super) const TAG_OUT: &str = "out";
/// Where the guest finds its plan and writes its results.
pub(super) const GUEST_OUT: &str = "/vm/out";
/// Printed on the serial console once the root filesystem is up.
pub(super) const BOOTED: &str = "droptrace-vm: root filesystem up";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /lib/modules/order); do
    insmod "/lib/modules/$m" || echo "droptrace-vm: insmod $m failed"
done
opts=trans=virtio,version=9p2000.L,msize=512000
fail() { echo "droptrace-vm: $*"; echo o > /proc/sysrq-trigger; sleep 30; }
mount -t 9p -o "$opts,ro,cache=loose" @ROOT@ /lower || fail "cannot mount the host root"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "cannot mount the overlay"
release=$(uname -r)
mkdir -p "/newroot/usr/lib/modules/$release" /newroot@OUT@
mount -t 9p -o "$opts,ro" @MODULES@ "/newroot/usr/lib/modules/$release" || fail "no modules share"
mount -t 9p -o "$opts" @OUTTAG@ /newroot@OUT@ || fail "no output share"
for d in proc sys dev; do mount --move /$d /newroot/$d; done
echo "@BOOTED@"
[ -n "$dt_init" ] || fail "no dt_init= on the kernel command line"
exec switch_root /newroot "$dt_init" vm-guest @OUT@
"#;

fn init_script() -> String {
    INIT.replace("@ROOT@", TAG_ROOT)
        .replace("@MODULES@", TAG_MODULES)
        .replace("@OUTTAG@", TAG_OUT)
        .replace("@OUT@", GUEST_OUT)
        .replace("@BOOTED@", BOOTED)
}

/// The boot modules in load order (dependencies first), each as a path in the kernel tree;
/// built-in ones are left out.
fn boot_modules(k: &Kernel) -> anyhow::Result<Vec<PathBuf>> {
    let root = k.dir.join("root");
    let out = Command::new(crate::setup::sbin("modprobe"))
        .arg("-d")
        .arg(&root)
        .args(["-S", &k.release, "--show-depends", "-a"])
        .args(BOOT_MODULES)
        .output()
        .context("cannot run modprobe (Debian package kmod; `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "modprobe --show-depends {}: {}",
            BOOT_MODULES.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let mut paths: Vec<PathBuf> = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if let Some(p) = line.strip_prefix("insmod ") {
            let p = PathBuf::from(p.trim());
            if !paths.contains(&p) {
                paths.push(p);
            }
        }
    }
    Ok(paths)
}

/// A module file's contents, decompressed (busybox insmod reads plain ELF only).
fn module_bytes(path: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    match tool {
        None => fs::read(path).with_context(|| format!("read {name}")),
        Some(t) => {
            let out = Command::new(t)
                .args(["-dc"])
                .arg(path)
                .output()
                .with_context(|| format!("cannot run {t} to decompress {name}"))?;
            if !out.status.success() {
                bail!("{t} -dc {name} failed");
            }
            Ok(out.stdout)
        }
    }
}

/// Writes `KERNEL_DIR/initrd.cpio` (rebuilt when the init script or busybox changed).
pub(super) fn build(k: &Kernel) -> anyhow::Result<PathBuf> {
    let path = k.dir.join("initrd.cpio");
    let init = init_script();
    let stamp = k.dir.join("initrd.stamp");
    let busybox = fs::read(BUSYBOX).with_context(|| {
        format!("{BUSYBOX} missing (Debian package busybox-static; `cargo xtask setup`)")
    })?;
    let want = format!("{}:{}", init.len() + busybox.len(), fnv(init.as_bytes()));
    if path.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        return Ok(path);
    }
    let mut c = Cpio::default();
    for d in [
        "bin",
        "dev",
        "proc",
        "sys",
        "lib",
        "lib/modules",
        "lower",
        "rw",
        "newroot",
    ] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1);
    c.file("bin/busybox", 0o755, &busybox);
    c.file("init", 0o755, init.as_bytes());
    let mut order = String::new();
    for m in boot_modules(k)? {
        let file = m
            .file_name()
            .context("module path")?
            .to_string_lossy()
            .trim_end_matches(".xz")
            .trim_end_matches(".zst")
            .trim_end_matches(".gz")
            .to_string();
        c.file(&format!("lib/modules/{file}"), 0o644, &module_bytes(&m)?);
        order.push_str(&file);
        order.push('\n');
    }
    c.file("lib/modules/order", 0o644, order.as_bytes());
    fs::write(&path, c.finish())?;
    fs::write(&stamp, want)?;
    Ok(path)
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x100000001b3)
    })
}

/// A "newc" cpio archive, the format the kernel unpacks into its initial root.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            if mode & 0o040000 != 0 { 2 } else { 1 },
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }

    fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // Whole 512-byte blocks, as cpio writes them.
        while !self.out.len().is_multiple_of(512) {
            self.out.push(0);
        }
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_entries_are_aligned_and_terminated() {
        let mut c = Cpio::default();
        c.dir("bin");
        c.file("init", 0o755, b"#!/bin/sh\n");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 512, 0);
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("init\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // Every later header starts on a 4-byte boundary.
        let second = 6 + text[6..].find("070701").expect("a second entry");
        assert_eq!(second % 4, 0);
        assert_eq!(
            &text[second + 6..second + 14],
            "00000002",
            "inode of the second entry"
        );
    }

    #[test]
    fn init_names_every_share_and_the_handover() {
        let s = init_script();
        for want in [
            TAG_ROOT,
            TAG_MODULES,
            TAG_OUT,
            GUEST_OUT,
            BOOTED,
            "vm-guest",
        ] {
            assert!(s.contains(want), "{want}");
        }
        assert!(!s.contains('@'), "unreplaced placeholder: {s}");
    }
}
