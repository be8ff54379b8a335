//! One VM: qemu under software emulation (TCG: KVM guests hang on this machine kind), no NIC
//! (test traffic stays on veth pairs inside the guest), the host's / read-only over 9p. The
//! VM is killed when its handle drops, so a failing or interrupted run leaves nothing behind.
use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use super::{
    initramfs::{BOOTED, TAG_MODULES, TAG_OUT, TAG_ROOT},
    kernels::Kernel,
};

pub(super) const QEMU: &str = "qemu-system-x86_64";
/// From power-on to the initramfs handing over (6-10 s unloaded; minutes under host load).
const BOOT_TIMEOUT: Duration = Duration::from_secs(150);

pub(super) struct Vm {
    child: Option<Child>,
    pub console: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub(super) struct Spec<'a> {
    pub kernel: &'a Kernel,
    pub initrd: &'a Path,
    /// Shared read-write at /vm/out: plan in, results and logs out.
    pub out: &'a Path,
    /// The xtask binary the guest runs as PID 1.
    pub guest: &'a Path,
    pub memory_mib: u32,
    pub cpus: u32,
}

pub(super) enum Outcome {
    /// The guest powered off by itself.
    Finished,
    /// It did not reach its root filesystem in time.
    BootHung,
    /// It ran over the leg's time limit and was killed.
    TimedOut,
}

fn virtfs(path: &Path, tag: &str, readonly: bool) -> String {
    format!(
        "local,path={},mount_tag={tag},security_model=none,multidevs=remap{}",
        path.display(),
        if readonly { ",readonly=on" } else { "" }
    )
}

impl Vm {
    pub(super) fn start(s: &Spec) -> anyhow::Result<Self> {
        let console = s.out.join("console.log");
        let _ = fs::remove_file(&console);
        let append = format!(
            "console=ttyS0 panic=-1 quiet loglevel=4 dt_init={}",
            s.guest.display()
        );
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-cpu", "max", "-machine", "q35"])
            .args(["-smp", &s.cpus.to_string(), "-m", &s.memory_mib.to_string()])
            .args(["-nic", "none", "-display", "none", "-monitor", "none"])
            .args(["-no-reboot", "-serial"])
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&s.kernel.vmlinuz)
            .arg("-initrd")
            .arg(s.initrd)
            .args(["-append", &append])
            .args(["-virtfs", &virtfs(Path::new("/"), TAG_ROOT, true)])
            .args(["-virtfs", &virtfs(&s.kernel.modules, TAG_MODULES, true)])
            .args(["-virtfs", &virtfs(s.out, TAG_OUT, false)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(s.out.join("qemu.stderr"))?);
        // SAFETY: prctl is async-signal-safe; it only sets this child's death signal. Whatever
        // ends xtask (a signal, a CI timeout's SIGKILL) ends the VM with it.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {QEMU} (`cargo xtask setup` installs it)"))?;
        Ok(Self {
            child: Some(child),
            console,
        })
    }

    fn exited(&mut self) -> bool {
        self.child
            .as_mut()
            .is_none_or(|c| c.try_wait().ok().flatten().is_some())
    }

    fn console_text(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits for the boot, then for the guest to power off within `limit`.
    pub(super) fn wait(&mut self, limit: Duration) -> Outcome {
        let t0 = Instant::now();
        let mut booted = false;
        loop {
            if self.exited() {
                return if booted || self.console_text().contains(BOOTED) {
                    Outcome::Finished
                } else {
                    Outcome::BootHung
                };
            }
            if !booted {
                booted = self.console_text().contains(BOOTED);
                if !booted && t0.elapsed() > BOOT_TIMEOUT {
                    return Outcome::BootHung;
                }
            }
            if t0.elapsed() > limit {
                return Outcome::TimedOut;
            }
            thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The last lines of the serial console, for a failure message.
pub(super) fn console_tail(console: &Path, lines: usize) -> String {
    let text = fs::read(console)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Boots once, and once more if the first boot hung (seen about once in 75 boots under load).
pub(super) fn run(s: &Spec, limit: Duration) -> anyhow::Result<u32> {
    for attempt in 1..=2 {
        let mut vm = Vm::start(s)?;
        match vm.wait(limit) {
            Outcome::Finished => return Ok(attempt),
            Outcome::BootHung if attempt == 1 => {
                crate::step(&format!("{}: boot hung; retrying once", s.kernel.release));
                drop(vm);
                let _ = fs::remove_file(s.out.join("results.jsonl"));
            }
            Outcome::BootHung => bail!(
                "{}: boot hung twice; console:\n{}",
                s.kernel.release,
                console_tail(&vm.console, 30)
            ),
            Outcome::TimedOut => bail!(
                "{}: still running after {} s; killed. Console:\n{}",
                s.kernel.release,
                limit.as_secs(),
                console_tail(&vm.console, 30)
            ),
        }
    }
    unreachable!("the second attempt returns")
}
