//! The on-disk spool of one sink: an ordered log of records that the sink has not accepted
//! yet. Segment files `NNNNNNNNNNNNNNNNNNNN.log` (one record a line) are read in name order;
//! the head segment's read position is kept in `NNNN….pos`, rewritten (write + rename)
//! only after the sink accepted what was read, so a record leaves the spool exactly when
//! it was delivered. A crash between the sink's acceptance and the rename replays that
//! batch once more (at-least-once across crashes, exactly-once otherwise).
//!
//! Records normally go to the tail; `prepend` puts a batch that was already taken from the
//! memory queue back in front (a new segment with a smaller number), which keeps the order
//! when a sink fails with a batch in flight.
use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use bytes::Bytes;

use super::sink::Record;
use crate::event::Kind;

/// Fresh spools number segments from here, so there is room to prepend below.
const FIRST_ID: u64 = 1 << 40;

#[derive(Debug)]
struct Segment {
    id: u64,
    /// Bytes and records in the file.
    len: u64,
    records: u64,
    /// Bytes and records at its start already accepted by the sink (persisted in `.pos`).
    pos: u64,
    consumed: u64,
}

#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    segments: VecDeque<Segment>,
    /// Bytes and records not yet accepted by the sink.
    bytes: u64,
    records: u64,
    tail: Option<File>,
}

/// A batch read from the head, to `commit` once the sink accepted it.
#[derive(Debug)]
pub(crate) struct Peeked {
    pub(crate) records: Vec<Arc<Record>>,
    bytes: u64,
    segment: u64,
}

impl Spool {
    /// Opens (creating) the spool in `dir`, picking up what a previous run left.
    pub(crate) fn open(dir: &Path, max_bytes: u64) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        // Fail now, not at the first outage, if the directory is not writable.
        let probe = dir.join(".probe");
        File::create(&probe)?;
        fs::remove_file(&probe)?;
        let mut ids: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name();
                name.to_str()?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut spool = Self {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(4096, 8 << 20),
            segments: VecDeque::new(),
            bytes: 0,
            records: 0,
            tail: None,
        };
        for id in ids {
            let path = spool.seg_path(id);
            let len = fs::metadata(&path)?.len();
            let pos = fs::read_to_string(spool.pos_path(id))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .unwrap_or(0)
                .min(len);
            let records = count_lines_until(&path, len)?;
            let consumed = count_lines_until(&path, pos)?;
            spool.bytes += len - pos;
            spool.records += records - consumed;
            spool.segments.push_back(Segment {
                id,
                len,
                records,
                pos,
                consumed,
            });
        }
        while spool.segments.front().is_some_and(|s| s.pos >= s.len) {
            spool.pop_head()?;
        }
        Ok(spool)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.records == 0
    }

    pub(crate) fn records(&self) -> u64 {
        self.records
    }

    fn seg_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.log"))
    }

    fn pos_path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.pos"))
    }

    /// Appends records in order while they fit under the cap; returns how many did not fit
    /// (the caller discards and counts those: the last ones of `records`).
    pub(crate) fn append(&mut self, records: &[Arc<Record>]) -> io::Result<usize> {
        let mut buf = Vec::new();
        let mut fitted = 0;
        for r in records {
            let line = encode_line(r);
            if self.bytes + (buf.len() + line.len()) as u64 > self.max_bytes {
                break;
            }
            buf.extend_from_slice(&line);
            fitted += 1;
        }
        if fitted > 0 {
            self.write_tail(&buf, fitted as u64)?;
        }
        Ok(records.len() - fitted)
    }

    /// Appends past the cap: for the one `lost` record that accounts for what was discarded.
    pub(crate) fn append_unbounded(&mut self, r: &Record) -> io::Result<()> {
        self.write_tail(&encode_line(r), 1)
    }

    fn write_tail(&mut self, buf: &[u8], n: u64) -> io::Result<()> {
        if self
            .segments
            .back()
            .is_none_or(|s| s.len >= self.segment_bytes)
        {
            let id = self.segments.back().map_or(FIRST_ID, |s| s.id + 1);
            self.segments.push_back(Segment {
                id,
                len: 0,
                records: 0,
                pos: 0,
                consumed: 0,
            });
            self.tail = None;
        }
        let Some(seg) = self.segments.back() else {
            return Err(io::Error::other("spool has no tail segment"));
        };
        let path = self.seg_path(seg.id);
        let file = match &mut self.tail {
            Some(f) => f,
            slot => slot.insert(OpenOptions::new().create(true).append(true).open(path)?),
        };
        file.write_all(buf)?;
        if let Some(seg) = self.segments.back_mut() {
            seg.len += buf.len() as u64;
            seg.records += n;
        }
        self.bytes += buf.len() as u64;
        self.records += n;
        Ok(())
    }

    /// Puts records back in front of everything spooled, ignoring the cap: they were
    /// already taken into the pipeline, and there are at most a queue's worth.
    pub(crate) fn prepend(&mut self, records: &[Arc<Record>]) -> io::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let buf: Vec<u8> = records.iter().flat_map(|r| encode_line(r)).collect();
        let n = records.len() as u64;
        let Some(head) = self.segments.front() else {
            return self.write_tail(&buf, n);
        };
        let id = head
            .id
            .checked_sub(1)
            .ok_or_else(|| io::Error::other("spool segment numbers exhausted"))?;
        // Written whole, then renamed in: a crash never leaves half a prepended segment.
        let tmp = self.dir.join(format!("{id:020}.tmp"));
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&buf)?;
            f.sync_data()?;
        }
        fs::rename(&tmp, self.seg_path(id))?;
        self.segments.push_front(Segment {
            id,
            len: buf.len() as u64,
            records: n,
            pos: 0,
            consumed: 0,
        });
        self.bytes += buf.len() as u64;
        self.records += n;
        Ok(())
    }

    /// Reads up to `max` records from the head without removing them.
    pub(crate) fn peek(&mut self, max: usize) -> io::Result<Option<Peeked>> {
        let Some(head) = self.segments.front() else {
            return Ok(None);
        };
        let mut f = File::open(self.seg_path(head.id))?;
        f.seek(SeekFrom::Start(head.pos))?;
        let mut r = BufReader::new(f).take(head.len - head.pos);
        let mut records = Vec::new();
        let mut bytes = 0;
        let mut line = Vec::new();
        while records.len() < max {
            line.clear();
            let n = r.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            // A line we cannot parse (disk corruption, a foreign file) still counts as read,
            // so one bad line cannot wedge the sink; the caller counts it lost.
            records.push(Arc::new(decode_line(&line).unwrap_or_else(|| Record {
                kind: Kind::Lost,
                time: String::new(),
                line: Bytes::new(),
                otlp: Bytes::new(),
            })));
        }
        Ok(Some(Peeked {
            records,
            bytes,
            segment: head.id,
        }))
    }

    /// Removes a peeked batch: the sink accepted it.
    pub(crate) fn commit(&mut self, p: &Peeked) -> io::Result<()> {
        let Some(head) = self.segments.front_mut() else {
            return Ok(());
        };
        if head.id != p.segment {
            return Err(io::Error::other("spool commit out of order"));
        }
        head.pos += p.bytes;
        head.consumed += p.records.len() as u64;
        let (id, pos, done) = (head.id, head.pos, head.pos >= head.len);
        self.bytes -= p.bytes;
        self.records -= p.records.len() as u64;
        if done {
            self.pop_head()
        } else {
            let tmp = self.dir.join(format!("{id:020}.pos.tmp"));
            fs::write(&tmp, pos.to_string())?;
            fs::rename(&tmp, self.pos_path(id))
        }
    }

    fn pop_head(&mut self) -> io::Result<()> {
        if let Some(head) = self.segments.pop_front() {
            if self.segments.is_empty() {
                self.tail = None;
            }
            fs::remove_file(self.seg_path(head.id))?;
            match fs::remove_file(self.pos_path(head.id)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        Ok(())
    }
}

/// `KIND[~OTLP] TIME LINE\n`: the OTLP sidecar (binary) base64-encoded after the kind.
fn encode_line(r: &Record) -> Vec<u8> {
    use base64::Engine as _;
    let mut v = Vec::with_capacity(r.line.len() + r.time.len() + r.otlp.len() * 4 / 3 + 12);
    v.extend_from_slice(r.kind.as_str().as_bytes());
    if !r.otlp.is_empty() {
        v.push(b'~');
        v.extend_from_slice(
            base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(&r.otlp)
                .as_bytes(),
        );
    }
    v.push(b' ');
    v.extend_from_slice(r.time.as_bytes());
    v.push(b' ');
    v.extend_from_slice(&r.line);
    v.push(b'\n');
    v
}

fn count_lines_until(path: &Path, limit: u64) -> io::Result<u64> {
    let mut r = BufReader::new(File::open(path)?).take(limit);
    let mut n = 0;
    let mut line = Vec::new();
    loop {
        line.clear();
        if r.read_until(b'\n', &mut line)? == 0 {
            return Ok(n);
        }
        n += 1;
    }
}

fn decode_line(line: &[u8]) -> Option<Record> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    use base64::Engine as _;
    let mut parts = line.splitn(3, |b| *b == b' ');
    let head = parts.next()?;
    let (kind, otlp) = match head.iter().position(|b| *b == b'~') {
        Some(i) => (
            &head[..i],
            Bytes::from(
                base64::engine::general_purpose::STANDARD_NO_PAD
                    .decode(&head[i + 1..])
                    .ok()?,
            ),
        ),
        None => (head, Bytes::new()),
    };
    // Every kind by its serde name (= `Kind::as_str`): a kind added later spools too.
    let kind = {
        use serde::{Deserialize as _, de::IntoDeserializer as _};
        let name = std::str::from_utf8(kind).ok()?;
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            name.into_deserializer();
        Kind::deserialize(de).ok()?
    };
    let time = std::str::from_utf8(parts.next()?).ok()?.to_string();
    let json = parts.next()?;
    Some(Record {
        kind,
        time,
        line: Bytes::copy_from_slice(json),
        otlp,
    })
}

/// The spool directory of a sink: its name with everything but `[A-Za-z0-9.-]` as `_`.
pub(super) fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records of every kind come back from the spool as they went in (a kind the spool did
    /// not know came back as an empty line: `storm`, `connect`, the --raw kinds).
    #[test]
    fn every_kind_round_trips() {
        for kind in [
            Kind::Drop,
            Kind::Lost,
            Kind::Stall,
            Kind::Tns,
            Kind::TcpState,
            Kind::Retransmit,
            Kind::Conntrack,
            Kind::Storm,
            Kind::Connect,
        ] {
            let r = Record {
                kind,
                time: "2026-12-02T08:00:00.000001Z".into(),
                line: Bytes::from_static(b"{\"kind\":\"x\"}"),
                otlp: Bytes::from_static(b"\x0a\x03abc"),
            };
            let back = decode_line(&encode_line(&r)).unwrap_or_else(|| panic!("{kind:?}"));
            assert_eq!(
                (back.kind, back.time, back.line, back.otlp),
                (r.kind, r.time, r.line, r.otlp)
            );
        }
    }

    fn rec(i: u32) -> Arc<Record> {
        Arc::new(Record {
            kind: Kind::Drop,
            time: format!("2026-01-01T00:00:{:02}.000000Z", i % 60),
            line: Bytes::from(format!("{{\"i\":{i}}}")),
            otlp: Bytes::new(),
        })
    }

    fn ids(p: &Peeked) -> Vec<String> {
        p.records
            .iter()
            .map(|r| String::from_utf8_lossy(&r.line).into_owned())
            .collect()
    }

    #[test]
    fn append_peek_commit_in_order_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.append(&(0..10).map(rec).collect::<Vec<_>>()).unwrap(), 0);
        let p = s.peek(4).unwrap().unwrap();
        assert_eq!(
            ids(&p),
            ["{\"i\":0}", "{\"i\":1}", "{\"i\":2}", "{\"i\":3}"]
        );
        s.commit(&p).unwrap();
        assert_eq!(s.records(), 6);
        // Not committed: must come back after a restart.
        let _ = s.peek(3).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(s.records(), 6);
        s.prepend(&[rec(100), rec(101)]).unwrap();
        let p = s.peek(100).unwrap().unwrap();
        assert_eq!(ids(&p), ["{\"i\":100}", "{\"i\":101}"]);
        s.commit(&p).unwrap();
        let p = s.peek(100).unwrap().unwrap();
        assert_eq!(p.records.len(), 6);
        assert_eq!(p.records[0].time, "2026-01-01T00:00:04.000000Z");
        s.commit(&p).unwrap();
        assert!(s.is_empty());
        assert!(s.peek(1).unwrap().is_none());
        // Everything consumed: no files left but the directory.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn otlp_sidecar_survives_the_spool() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let mut with = (*rec(1)).clone();
        // Binary, with newlines and spaces: base64 in the spool line.
        with.otlp = Bytes::from_static(b"\n\x00\xff \n~");
        s.append(&[Arc::new(with.clone()), rec(2)]).unwrap();
        drop(s);
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        let p = s.peek(10).unwrap().unwrap();
        assert_eq!(p.records.len(), 2);
        assert_eq!(p.records[0].otlp, with.otlp);
        assert_eq!(p.records[0].line, with.line);
        assert_eq!(p.records[0].time, with.time);
        assert!(p.records[1].otlp.is_empty());
        // Raw kinds come back as themselves.
        let mut raw = (*rec(3)).clone();
        raw.kind = Kind::TcpState;
        assert_eq!(
            decode_line(&encode_line(&raw)).unwrap().kind,
            Kind::TcpState
        );
    }

    #[test]
    fn cap_discards_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let line_len = encode_line(&rec(1)).len() as u64;
        let mut s = Spool::open(dir.path(), line_len * 3).unwrap();
        let over = s.append(&(0..5).map(rec).collect::<Vec<_>>()).unwrap();
        assert_eq!(over, 2);
        assert_eq!(s.records(), 3);
    }

    #[test]
    fn many_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Spool::open(dir.path(), 1 << 20).unwrap();
        s.segment_bytes = 64;
        for i in 0..50 {
            s.append(&[rec(i)]).unwrap();
        }
        let mut seen = Vec::new();
        while let Some(p) = s.peek(7).unwrap() {
            seen.extend(ids(&p));
            s.commit(&p).unwrap();
        }
        let want: Vec<_> = (0..50).map(|i| format!("{{\"i\":{i}}}")).collect();
        assert_eq!(seen, want);
    }

    #[test]
    fn unwritable_dir_fails_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        fs::write(&file, "x").unwrap();
        assert!(Spool::open(&file.join("sub"), 1024).is_err());
    }

    #[test]
    fn sanitized_spool_names() {
        assert_eq!(sanitize("syslog+tls://h:6514"), "syslog_tls___h_6514");
    }
}
