//! Just enough ELF to tell a static executable from a dynamic one: a binary
//! that asks for a program interpreter (a `PT_INTERP` program header) needs a
//! dynamic loader and libraries that the initramfs does not have.

use std::path::{Path, PathBuf};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELF64_EHDR_LEN: usize = 64;
const ELF64_PHDR_LEN: usize = 56;
const PT_INTERP: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not an ELF file")]
    NotElf { path: PathBuf },
    #[error("{path} is not a 64-bit little-endian ELF file (class {class}, data {data})")]
    Unsupported { path: PathBuf, class: u8, data: u8 },
    #[error("{path} is truncated or malformed: {what}")]
    Malformed { path: PathBuf, what: &'static str },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Linkage {
    Static,
    /// Needs the program interpreter named here (e.g. `/lib64/ld-linux-x86-64.so.2`).
    Dynamic {
        interpreter: String,
    },
}

/// Reads the ELF file at `path` and reports how it is linked.
pub fn linkage(path: &Path) -> Result<Linkage, ElfError> {
    let bytes = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.to_owned(),
        source,
    })?;
    linkage_of(&bytes, path)
}

/// Like [`linkage`], for ELF bytes already in memory; `path` names them in errors.
pub fn linkage_of(bytes: &[u8], path: &Path) -> Result<Linkage, ElfError> {
    let malformed = |what| ElfError::Malformed {
        path: path.to_owned(),
        what,
    };
    if bytes.get(..4) != Some(ELF_MAGIC.as_slice()) {
        return Err(ElfError::NotElf {
            path: path.to_owned(),
        });
    }
    let (class, data) = (bytes.get(4).copied(), bytes.get(5).copied());
    if class != Some(ELFCLASS64) || data != Some(ELFDATA2LSB) {
        return Err(ElfError::Unsupported {
            path: path.to_owned(),
            class: class.unwrap_or(0),
            data: data.unwrap_or(0),
        });
    }
    if bytes.len() < ELF64_EHDR_LEN {
        return Err(malformed("ELF header"));
    }
    let e_phoff = read_u64(bytes, 0x20).ok_or_else(|| malformed("e_phoff"))?;
    let e_phentsize = read_u16(bytes, 0x36).ok_or_else(|| malformed("e_phentsize"))?;
    let e_phnum = read_u16(bytes, 0x38).ok_or_else(|| malformed("e_phnum"))?;
    if e_phnum > 0 && usize::from(e_phentsize) < ELF64_PHDR_LEN {
        return Err(malformed("program header entry size"));
    }
    let phoff = usize::try_from(e_phoff).map_err(|_| malformed("e_phoff"))?;
    for i in 0..usize::from(e_phnum) {
        let ph = usize::from(e_phentsize)
            .checked_mul(i)
            .and_then(|off| off.checked_add(phoff))
            .ok_or_else(|| malformed("program header offset"))?;
        let p_type = read_u32(bytes, ph).ok_or_else(|| malformed("program header table"))?;
        if p_type != PT_INTERP {
            continue;
        }
        let offset = read_u64(bytes, ph + 8).ok_or_else(|| malformed("PT_INTERP offset"))?;
        let size = read_u64(bytes, ph + 32).ok_or_else(|| malformed("PT_INTERP size"))?;
        let interp = usize::try_from(offset)
            .ok()
            .zip(usize::try_from(size).ok())
            .and_then(|(o, s)| bytes.get(o..o.checked_add(s)?))
            .ok_or_else(|| malformed("PT_INTERP contents"))?;
        let interpreter = String::from_utf8_lossy(interp)
            .trim_end_matches('\0')
            .to_owned();
        return Ok(Linkage::Dynamic { interpreter });
    }
    Ok(Linkage::Static)
}

fn read_u16(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn read_u32(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 image with the given program header types; a
    /// PT_INTERP points at `interp`.
    fn image(types: &[u32], interp: &[u8]) -> Vec<u8> {
        let phoff = ELF64_EHDR_LEN;
        let interp_off = phoff + ELF64_PHDR_LEN * types.len();
        let mut b = vec![0u8; interp_off];
        b[..4].copy_from_slice(ELF_MAGIC);
        b[4] = ELFCLASS64;
        b[5] = ELFDATA2LSB;
        b[0x20..0x28].copy_from_slice(&(phoff as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&(ELF64_PHDR_LEN as u16).to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            let ph = phoff + i * ELF64_PHDR_LEN;
            b[ph..ph + 4].copy_from_slice(&t.to_le_bytes());
            if *t == PT_INTERP {
                b[ph + 8..ph + 16].copy_from_slice(&(interp_off as u64).to_le_bytes());
                b[ph + 32..ph + 40].copy_from_slice(&(interp.len() as u64).to_le_bytes());
            }
        }
        b.extend_from_slice(interp);
        b
    }

    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;

    #[test]
    fn interp_header_means_dynamic() {
        let elf = image(&[6, PT_INTERP, PT_LOAD, PT_DYNAMIC], b"/lib64/ld.so\0");
        assert_eq!(
            linkage_of(&elf, Path::new("x")).expect("parse"),
            Linkage::Dynamic {
                interpreter: "/lib64/ld.so".into()
            }
        );
    }

    #[test]
    fn no_interp_means_static_even_with_dynamic_section() {
        // A static-pie has PT_DYNAMIC (for self-relocation) but no PT_INTERP.
        let elf = image(&[PT_LOAD, PT_DYNAMIC], b"");
        assert_eq!(
            linkage_of(&elf, Path::new("x")).expect("parse"),
            Linkage::Static
        );
    }

    #[test]
    fn this_test_binary_is_dynamic() {
        let exe = std::env::current_exe().expect("current_exe");
        assert!(matches!(
            linkage(&exe).expect("parse"),
            Linkage::Dynamic { .. }
        ));
    }

    #[test]
    fn garbage_is_rejected_by_name() {
        let p = Path::new("/x/agent");
        let err = linkage_of(b"#!/bin/sh\n", p).unwrap_err();
        assert!(matches!(err, ElfError::NotElf { .. }));
        assert!(err.to_string().contains("/x/agent"), "{err}");

        let mut elf = image(&[PT_INTERP], b"/lib64/ld.so\0");
        elf.truncate(ELF64_EHDR_LEN + 10);
        assert!(matches!(
            linkage_of(&elf, p).unwrap_err(),
            ElfError::Malformed { .. }
        ));

        let mut elf32 = image(&[], b"");
        elf32[4] = 1;
        assert!(matches!(
            linkage_of(&elf32, p).unwrap_err(),
            ElfError::Unsupported { .. }
        ));
    }
}
