//! Code addresses to `function+0xoffset`, from /proc/kallsyms.
use std::fs;

/// Sorted text symbols. Names live in one string to keep ~200k symbols compact.
#[derive(Default)]
pub struct Kallsyms {
    addrs: Vec<u64>,
    /// (start, len) into `names` for each address.
    spans: Vec<(u32, u32)>,
    names: String,
}

impl Kallsyms {
    /// Loads /proc/kallsyms. Without privileges the kernel shows zero addresses; the result
    /// is then empty and locations print as raw addresses.
    pub fn load() -> Self {
        fs::read_to_string("/proc/kallsyms")
            .map(|t| Self::parse(&t))
            .unwrap_or_default()
    }

    pub fn parse(text: &str) -> Self {
        let mut entries: Vec<(u64, &str)> = text
            .lines()
            .filter_map(|line| {
                let mut it = line.split_whitespace();
                let addr = u64::from_str_radix(it.next()?, 16).ok()?;
                let kind = it.next()?;
                let name = it.next()?;
                (addr != 0 && matches!(kind, "t" | "T" | "w" | "W")).then_some((addr, name))
            })
            .collect();
        entries.sort_unstable_by_key(|&(a, _)| a);
        entries.dedup_by_key(|e| e.0);
        let mut out = Self::default();
        for (addr, name) in entries {
            out.addrs.push(addr);
            out.spans.push((out.names.len() as u32, name.len() as u32));
            out.names.push_str(name);
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.addrs.is_empty()
    }

    /// Nearest symbol at or below `addr`.
    pub fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        let idx = match self.addrs.binary_search(&addr) {
            Ok(i) => i,
            Err(0) => return None,
            Err(i) => i - 1,
        };
        let (start, len) = self.spans[idx];
        let name = &self.names[start as usize..(start + len) as usize];
        Some((name, addr - self.addrs[idx]))
    }

    /// `nf_hook_slow+0x9c`, or `0xffffffff81234567` when unknown.
    pub fn symbolize(&self, addr: u64) -> String {
        match self.lookup(addr) {
            Some((name, off)) => format!("{name}+{off:#x}"),
            None => format!("{addr:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
ffffffff81a00000 T nf_hook_slow
ffffffff81a00100 t nf_hook_slow_list
0000000000000000 A fixed_percpu_data
ffffffff81a00200 D some_data
ffffffffc0001000 t cls_bpf_classify\t[cls_bpf]
";

    #[test]
    fn symbolizes_function_plus_offset() {
        let k = Kallsyms::parse(SAMPLE);
        assert_eq!(k.symbolize(0xffffffff81a0009c), "nf_hook_slow+0x9c");
        assert_eq!(k.symbolize(0xffffffff81a00100), "nf_hook_slow_list+0x0");
        assert_eq!(k.symbolize(0xffffffffc0001010), "cls_bpf_classify+0x10");
        assert_eq!(k.symbolize(0x1000), "0x1000");
    }
}
