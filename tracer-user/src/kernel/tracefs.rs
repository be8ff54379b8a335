//! Tracepoint record layouts from tracefs `format` files.
use std::{
    collections::HashMap,
    ffi::CString,
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum TracefsError {
    #[error("tracefs is not mounted and mounting it at {path} failed: {err}")]
    Mount { path: String, err: std::io::Error },
    #[error("tracepoint {0} does not exist on this kernel")]
    NoTracepoint(String),
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: std::io::Error },
    #[error("{path}: field {field} missing from the record format")]
    NoField { path: String, field: String },
}

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The tracefs mount point; mounts it at /sys/kernel/tracing when nothing is mounted.
pub fn ensure_mounted() -> Result<PathBuf, TracefsError> {
    if let Some(p) = mounted() {
        return Ok(p);
    }
    let target = CANDIDATES[0];
    let c_target = CString::new(target).expect("no NUL");
    let fstype = CString::new("tracefs").expect("no NUL");
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            c_target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(TracefsError::Mount {
            path: target.to_string(),
            err: std::io::Error::last_os_error(),
        });
    }
    Ok(PathBuf::from(target))
}

/// The tracefs mount point, if one is mounted and readable.
pub fn mounted() -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub offset: u32,
    pub size: u32,
}

/// A parsed `format` file.
#[derive(Debug, Clone, Default)]
pub struct Format {
    pub fields: HashMap<String, Field>,
    /// Value -> name pairs from a `__print_symbolic(REC->reason, ...)` in the print format.
    pub reason_symbols: Vec<(u64, String)>,
    origin: String,
}

impl Format {
    /// Reads `events/<category>/<name>/format` under the tracefs mount `root`.
    pub fn read(root: &Path, category: &str, name: &str) -> Result<Self, TracefsError> {
        let dir = root.join("events").join(category).join(name);
        if !dir.is_dir() {
            return Err(TracefsError::NoTracepoint(format!("{category}:{name}")));
        }
        let path = dir.join("format");
        let text = fs::read_to_string(&path).map_err(|err| TracefsError::Read {
            path: path.display().to_string(),
            err,
        })?;
        Ok(Self::parse(&text, &path.display().to_string()))
    }

    pub fn parse(text: &str, origin: &str) -> Self {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let line = line.trim();
            let Some(rest) = line.strip_prefix("field:") else {
                continue;
            };
            let mut decl = None;
            let mut offset = None;
            let mut size = None;
            for part in rest.split(';').map(str::trim) {
                if let Some(v) = part.strip_prefix("offset:") {
                    offset = v.parse().ok();
                } else if let Some(v) = part.strip_prefix("size:") {
                    size = v.parse().ok();
                } else if decl.is_none() && !part.is_empty() && !part.contains(':') {
                    decl = Some(part);
                }
            }
            // "unsigned short protocol", "__u8 saddr[4]": the name is the last word.
            if let (Some(decl), Some(offset), Some(size)) = (decl, offset, size)
                && let Some(last) = decl.split_whitespace().last()
            {
                let name = last.split('[').next().unwrap_or(last).trim_start_matches('*');
                fields.insert(name.to_string(), Field { offset, size });
            }
        }
        Self {
            fields,
            reason_symbols: parse_print_symbolic(text, "REC->reason"),
            origin: origin.to_string(),
        }
    }

    pub fn field(&self, name: &str) -> Result<&Field, TracefsError> {
        self.fields.get(name).ok_or_else(|| TracefsError::NoField {
            path: self.origin.clone(),
            field: name.to_string(),
        })
    }

    pub fn offset(&self, name: &str) -> Result<u32, TracefsError> {
        self.field(name).map(|f| f.offset)
    }
}

/// `__print_symbolic(ARG, { 2, "NOT_SPECIFIED" }, { 3, "NO_SOCKET" }, ...)`.
fn parse_print_symbolic(text: &str, arg: &str) -> Vec<(u64, String)> {
    let needle = format!("__print_symbolic({arg},");
    let Some(start) = text.find(&needle) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut rest = &text[start + needle.len()..];
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let entry = &rest[open + 1..open + close];
        if let Some((num, name)) = entry.split_once(',') {
            let name = name.trim().trim_matches('"');
            if let Ok(v) = num.trim().parse::<u64>() {
                out.push((v, name.to_string()));
            }
        }
        rest = &rest[open + close + 1..];
        // Stop at the end of this __print_symbolic call.
        if rest.trim_start().starts_with(')') {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const F618: &str = include_str!("../../tests/fixtures/kfree_skb.format-6.18");
    const F519: &str = include_str!("../../tests/fixtures/kfree_skb.format-5.19");

    #[test]
    fn kfree_skb_offsets_of_this_kernel_generation() {
        let f = Format::parse(F618, "6.18");
        assert_eq!(f.offset("skbaddr").unwrap(), 8);
        assert_eq!(f.offset("location").unwrap(), 16);
        assert_eq!(f.offset("rx_sk").unwrap(), 24);
        assert_eq!(f.offset("protocol").unwrap(), 32);
        assert_eq!(f.field("reason").unwrap(), &Field { offset: 36, size: 4 });
        let names: HashMap<_, _> = f.reason_symbols.iter().cloned().collect();
        assert_eq!(names[&12], "NETFILTER_DROP");
        assert_eq!(names[&73], "TC_INGRESS");
        assert_eq!(names[&128], "MAX");
    }

    #[test]
    fn kfree_skb_offsets_of_an_older_layout_without_rx_sk() {
        let f = Format::parse(F519, "5.19");
        assert!(f.field("rx_sk").is_err());
        assert_eq!(f.offset("protocol").unwrap(), 24);
        assert_eq!(f.offset("reason").unwrap(), 28);
        let names: HashMap<_, _> = f.reason_symbols.iter().cloned().collect();
        assert_eq!(names[&7], "NETFILTER_DROP");
        assert_eq!(names[&48], "TC_INGRESS");
    }

    #[test]
    fn array_fields_and_missing_fields() {
        let f = Format::parse(
            "\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;\n",
            "x",
        );
        assert_eq!(f.field("saddr").unwrap(), &Field { offset: 34, size: 4 });
        let err = f.offset("nope").unwrap_err().to_string();
        assert_eq!(err, "x: field nope missing from the record format");
    }
}
