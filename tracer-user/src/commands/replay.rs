//! `droptrace replay`: reads droptrace.v1 NDJSON (a file or stdin) and pushes every event
//! through the same output pipeline as `droptrace run` — to re-send a captured stream to a
//! SIEM, convert it to ECS/OCSF, or test sinks without the kernel.
use std::path::Path;

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    signal::unix::{SignalKind, signal},
};

use crate::{
    event::{Event, LostSource},
    output::Output,
};

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub events: u64,
    /// Lines that are not droptrace.v1 events (reported in-stream as one `lost` event).
    pub unparsable: u64,
}

impl ReplaySummary {
    pub fn line(&self) -> String {
        format!(
            "droptrace: replayed {} events, {} unparsable lines",
            self.events, self.unparsable
        )
    }
}

/// What `replay` reads.
pub type Input = Box<dyn AsyncRead + Unpin + Send>;

/// Opens `--input` (`-` = stdin) before anything else starts: a file that cannot be read is
/// bad input (one line, exit 2), not a failure halfway through.
pub fn open_input(path: &Path) -> Result<Input, String> {
    if path == Path::new("-") {
        return Ok(Box::new(tokio::io::stdin()));
    }
    let bad = |why: String| format!("--input {}: {why}", path.display());
    let f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    if f.metadata().is_ok_and(|m| m.is_dir()) {
        return Err(bad("is a directory".into()));
    }
    Ok(Box::new(tokio::fs::File::from_std(f)))
}

/// Replays `input` into `output` until EOF or SIGINT/SIGTERM.
pub async fn run(input: Input, output: &mut Output, node: &str) -> anyhow::Result<ReplaySummary> {
    // A large buffer: a file is read on tokio's blocking pool, one hand-off per fill.
    let mut lines = BufReader::with_capacity(1 << 20, input).lines();
    // The input is open: for replay that is "attached" (/readyz).
    if let Some(m) = output.metrics() {
        m.set_ready(true);
    }
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut summary = ReplaySummary::default();
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        let line = match line {
            Ok(Some(l)) => l,
            Ok(None) => break,
            // Invalid UTF-8 and the like: the line is skipped and counted.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                summary.unparsable += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Event>(&line) {
            Ok(e) => {
                output.send_wait(e).await;
                summary.events += 1;
            }
            Err(e) => {
                tracing::debug!("skipping line: {e}");
                summary.unparsable += 1;
            }
        }
    }
    if summary.unparsable > 0 {
        let e = Event::lost(
            node,
            summary.unparsable,
            LostSource::Input,
            "unparsable",
            None,
        );
        output.send_wait(e).await;
    }
    Ok(summary)
}
