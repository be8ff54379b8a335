//! Where encoded events go. Each sink takes whole lines (one JSON object each).
use std::io::{self, Write};

/// Standard output, line-buffered by batch: the caller flushes after each drain.
pub struct Stdout {
    out: io::BufWriter<io::Stdout>,
    pub sent: u64,
    pub errors: u64,
}

impl Default for Stdout {
    fn default() -> Self {
        Self {
            out: io::BufWriter::with_capacity(64 * 1024, io::stdout()),
            sent: 0,
            errors: 0,
        }
    }
}

impl Stdout {
    pub fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        self.out.write_all(line)?;
        self.out.write_all(b"\n")?;
        self.sent += 1;
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
