//! Cuts a kernel's BTF (and a module's split BTF on top of it) down to the types droptrace
//! resolves, so a fixture of each kernel of the matrix fits in the repository: the named
//! roots and everything they embed, with pointers turned into `void *` (a pointer's size does
//! not depend on its target, so every offset stays the kernel's own). Type ids are renumbered
//! and the string sections rebuilt; the result is still base + split BTF, as the kernel has it.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context as _, bail};

const MAGIC: u16 = 0xeb9f;
const HDR_LEN: usize = 24;

mod kind {
    pub(super) const INT: u8 = 1;
    pub(super) const PTR: u8 = 2;
    pub(super) const ARRAY: u8 = 3;
    pub(super) const STRUCT: u8 = 4;
    pub(super) const UNION: u8 = 5;
    pub(super) const ENUM: u8 = 6;
    pub(super) const FWD: u8 = 7;
    pub(super) const TYPEDEF: u8 = 8;
    pub(super) const VOLATILE: u8 = 9;
    pub(super) const CONST: u8 = 10;
    pub(super) const RESTRICT: u8 = 11;
    pub(super) const FUNC: u8 = 12;
    pub(super) const FUNC_PROTO: u8 = 13;
    pub(super) const VAR: u8 = 14;
    pub(super) const DATASEC: u8 = 15;
    pub(super) const FLOAT: u8 = 16;
    pub(super) const DECL_TAG: u8 = 17;
    pub(super) const TYPE_TAG: u8 = 18;
    pub(super) const ENUM64: u8 = 19;
}

#[derive(Clone, Debug)]
struct RawType {
    name_off: u32,
    info: u32,
    size_type: u32,
    extra: Vec<u32>,
}

impl RawType {
    fn kind(&self) -> u8 {
        ((self.info >> 24) & 0x1f) as u8
    }

    fn vlen(&self) -> usize {
        (self.info & 0xffff) as usize
    }

    /// Positions of type references: None for `size_type`, Some(i) for `extra[i]`.
    fn refs(&self) -> Vec<Option<usize>> {
        use kind::*;
        let n = self.vlen();
        match self.kind() {
            PTR | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | TYPE_TAG | DECL_TAG | VAR => {
                vec![None]
            }
            ARRAY => vec![Some(0), Some(1)],
            STRUCT | UNION => (0..n).map(|i| Some(3 * i + 1)).collect(),
            FUNC_PROTO => std::iter::once(None)
                .chain((0..n).map(|i| Some(2 * i + 1)))
                .collect(),
            DATASEC => (0..n).map(|i| Some(3 * i)).collect(),
            _ => Vec::new(),
        }
    }

    /// Positions of string offsets in `extra` (besides `name_off`).
    fn names(&self) -> Vec<usize> {
        use kind::*;
        let n = self.vlen();
        match self.kind() {
            STRUCT | UNION | ENUM64 => (0..n).map(|i| 3 * i).collect(),
            ENUM | FUNC_PROTO => (0..n).map(|i| 2 * i).collect(),
            _ => Vec::new(),
        }
    }
}

fn extra_words(kind: u8, vlen: usize) -> anyhow::Result<usize> {
    use kind::*;
    Ok(match kind {
        INT | VAR | DECL_TAG => 1,
        PTR | FWD | TYPEDEF | VOLATILE | CONST | RESTRICT | FUNC | FLOAT | TYPE_TAG => 0,
        ARRAY => 3,
        STRUCT | UNION | DATASEC | ENUM64 => 3 * vlen,
        ENUM | FUNC_PROTO => 2 * vlen,
        k => bail!("unknown BTF kind {k}"),
    })
}

struct Section {
    types: Vec<RawType>,
    strings: Vec<u8>,
}

fn u32_at(b: &[u8], at: usize) -> anyhow::Result<u32> {
    Ok(u32::from_le_bytes(
        b.get(at..at + 4)
            .context("BTF truncated")?
            .try_into()
            .expect("4 bytes"),
    ))
}

fn parse(b: &[u8]) -> anyhow::Result<Section> {
    if b.len() < HDR_LEN || u16::from_le_bytes([b[0], b[1]]) != MAGIC {
        bail!("not little-endian BTF");
    }
    let hdr_len = u32_at(b, 4)? as usize;
    let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
    let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
    let t = hdr_len + type_off;
    let s = hdr_len + str_off;
    let strings = b.get(s..s + str_len).context("BTF strings")?.to_vec();
    let mut types = Vec::new();
    let mut at = t;
    while at < t + type_len {
        let info = u32_at(b, at + 4)?;
        let mut ty = RawType {
            name_off: u32_at(b, at)?,
            info,
            size_type: u32_at(b, at + 8)?,
            extra: Vec::new(),
        };
        at += 12;
        for _ in 0..extra_words(ty.kind(), ty.vlen())? {
            ty.extra.push(u32_at(b, at)?);
            at += 4;
        }
        types.push(ty);
    }
    Ok(Section { types, strings })
}

fn c_str(strings: &[u8], off: usize) -> &[u8] {
    let rest = strings.get(off..).unwrap_or(&[]);
    &rest[..rest.iter().position(|&c| c == 0).unwrap_or(rest.len())]
}

/// A string table under construction (offset 0 is the empty string).
struct Strings {
    bytes: Vec<u8>,
    index: BTreeMap<Vec<u8>, u32>,
    /// Offsets start here (a split section continues its base's table).
    start: u32,
}

impl Strings {
    fn new(start: u32) -> Self {
        let mut s = Self {
            bytes: Vec::new(),
            index: BTreeMap::new(),
            start,
        };
        if start == 0 {
            s.bytes.push(0);
            s.index.insert(Vec::new(), 0);
        }
        s
    }

    fn add(&mut self, name: &[u8]) -> u32 {
        if let Some(&o) = self.index.get(name) {
            return o;
        }
        let o = self.start + self.bytes.len() as u32;
        self.bytes.extend_from_slice(name);
        self.bytes.push(0);
        self.index.insert(name.to_vec(), o);
        o
    }
}

fn write(types: &[RawType], strings: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for ty in types {
        for w in [ty.name_off, ty.info, ty.size_type]
            .iter()
            .chain(ty.extra.iter())
        {
            t.extend_from_slice(&w.to_le_bytes());
        }
    }
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(1); // version
    out.push(0); // flags
    for w in [
        HDR_LEN as u32,
        0,
        t.len() as u32,
        t.len() as u32,
        strings.len() as u32,
    ] {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.extend_from_slice(&t);
    out.extend_from_slice(strings);
    out
}

/// `base` (vmlinux) and optionally `split` (a module) cut down to the types named in `roots`
/// (of any kind) and what they embed.
pub(super) fn minimize(
    base: &[u8],
    split: Option<&[u8]>,
    roots: &[&str],
) -> anyhow::Result<(Vec<u8>, Option<Vec<u8>>)> {
    let base = parse(base)?;
    let split = split.map(parse).transpose()?;
    let base_n = base.types.len() as u32;
    let base_strlen = base.strings.len();
    // All types by id (1-based), and each one's name bytes.
    let all: Vec<&RawType> = base
        .types
        .iter()
        .chain(split.iter().flat_map(|s| s.types.iter()))
        .collect();
    let name_of = |off: u32| -> &[u8] {
        let off = off as usize;
        match &split {
            Some(s) if off >= base_strlen => c_str(&s.strings, off - base_strlen),
            _ => c_str(&base.strings, off),
        }
    };
    let mut keep = BTreeSet::new();
    let mut todo: Vec<u32> = all
        .iter()
        .enumerate()
        .filter(|(_, t)| roots.iter().any(|r| name_of(t.name_off) == r.as_bytes()))
        .map(|(i, _)| i as u32 + 1)
        .collect();
    while let Some(id) = todo.pop() {
        if id == 0 || !keep.insert(id) {
            continue;
        }
        let ty = all.get(id as usize - 1).context("dangling BTF type id")?;
        if ty.kind() == kind::PTR {
            continue; // becomes void *
        }
        for r in ty.refs() {
            todo.push(match r {
                None => ty.size_type,
                Some(i) => ty.extra[i],
            });
        }
    }
    let new_id: BTreeMap<u32, u32> = keep
        .iter()
        .enumerate()
        .map(|(i, &old)| (old, i as u32 + 1))
        .collect();
    let new_base_n = keep.iter().filter(|&&id| id <= base_n).count() as u32;
    let mut base_strings = Strings::new(0);
    // Names of kept split types that point into base strings go into the new base table too.
    let mut out_types: Vec<(bool, RawType)> = Vec::new();
    for &old in &keep {
        let is_split = old > base_n;
        let mut ty = all[old as usize - 1].clone();
        if ty.kind() == kind::PTR {
            ty.size_type = 0;
        } else {
            for r in ty.refs() {
                let slot = match r {
                    None => &mut ty.size_type,
                    Some(i) => &mut ty.extra[i],
                };
                *slot = if *slot == 0 { 0 } else { new_id[slot] };
            }
        }
        out_types.push((is_split, ty));
    }
    // Base names first, so the split table can start after the final base table.
    let mut split_names: Vec<(usize, Option<usize>, Vec<u8>)> = Vec::new();
    for (i, (is_split, ty)) in out_types.iter_mut().enumerate() {
        let in_split = |off: u32| split.is_some() && off as usize >= base_strlen;
        let slots: Vec<Option<usize>> = std::iter::once(None)
            .chain(ty.names().into_iter().map(Some))
            .collect();
        for slot in slots {
            let off = match slot {
                None => ty.name_off,
                Some(j) => ty.extra[j],
            };
            let name = name_of(off).to_vec();
            if *is_split && in_split(off) {
                split_names.push((i, slot, name));
            } else {
                let new = base_strings.add(&name);
                match slot {
                    None => ty.name_off = new,
                    Some(j) => ty.extra[j] = new,
                }
            }
        }
    }
    let mut split_strings = Strings::new(base_strings.bytes.len() as u32);
    for (i, slot, name) in split_names {
        let new = split_strings.add(&name);
        let ty = &mut out_types[i].1;
        match slot {
            None => ty.name_off = new,
            Some(j) => ty.extra[j] = new,
        }
    }
    let base_types: Vec<RawType> = out_types[..new_base_n as usize]
        .iter()
        .map(|(_, t)| t.clone())
        .collect();
    let split_types: Vec<RawType> = out_types[new_base_n as usize..]
        .iter()
        .map(|(_, t)| t.clone())
        .collect();
    let base_out = write(&base_types, &base_strings.bytes);
    let split_out = split.map(|_| write(&split_types, &split_strings.bytes));
    Ok((base_out, split_out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(name_off: u32, kind: u8, vlen: u32, size_type: u32, extra: Vec<u32>) -> RawType {
        RawType {
            name_off,
            info: (u32::from(kind) << 24) | vlen,
            size_type,
            extra,
        }
    }

    #[test]
    fn keeps_roots_and_what_they_embed_and_cuts_pointers() {
        // strings: "" "int" "s" "a" "p" "other"
        let strings = b"\0int\0s\0a\0p\0other\0".to_vec();
        let (int, s, a, p, other) = (1, 5, 7, 9, 11);
        let types = vec![
            ty(int, kind::INT, 0, 4, vec![32]),                  // 1 int
            ty(other, kind::STRUCT, 1, 4, vec![a, 1, 0]),        // 2 struct other
            ty(0, kind::PTR, 0, 2, vec![]),                      // 3 struct other *
            ty(s, kind::STRUCT, 2, 16, vec![a, 1, 0, p, 3, 64]), // 4 struct s
        ];
        let btf = write(&types, &strings);
        let (min, _) = minimize(&btf, None, &["s"]).unwrap();
        let m = parse(&min).unwrap();
        // int, the pointer (now void *), struct s; struct other is gone.
        assert_eq!(m.types.len(), 3);
        assert_eq!(m.types[1].kind(), kind::PTR);
        assert_eq!(m.types[1].size_type, 0);
        let st = &m.types[2];
        assert_eq!(c_str(&m.strings, st.name_off as usize), b"s");
        assert_eq!(st.extra, vec![st.extra[0], 1, 0, st.extra[3], 2, 64]);
        assert_eq!(c_str(&m.strings, st.extra[3] as usize), b"p");
        assert!(!m.strings.windows(5).any(|w| w == b"other"));
    }

    #[test]
    fn split_sections_keep_their_base_references() {
        let base_strings = b"\0int\0".to_vec();
        let base = write(&[ty(1, kind::INT, 0, 4, vec![32])], &base_strings);
        // The module's struct m { int x; } uses the base int (id 1) and its own strings.
        let split_strings = b"m\0x\0".to_vec();
        let off = base_strings.len() as u32;
        let split = write(
            &[ty(off, kind::STRUCT, 1, 4, vec![off + 2, 1, 0])],
            &split_strings,
        );
        let (b, s) = minimize(&base, Some(&split), &["m"]).unwrap();
        let b = parse(&b).unwrap();
        let s = parse(&s.unwrap()).unwrap();
        assert_eq!(b.types.len(), 1);
        assert_eq!(s.types.len(), 1);
        let m = &s.types[0];
        assert_eq!(m.extra[1], 1, "member type is the base int");
        let at = m.name_off as usize - b.strings.len();
        assert_eq!(c_str(&s.strings, at), b"m");
    }
}
