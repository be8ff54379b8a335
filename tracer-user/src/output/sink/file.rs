//! `file:PATH`: NDJSON appended to a file, rotated by size (PATH.1 … PATH.N, newest first).
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::Record;

#[derive(Debug)]
pub(crate) struct FileSink {
    path: PathBuf,
    /// 0 = never rotate.
    rotate_size: u64,
    rotate_keep: u32,
    file: Option<File>,
    size: u64,
}

impl FileSink {
    /// Opens the file now, so a bad path fails at start.
    pub(crate) fn open(path: &Path, rotate_size: u64, rotate_keep: u32) -> io::Result<Self> {
        let mut s = Self {
            path: path.to_path_buf(),
            rotate_size,
            rotate_keep,
            file: None,
            size: 0,
        };
        s.reopen()?;
        Ok(s)
    }

    fn reopen(&mut self) -> io::Result<()> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = f.metadata()?.len();
        self.file = Some(f);
        Ok(())
    }

    /// Accepted = handed to the kernel (write(2) returned); no fsync per batch.
    pub(crate) fn deliver(&mut self, batch: &[Arc<Record>]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(batch.iter().map(|r| r.line.len() + 1).sum());
        for r in batch {
            buf.extend_from_slice(&r.line);
            buf.push(b'\n');
        }
        if self.rotate_size > 0 && self.size > 0 && self.size + buf.len() as u64 > self.rotate_size
        {
            self.rotate()?;
        }
        if self.file.is_none() {
            self.reopen()?;
        }
        let Some(f) = self.file.as_mut() else {
            return Err(io::Error::other("file not open"));
        };
        if let Err(e) = f.write_all(&buf) {
            // Reopen next time: the file may have been removed or the disk remounted.
            self.file = None;
            return Err(e);
        }
        self.size += buf.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        let numbered = |i: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{i}"));
            PathBuf::from(p)
        };
        if self.rotate_keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            // PATH.N-1 -> PATH.N, ..., PATH -> PATH.1; the oldest falls off.
            for i in (1..self.rotate_keep).rev() {
                match fs::rename(numbered(i), numbered(i + 1)) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
            }
            fs::rename(&self.path, numbered(1))?;
        }
        self.reopen()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Kind;

    #[test]
    fn rotates_and_keeps_n() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.ndjson");
        let mut s = FileSink::open(&path, 100, 2).unwrap();
        let rec = Arc::new(Record {
            kind: Kind::Drop,
            time: String::new(),
            line: bytes::Bytes::from(vec![b'x'; 39]),
            otlp: bytes::Bytes::new(),
        });
        for _ in 0..10 {
            s.deliver(std::slice::from_ref(&rec)).unwrap();
        }
        // 40 bytes a line, 100 bytes a file: 2 lines per file, 5 files made, 3 kept.
        let read = |p: &Path| fs::read_to_string(p).unwrap().lines().count();
        assert_eq!(read(&path), 2);
        assert_eq!(read(&dir.path().join("out.ndjson.1")), 2);
        assert_eq!(read(&dir.path().join("out.ndjson.2")), 2);
        assert!(!dir.path().join("out.ndjson.3").exists());
    }
}
