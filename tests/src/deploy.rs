//! The deployment's capability list, read from its single source `deploy/capabilities.txt`
//! (the manifest test and the privilege test both use this, so they cannot disagree).
use std::path::PathBuf;

use crate::workspace_root;

pub fn capabilities_file() -> PathBuf {
    workspace_root().join("deploy/capabilities.txt")
}

/// Kubernetes spelling, in file order: `["BPF", "PERFMON", ...]`.
pub fn capabilities() -> Vec<String> {
    let path = capabilities_file();
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    parse_capabilities(&text)
}

/// One name a line; `#` starts a comment; blank lines are skipped.
pub fn parse_capabilities(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect()
}

/// For `setpriv --inh-caps X --ambient-caps X`: `+bpf,+perfmon,...`.
pub fn setpriv_caps() -> String {
    capabilities()
        .iter()
        .map(|c| format!("+{}", c.to_ascii_lowercase()))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_blank_lines_are_not_capabilities() {
        let caps = parse_capabilities("# head\n\nBPF   # why\n  PERFMON\n#NET_ADMIN\n");
        assert_eq!(caps, ["BPF", "PERFMON"]);
    }
}
