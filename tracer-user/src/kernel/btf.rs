//! Struct member offsets and enum names from BTF (by default the running kernel's
//! /sys/kernel/btf/vmlinux).
use std::path::Path;

use btf_rs::{Btf, Type};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";
/// Where a loaded module's split BTF (on top of vmlinux's) appears.
pub const MODULES_DIR: &str = "/sys/kernel/btf";

#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("cannot read BTF from {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("BTF has no struct {0}")]
    NoStruct(String),
    #[error("BTF has no enum {0}")]
    NoEnum(String),
    #[error("struct {ty} has no member {member} (BTF of this kernel)")]
    NoMember { ty: String, member: String },
    #[error("{ty}.{member} is a bit field; cannot take its byte offset")]
    BitField { ty: String, member: String },
    #[error("BTF: {0}")]
    Btf(#[from] btf_rs::Error),
}

struct MemberAt {
    bits: u32,
    bitfield: bool,
    ty: Type,
}

pub struct KernelBtf {
    btf: Btf,
}

impl KernelBtf {
    pub fn vmlinux() -> Result<Self, BtfError> {
        Self::from_file(VMLINUX)
    }

    /// Mmapped, parsed on demand: the cached backend spends ~400 ms indexing all of vmlinux at
    /// start-up for the few dozen lookups droptrace makes.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        Btf::from_file_with_backend(path, btf_rs::Backend::Mmap)
            .or_else(|_| Btf::from_file(path))
            .map(|btf| Self { btf })
            .map_err(|source| BtfError::Open {
                path: path.display().to_string(),
                source,
            })
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, BtfError> {
        Ok(Self {
            btf: Btf::from_bytes(bytes)?,
        })
    }

    /// A loaded module's types (/sys/kernel/btf/MODULE, split BTF on top of this one): lookups
    /// in the result see both the module's and this BTF's types. Distribution kernels build
    /// e.g. nf_conntrack as a module, whose functions (and, where vmlinux does not use them,
    /// types) are only there.
    pub fn module(&self, name: &str) -> Result<Self, BtfError> {
        self.split_file(Path::new(MODULES_DIR).join(name))
    }

    pub fn split_file(&self, path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        Btf::from_split_file(path, &self.btf)
            .map(|btf| Self { btf })
            .map_err(|source| BtfError::Open {
                path: path.display().to_string(),
                source,
            })
    }

    pub fn split_bytes(&self, bytes: &[u8]) -> Result<Self, BtfError> {
        Ok(Self {
            btf: Btf::from_split_bytes(bytes, &self.btf)?,
        })
    }

    fn named_struct(&self, name: &str) -> Result<btf_rs::Struct, BtfError> {
        for ty in self.btf.resolve_types_by_name(name).unwrap_or_default() {
            if let Type::Struct(s) = ty {
                // Skip forward-declared empties: the real definition has members.
                if !s.members.is_empty() {
                    return Ok(s);
                }
            }
        }
        Err(BtfError::NoStruct(name.to_string()))
    }

    /// Follows typedefs and qualifiers to the struct or union underneath.
    fn strip(&self, mut ty: Type) -> Result<Type, BtfError> {
        for _ in 0..16 {
            match &ty {
                Type::Typedef(_)
                | Type::Const(_)
                | Type::Volatile(_)
                | Type::Restrict(_)
                | Type::TypeTag(_) => {
                    let inner = ty.as_btf_type().expect("qualifier is a BtfType");
                    ty = self.btf.resolve_chained_type(inner)?;
                }
                _ => break,
            }
        }
        Ok(ty)
    }

    /// Byte offset of `path` ("a.b.c") from the start of `struct ty`. Anonymous unions and
    /// struct groups are searched through, as the C compiler does.
    pub fn member_offset(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        let mut current = self.named_struct(ty)?;
        let mut offset = 0u32;
        let mut parts = path.split('.').peekable();
        while let Some(part) = parts.next() {
            let found = self
                .find_member(&current, part)?
                .ok_or_else(|| BtfError::NoMember {
                    ty: ty.to_string(),
                    member: path.to_string(),
                })?;
            if found.bitfield || found.bits % 8 != 0 {
                return Err(BtfError::BitField {
                    ty: ty.to_string(),
                    member: path.to_string(),
                });
            }
            offset += found.bits / 8;
            if parts.peek().is_some() {
                current = match self.strip(found.ty)? {
                    Type::Struct(s) | Type::Union(s) => s,
                    _ => {
                        return Err(BtfError::NoMember {
                            ty: ty.to_string(),
                            member: path.to_string(),
                        });
                    }
                };
            }
        }
        Ok(offset)
    }

    /// Member `name`, searching anonymous members depth-first.
    fn find_member(&self, s: &btf_rs::Struct, name: &str) -> Result<Option<MemberAt>, BtfError> {
        for m in &s.members {
            let m_name = self.btf.resolve_name(m).unwrap_or_default();
            let m_ty = self.btf.resolve_chained_type(m)?;
            if m_name == name {
                return Ok(Some(MemberAt {
                    bits: m.bit_offset(),
                    bitfield: m.bitfield_size().is_some_and(|size| size != 0),
                    ty: m_ty,
                }));
            }
            if m_name.is_empty()
                && let Type::Struct(inner) | Type::Union(inner) = self.strip(m_ty)?
                && let Some(found) = self.find_member(&inner, name)?
            {
                return Ok(Some(MemberAt {
                    bits: m.bit_offset() + found.bits,
                    ..found
                }));
            }
        }
        Ok(None)
    }

    /// sizeof(struct name).
    pub fn struct_size(&self, name: &str) -> Result<u32, BtfError> {
        Ok(self.named_struct(name)?.size() as u32)
    }

    /// (name, value) of every member of `enum name`.
    pub fn enum_values(&self, name: &str) -> Result<Vec<(String, u64)>, BtfError> {
        for ty in self.btf.resolve_types_by_name(name).unwrap_or_default() {
            match ty {
                Type::Enum(e) => {
                    return e
                        .members
                        .iter()
                        .map(|m| Ok((self.btf.resolve_name(m)?, u64::from(m.val()))))
                        .collect();
                }
                Type::Enum64(e) => {
                    return e
                        .members
                        .iter()
                        .map(|m| Ok((self.btf.resolve_name(m)?, m.val())))
                        .collect();
                }
                _ => {}
            }
        }
        Err(BtfError::NoEnum(name.to_string()))
    }

    /// Whether BTF tracepoint `tp`'s arguments (after the hook's own `void *`) begin with
    /// pointers and then an enum named `third_enum`: the shape a program reading its
    /// arguments by position was written for (`btf_trace_TP`, the type the kernel checks a
    /// tp_btf program against).
    pub fn tp_btf_args_are(&self, tp: &str, pointers: usize, third_enum: &str) -> bool {
        self.tp_btf_args(tp, pointers, third_enum).unwrap_or(false)
    }

    fn tp_btf_args(&self, tp: &str, pointers: usize, enum_name: &str) -> Result<bool, BtfError> {
        let name = format!("btf_trace_{tp}");
        let types = self.btf.resolve_types_by_name(&name).unwrap_or_default();
        let Some(Type::Typedef(td)) = types.into_iter().find(|t| matches!(t, Type::Typedef(_)))
        else {
            return Ok(false);
        };
        let Type::Ptr(ptr) = self.btf.resolve_chained_type(&td)? else {
            return Ok(false);
        };
        let Type::FuncProto(proto) = self.btf.resolve_chained_type(&ptr)? else {
            return Ok(false);
        };
        let params = &proto.parameters;
        if params.len() < pointers + 2 {
            return Ok(false);
        }
        for p in &params[1..=pointers] {
            if !matches!(self.btf.resolve_chained_type(p)?, Type::Ptr(_)) {
                return Ok(false);
            }
        }
        let ty = self.strip(self.btf.resolve_chained_type(&params[pointers + 1])?)?;
        Ok(match &ty {
            Type::Enum(e) => self.btf.resolve_name(e)? == enum_name,
            Type::Enum64(e) => self.btf.resolve_name(e)? == enum_name,
            _ => false,
        })
    }

    pub fn has_struct(&self, name: &str) -> bool {
        self.named_struct(name).is_ok()
    }

    pub fn has_func(&self, name: &str) -> bool {
        self.btf
            .resolve_types_by_name(name)
            .unwrap_or_default()
            .iter()
            .any(|t| matches!(t, Type::Func(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A recorded BTF of another layout (see tests/fixtures/btf/older_layout.c).
    fn older() -> KernelBtf {
        KernelBtf::from_bytes(include_bytes!("../../tests/fixtures/btf/older_layout.btf"))
            .expect("fixture parses")
    }

    #[test]
    fn offsets_of_a_recorded_older_layout() {
        let b = older();
        // dev sits in an anonymous struct inside an anonymous union.
        assert_eq!(b.member_offset("sk_buff", "dev").unwrap(), 16);
        assert_eq!(b.member_offset("sk_buff", "sk").unwrap(), 24);
        assert_eq!(b.member_offset("sk_buff", "len").unwrap(), 88);
        assert_eq!(b.member_offset("sk_buff", "network_header").unwrap(), 106);
        assert_eq!(b.member_offset("sk_buff", "head").unwrap(), 128);
        assert_eq!(b.member_offset("net_device", "ifindex").unwrap(), 184);
        // Through a typedef'd struct: possible_net_t.
        assert_eq!(b.member_offset("net_device", "nd_net.net").unwrap(), 192);
        assert_eq!(
            b.member_offset("sock", "__sk_common.skc_net.net").unwrap(),
            16
        );
        assert_eq!(b.member_offset("net", "ns.inum").unwrap(), 24);
    }

    #[test]
    fn bit_fields_and_missing_members_are_errors() {
        let b = older();
        assert!(matches!(
            b.member_offset("sk_buff", "flags2"),
            Err(BtfError::BitField { .. })
        ));
        let e = b.member_offset("sk_buff", "_nfct").unwrap_err();
        assert_eq!(
            e.to_string(),
            "struct sk_buff has no member _nfct (BTF of this kernel)"
        );
        assert!(matches!(
            b.member_offset("nope", "x"),
            Err(BtfError::NoStruct(_))
        ));
    }

    #[test]
    fn drop_reason_enum_of_a_recorded_older_layout() {
        let values = older().enum_values("skb_drop_reason").unwrap();
        assert!(values.contains(&("SKB_DROP_REASON_NETFILTER_DROP".to_string(), 7)));
        assert!(values.contains(&("SKB_DROP_REASON_TC_INGRESS".to_string(), 48)));
    }

    #[test]
    fn recorded_kernel_layout_and_reasons() {
        // Debian 7.3's BTF, cut to what droptrace reads (tests/fixtures/kernels).
        let b = KernelBtf::from_file(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/kernels/7.3.4+deb13-amd64/vmlinux.btf"),
        )
        .unwrap();
        // The same member paths resolve on a newer kernel (values differ by kernel).
        for (ty, path) in [
            ("sk_buff", "head"),
            ("sk_buff", "network_header"),
            ("sk_buff", "dev"),
            ("sk_buff", "sk"),
            ("sk_buff", "_nfct"),
            ("net_device", "ifindex"),
            ("net_device", "nd_net.net"),
            ("sock", "__sk_common.skc_net.net"),
            ("net", "ns.inum"),
        ] {
            b.member_offset(ty, path)
                .unwrap_or_else(|e| panic!("{ty}.{path}: {e}"));
        }
        let reasons = b.enum_values("skb_drop_reason").unwrap();
        let find = |n: &str| reasons.iter().find(|(name, _)| name == n).map(|(_, v)| *v);
        // What that kernel's tracepoint says in its own __print_symbolic.
        let format = crate::kernel::tracefs::Format::parse(
            include_str!("../../tests/fixtures/kernels/7.3.4+deb13-amd64/kfree_skb.format"),
            "7.3",
        );
        let from_format: std::collections::HashMap<_, _> =
            format.reason_symbols.iter().cloned().collect();
        let nf = find("SKB_DROP_REASON_NETFILTER_DROP").unwrap();
        assert_eq!(
            from_format.get(&nf).map(String::as_str),
            Some("NETFILTER_DROP")
        );
    }
}
