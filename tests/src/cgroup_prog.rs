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

    /// Whether `bpftool cgroup show ROOT` lists this program on ingress in multi mode.
    pub fn attached_multi(&self) -> bool {
        let list = json(&[
            "bpftool",
            "-j",
            "cgroup",
            "show",
            self.cgroup.to_str().expect("utf-8"),
        ]);
        list.as_array().into_iter().flatten().any(|p| {
            p["id"].as_u64() == Some(self.id)
                && p["attach_type"].as_str() == Some("cgroup_inet_ingress")
                && p["attach_flags"].as_str() == Some("multi")
        })
    }

    /// Names of every program on the root (to show what else is there when a test fails).
    pub fn root_programs(&self) -> String {
        let out = sh(&[
            "bpftool",
            "cgroup",
            "show",
            self.cgroup.to_str().expect("utf-8"),
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
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
