//! The real `droptrace` binary, run as a separate process the way a user runs it.
use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn binary() -> PathBuf {
    let bin = std::env::var_os("DROPTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::workspace_root().join("target/debug/droptrace"));
    assert!(
        bin.is_file(),
        "droptrace binary not found at {} (run `cargo xtask test`, which builds it)",
        bin.display()
    );
    bin
}

#[derive(Default)]
struct Shared {
    events: Vec<Value>,
    stderr: Vec<String>,
    attached: bool,
    bad_lines: Vec<String>,
}

const ATTACH_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a test waits for an incident after its client gave up: it comes within a second
/// on a host; a debug build in an emulated VM on a loaded machine has taken over 8 s. Waits
/// end as soon as the event is there: only a failing test pays the whole of it.
pub const EVENT_WAIT: Duration = Duration::from_secs(30);

/// Sends `signal` to `child` (unless it has exited) and waits up to `limit` for its exit
/// status; after that it is killed, reaped, and None returned.
pub fn signal_and_wait(
    child: &mut std::process::Child,
    signal: i32,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    if child.try_wait().ok().flatten().is_none() {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe { libc::kill(child.id() as i32, signal) };
    }
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A running `droptrace run`; killed on drop if not stopped.
pub struct Droptrace {
    child: Option<Child>,
    shared: Arc<(Mutex<Shared>, Condvar)>,
    /// The stdout and stderr readers: they end at EOF, after droptrace exits.
    readers: Vec<thread::JoinHandle<()>>,
}

pub struct Finished {
    pub events: Vec<Value>,
    pub stderr: String,
    pub code: Option<i32>,
}

impl Droptrace {
    /// Starts `droptrace run ARGS` and waits until it reports its programs attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(&[], args)
    }

    /// Like `start`, behind a wrapper command (e.g. `setpriv ... --`).
    pub fn start_with(wrapper: &[&str], args: &[&str]) -> Self {
        Self::spawn(Self::command(wrapper, args))
    }

    /// Like `start_with`; a droptrace that exits before attaching is returned as finished.
    pub fn try_start_with(wrapper: &[&str], args: &[&str]) -> Result<Self, Finished> {
        Self::try_spawn(Self::command(wrapper, args))
    }

    fn command(wrapper: &[&str], args: &[&str]) -> Command {
        let mut cmd = match wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(binary());
                c
            }
            None => Command::new(binary()),
        };
        cmd.arg("run").args(args).env("DROPTRACE_LOG", "info");
        cmd
    }

    /// `cmd` is a complete droptrace invocation (e.g. `podman run ... IMAGE run ARGS`): starts
    /// it and waits until it reports its programs attached.
    pub fn spawn(cmd: Command) -> Self {
        Self::try_spawn(cmd).unwrap_or_else(|f| {
            panic!(
                "droptrace exited ({:?}) before attaching:\n{}",
                f.code, f.stderr
            )
        })
    }

    /// Like `spawn`; a droptrace that exits before attaching is returned as finished.
    pub fn try_spawn(mut cmd: Command) -> Result<Self, Finished> {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start droptrace");
        let shared = Arc::new((Mutex::new(Shared::default()), Condvar::new()));
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        let s = shared.clone();
        let stdout_reader = thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*s;
                let mut g = lock.lock().unwrap();
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => g.events.push(v),
                    Err(_) => g.bad_lines.push(line),
                }
                cv.notify_all();
            }
        });
        let s = shared.clone();
        let stderr_reader = thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                let (lock, cv) = &*s;
                let mut g = lock.lock().unwrap();
                if line.contains("attached; tracing") {
                    g.attached = true;
                }
                g.stderr.push(line);
                cv.notify_all();
            }
        });
        let mut d = Self {
            child: Some(child),
            shared,
            readers: vec![stdout_reader, stderr_reader],
        };
        if d.wait_attached() {
            Ok(d)
        } else {
            Err(d.stop())
        }
    }

    /// Whether it attached; false when it exited first. Loading takes seconds in an emulated
    /// VM: the limit is generous.
    fn wait_attached(&mut self) -> bool {
        let deadline = Instant::now() + ATTACH_TIMEOUT;
        let (lock, cv) = &*self.shared;
        let mut g = lock.lock().unwrap();
        while !g.attached {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                return false;
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "droptrace did not attach in {} s:\n{}",
                ATTACH_TIMEOUT.as_secs(),
                g.stderr.join("\n")
            );
            g = cv.wait_timeout(g, Duration::from_millis(200)).unwrap().0;
        }
        true
    }

    /// Waits until an event matching `pred` arrives (or `timeout`), returning it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.shared;
        let mut g = lock.lock().unwrap();
        loop {
            if let Some(v) = g.events.iter().find(|v| pred(v)) {
                return Some(v.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    pub fn events(&self) -> Vec<Value> {
        self.shared.0.lock().unwrap().events.clone()
    }

    /// SIGINT, then waits for a clean exit and returns everything it printed.
    pub fn stop(self) -> Finished {
        self.stop_with(libc::SIGINT)
    }

    /// `signal` (SIGINT, SIGTERM), then as `stop`.
    pub fn stop_with(mut self, signal: i32) -> Finished {
        let mut child = self.child.take().expect("running");
        let status = signal_and_wait(&mut child, signal, Duration::from_secs(60));
        // Every line it wrote is read before the events are taken: parsing thousands of
        // records takes a while in a slow (emulated) machine.
        let readers_deadline = Instant::now() + Duration::from_secs(60);
        for r in std::mem::take(&mut self.readers) {
            while !r.is_finished() && Instant::now() < readers_deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        let g = self.shared.0.lock().unwrap();
        assert!(
            g.bad_lines.is_empty(),
            "non-JSON lines on stdout: {:?}",
            g.bad_lines
        );
        Finished {
            events: g.events.clone(),
            stderr: g.stderr.join("\n"),
            code: status.and_then(|s| s.code()),
        }
    }
}

impl Drop for Droptrace {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Field accessors that read like the contract.
pub fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path).as_str().unwrap_or("")
}

pub fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}
