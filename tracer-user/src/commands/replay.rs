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
    output::{BATCH, Output},
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
    let mut reader = BufReader::with_capacity(1 << 20, input);
    // The input is open: for replay that is "attached" (/readyz).
    if let Some(m) = output.metrics() {
        m.set_ready(true);
    }
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut summary = ReplaySummary::default();
    let mut line = Vec::new();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        // Parsed events go to the output in batches, and before waiting for more input: a
        // live stream (stdin) is never held back waiting for a batch to fill.
        if batch.len() >= BATCH || !batch.is_empty() && !reader.buffer().contains(&b'\n') {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
            output.send_all_wait(full).await;
        }
        line.clear();
        let n = tokio::select! {
            n = reader.read_until(b'\n', &mut line) => n?,
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        };
        if n == 0 {
            break;
        }
        if blank(&line) {
            continue;
        }
        // Invalid UTF-8 is skipped and counted like any unparsable line. The line is checked
        // whole: far faster than serde_json checking each string of it.
        let parsed = std::str::from_utf8(&line)
            .map_err(|e| e.to_string())
            .and_then(|l| serde_json::from_str::<Event>(l).map_err(|e| e.to_string()));
        match parsed {
            Ok(e) => {
                batch.push(e);
                summary.events += 1;
            }
            Err(e) => {
                tracing::debug!("skipping line: {e}");
                summary.unparsable += 1;
            }
        }
    }
    output.send_all_wait(batch).await;
    if summary.unparsable > 0 {
        let e = Event::lost(
            node,
            summary.unparsable,
            LostSource::Input,
            "unparsable",
            None,
        );
        output.send_all_wait(vec![e]).await;
    }
    Ok(summary)
}

/// Nothing but whitespace (and the line end), as `str::trim` has it.
fn blank(line: &[u8]) -> bool {
    const VERTICAL_TAB: u8 = 0x0b;
    match line.trim_ascii() {
        [] => true,
        // Any other ASCII byte is not whitespace to `str::trim` either.
        t if t[0].is_ascii() && t[0] != VERTICAL_TAB => false,
        // Unicode whitespace, and the vertical tab `trim_ascii` keeps.
        t => std::str::from_utf8(t).is_ok_and(|s| s.trim().is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::blank;

    #[test]
    fn blank_lines_are_what_str_trim_calls_empty() {
        let lines: [&[u8]; 9] = [
            b"\n",
            b"  \t\r\n",
            b"\x0b\n",
            " \u{a0}\u{2003}\n".as_bytes(),
            b"{}\n",
            b" x \n",
            b"\x0bx\n",
            b"\xff\n",
            b" \xe2\x80\n",
        ];
        for l in lines {
            let by_str = std::str::from_utf8(l).is_ok_and(|s| s.trim().is_empty());
            assert_eq!(blank(l), by_str, "{l:?}");
        }
    }
}
