//! Struct member offsets and enum names from BTF (by default the running kernel's
//! /sys/kernel/btf/vmlinux).
use std::path::Path;

use btf_rs::{Btf, Type};

pub const VMLINUX: &str = "/sys/kernel/btf/vmlinux";

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

    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, BtfError> {
        let path = path.as_ref();
        Btf::from_file(path)
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
                Type::Typedef(_) | Type::Const(_) | Type::Volatile(_) | Type::Restrict(_)
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
