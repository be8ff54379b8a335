//! Another agent's cgroup_skb program on the cgroup v2 root, loaded, pinned and attached with
//! bpftool exactly as an operator would (tests/bpf/cgroup_count.c: counts ingress packets).
//! Detached and unpinned on drop, also when the test fails.
use std::{path::PathBuf, process::Command};

use serde_json::Value;

use crate::netns::sh;

/// The cgroup v2 root as mounted on this node (not /sys/fs/cgroup where that is a v1 tmpfs).
pub fn cgroup2_root() -> PathBuf {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mut f = left.split_whitespace();
            let (root, mount) = (f.nth(3)?, f.next()?);
            (right.starts_with("cgroup2 ") && root == "/").then(|| PathBuf::from(mount))
        })
        .expect("no cgroup v2 hierarchy mounted: the coexistence tests need one")
}

const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_CGROUP_INET_INGRESS: u32 = 0;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// BPF_PROG_QUERY on `cgroup`'s ingress hook: (attach flags, program ids).
fn ingress_programs(cgroup: &std::path::Path) -> (u32, Vec<u32>) {
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let dir = std::fs::File::open(cgroup).expect("open the cgroup");
    let mut ids = vec![0u32; 64];
    let mut q = Query {
        target_fd: std::os::fd::AsRawFd::as_raw_fd(&dir) as u32,
        attach_type: BPF_CGROUP_INET_INGRESS,
        query_flags: 0,
        attach_flags: 0,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        _pad: 0,
    };
    // SAFETY: the kernel reads `q` and writes at most prog_cnt ids into `ids`, both alive
    // across the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut q as *mut Query,
            std::mem::size_of::<Query>() as libc::c_uint,
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_PROG_QUERY {}: {}",
        cgroup.display(),
        std::io::Error::last_os_error()
    );
    ids.truncate(q.prog_cnt as usize);
    (q.attach_flags, ids)
}

/// A pinned (not yet attached) counting program.
pub struct OtherCgroupProgram {
    pub cgroup: PathBuf,
    dir: PathBuf,
    id: u64,
    attached: bool,
}

impl OtherCgroupProgram {
    /// Builds and pins the program under /sys/fs/bpf/droptrace-e2e-<pid>-<tag>.
    pub fn load(tag: &str) -> Self {
        crate::require_root();
        let obj = crate::clang_bpf("cgroup_count.c", &[], "cgroup_count.o");
        if !is_bpffs("/sys/fs/bpf") {
            sh(&["mount", "-t", "bpf", "bpf", "/sys/fs/bpf"]);
        }
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/droptrace-e2e-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("maps")).expect("create pin directory");
        let mut p = Self {
            cgroup: cgroup2_root(),
            dir,
            id: 0,
            attached: false,
        };
        sh(&[
            "bpftool",
            "prog",
            "load",
            obj.to_str().expect("utf-8"),
            p.prog_pin().as_str(),
            "type",
            "cgroup/skb",
            "pinmaps",
            p.dir.join("maps").to_str().expect("utf-8"),
        ]);
        let info = json(&["bpftool", "-j", "prog", "show", "pinned", &p.prog_pin()]);
        p.id = info["id"].as_u64().expect("program id");
        p
    }

    fn prog_pin(&self) -> String {
        self.dir.join("prog").to_str().expect("utf-8").to_string()
    }

    /// `bpftool cgroup attach ROOT ingress pinned P multi`; the error text when refused.
    pub fn attach_multi(&mut self) -> Result<(), String> {
        self.attach(&["multi"])
    }

    /// Without a mode: exclusive, as older agents attach.
    pub fn attach_exclusive(&mut self) -> Result<(), String> {
        self.attach(&[])
    }

    fn attach(&mut self, mode: &[&str]) -> Result<(), String> {
        let out = Command::new("bpftool")
            .args(["cgroup", "attach"])
            .arg(&self.cgroup)
            .args(["ingress", "pinned", &self.prog_pin()])
            .args(mode)
            .output()
            .expect("run bpftool");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        self.attached = true;
        Ok(())
    }

    /// Whether this program is on the root's ingress hook in multi mode. Asked of the kernel
    /// directly: Debian 12's bpftool queries with fields 5.10 does not know and lists nothing.
    pub fn attached_multi(&self) -> bool {
        let (flags, ids) = ingress_programs(&self.cgroup);
        flags == BPF_F_ALLOW_MULTI && ids.contains(&(self.id as u32))
    }

    /// Whether this program alone holds the root's ingress hook, exclusively (no flags).
    pub fn attached_exclusive(&self) -> bool {
        ingress_programs(&self.cgroup) == (0, vec![self.id as u32])
    }

    /// Every program on the root (to show what else is there when a test fails).
    pub fn root_programs(&self) -> String {
        let out = Command::new("bpftool")
            .args(["cgroup", "show"])
            .arg(&self.cgroup)
            .output();
        let (flags, ids) = ingress_programs(&self.cgroup);
        format!(
            "ingress: ids {ids:?}, attach flags {flags}; bpftool cgroup show: {}",
            out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        )
    }

    /// Packets the program has counted so far.
    pub fn count(&self) -> u64 {
        let pin = self.dir.join("maps/counts");
        let dump = json(&[
            "bpftool",
            "-j",
            "map",
            "dump",
            "pinned",
            pin.to_str().expect("utf-8"),
        ]);
        let entry = &dump[0];
        // bpftool prints "formatted" values when the object has BTF, raw bytes otherwise.
        if let Some(v) = entry["formatted"]["value"].as_u64() {
            return v;
        }
        entry["value"]
            .as_array()
            .expect("value bytes")
            .iter()
            .rev()
            .fold(0, |acc, b| {
                let b = b
                    .as_str()
                    .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
                    .expect("hex byte");
                (acc << 8) | b
            })
    }
}

impl Drop for OtherCgroupProgram {
    fn drop(&mut self) {
        if self.attached {
            let _ = Command::new("bpftool")
                .args(["cgroup", "detach"])
                .arg(&self.cgroup)
                .args(["ingress", "pinned", &self.prog_pin()])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn is_bpffs(path: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo").is_ok_and(|info| {
        info.lines().any(|l| {
            l.split_whitespace().nth(4) == Some(path)
                && l.split_once(" - ")
                    .is_some_and(|(_, r)| r.starts_with("bpf "))
        })
    })
}

fn json(args: &[&str]) -> Value {
    let out = sh(args);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {:?}", out.stdout))
}
