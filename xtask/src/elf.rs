//! Just enough ELF to tell a static executable from a dynamic one: a binary
//! that asks for a program interpreter (a `PT_INTERP` program header) needs a
//! dynamic loader, and one whose dynamic section lists `DT_NEEDED` libraries
//! needs those libraries — the initramfs has neither. (A static-pie has a
//! dynamic section for self-relocation, but no interpreter and no
//! `DT_NEEDED`; a binary with `DT_NEEDED` but no interpreter starts nowhere.)
//! Also a section by name ([`section`]), for the kernel modules' `.modinfo`.

use std::path::{Path, PathBuf};

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ELF64_EHDR_LEN: usize = 64;
const ELF64_PHDR_LEN: usize = 56;
const ELF64_SHDR_LEN: usize = 64;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const ELF64_DYN_LEN: usize = 16;

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
    /// No interpreter, but shared libraries listed as `DT_NEEDED` (names as
    /// found in the dynamic string table, or `#<index>` when unresolvable).
    NeedsLibraries {
        libraries: Vec<String>,
    },
}

/// One program header, the fields this module uses.
struct ProgramHeader {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

/// Reads the ELF file at `path` and reports how it is linked.
pub fn linkage(path: &Path) -> Result<Linkage, ElfError> {
    let bytes = std::fs::read(path).map_err(|source| ElfError::Read {
        path: path.to_owned(),
        source,
    })?;
    linkage_of(&bytes, path)
}

/// Checks that `bytes` start with a 64-bit little-endian ELF header.
fn check_header(bytes: &[u8], path: &Path) -> Result<(), ElfError> {
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
        return Err(ElfError::Malformed {
            path: path.to_owned(),
            what: "ELF header",
        });
    }
    Ok(())
}

/// The contents of the section called `name` (e.g. a kernel module's
/// `.modinfo`), or None if the file has no such section.
pub fn section<'a>(bytes: &'a [u8], name: &str, path: &Path) -> Result<Option<&'a [u8]>, ElfError> {
    check_header(bytes, path)?;
    let malformed = |what| ElfError::Malformed {
        path: path.to_owned(),
        what,
    };
    let shoff = read_u64(bytes, 0x28).ok_or_else(|| malformed("e_shoff"))?;
    let shentsize = usize::from(read_u16(bytes, 0x3a).ok_or_else(|| malformed("e_shentsize"))?);
    let shnum = usize::from(read_u16(bytes, 0x3c).ok_or_else(|| malformed("e_shnum"))?);
    let shstrndx = usize::from(read_u16(bytes, 0x3e).ok_or_else(|| malformed("e_shstrndx"))?);
    if shnum == 0 {
        return Ok(None);
    }
    if shentsize < ELF64_SHDR_LEN || shstrndx >= shnum {
        return Err(malformed("section header table"));
    }
    let shoff = usize::try_from(shoff).map_err(|_| malformed("e_shoff"))?;
    // (offset, size) of section `i`, and the offset of its name in the
    // section-name string table.
    let header = |i: usize| -> Option<(u32, u64, u64)> {
        let at = shoff.checked_add(shentsize.checked_mul(i)?)?;
        Some((
            read_u32(bytes, at)?,
            read_u64(bytes, at.checked_add(24)?)?,
            read_u64(bytes, at.checked_add(32)?)?,
        ))
    };
    let (_, names_off, names_len) =
        header(shstrndx).ok_or_else(|| malformed("section header table"))?;
    let names =
        file_range(bytes, names_off, names_len).ok_or_else(|| malformed("section names"))?;
    for i in 0..shnum {
        let (name_off, off, len) = header(i).ok_or_else(|| malformed("section header table"))?;
        let this = usize::try_from(name_off)
            .ok()
            .and_then(|start| names.get(start..))
            .and_then(|rest| rest.split(|&b| b == 0).next());
        if this == Some(name.as_bytes()) {
            return file_range(bytes, off, len)
                .map(Some)
                .ok_or_else(|| malformed("section contents"));
        }
    }
    Ok(None)
}

/// Like [`linkage`], for ELF bytes already in memory; `path` names them in errors.
pub fn linkage_of(bytes: &[u8], path: &Path) -> Result<Linkage, ElfError> {
    let malformed = |what| ElfError::Malformed {
        path: path.to_owned(),
        what,
    };
    check_header(bytes, path)?;
    let e_phoff = read_u64(bytes, 0x20).ok_or_else(|| malformed("e_phoff"))?;
    let e_phentsize = read_u16(bytes, 0x36).ok_or_else(|| malformed("e_phentsize"))?;
    let e_phnum = read_u16(bytes, 0x38).ok_or_else(|| malformed("e_phnum"))?;
    if e_phnum > 0 && usize::from(e_phentsize) < ELF64_PHDR_LEN {
        return Err(malformed("program header entry size"));
    }
    let phoff = usize::try_from(e_phoff).map_err(|_| malformed("e_phoff"))?;
    let mut headers = Vec::with_capacity(usize::from(e_phnum));
    for i in 0..usize::from(e_phnum) {
        let ph = usize::from(e_phentsize)
            .checked_mul(i)
            .and_then(|off| off.checked_add(phoff))
            .ok_or_else(|| malformed("program header offset"))?;
        headers.push(ProgramHeader {
            p_type: read_u32(bytes, ph).ok_or_else(|| malformed("program header table"))?,
            offset: read_u64(bytes, ph + 8).ok_or_else(|| malformed("program header offset"))?,
            vaddr: read_u64(bytes, ph + 16).ok_or_else(|| malformed("program header vaddr"))?,
            filesz: read_u64(bytes, ph + 32).ok_or_else(|| malformed("program header size"))?,
        });
    }
    if let Some(interp) = headers.iter().find(|h| h.p_type == PT_INTERP) {
        let contents = file_range(bytes, interp.offset, interp.filesz)
            .ok_or_else(|| malformed("PT_INTERP contents"))?;
        let interpreter = String::from_utf8_lossy(contents)
            .trim_end_matches('\0')
            .to_owned();
        return Ok(Linkage::Dynamic { interpreter });
    }
    let Some(dynamic) = headers.iter().find(|h| h.p_type == PT_DYNAMIC) else {
        return Ok(Linkage::Static);
    };
    let table = file_range(bytes, dynamic.offset, dynamic.filesz)
        .ok_or_else(|| malformed("PT_DYNAMIC contents"))?;
    let mut needed = Vec::new();
    let mut strtab_vaddr = None;
    for entry in table.chunks_exact(ELF64_DYN_LEN) {
        let tag = read_u64(entry, 0).ok_or_else(|| malformed("dynamic entry"))?;
        let value = read_u64(entry, 8).ok_or_else(|| malformed("dynamic entry"))?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(value),
            DT_STRTAB => strtab_vaddr = Some(value),
            _ => {}
        }
    }
    if needed.is_empty() {
        return Ok(Linkage::Static);
    }
    // The string table is given as a virtual address: find its file offset
    // through the loadable segment that contains it.
    let strtab_offset = strtab_vaddr.and_then(|addr| {
        headers
            .iter()
            .filter(|h| h.p_type == PT_LOAD)
            .find(|h| addr >= h.vaddr && addr - h.vaddr < h.filesz)
            .and_then(|h| h.offset.checked_add(addr - h.vaddr))
    });
    let libraries = needed
        .iter()
        .enumerate()
        .map(|(i, name_offset)| {
            strtab_offset
                .and_then(|base| base.checked_add(*name_offset))
                .and_then(|start| usize::try_from(start).ok())
                .and_then(|start| {
                    let rest = bytes.get(start..)?;
                    let end = rest.iter().position(|&b| b == 0)?;
                    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
                })
                .unwrap_or_else(|| format!("#{i}"))
        })
        .collect();
    Ok(Linkage::NeedsLibraries { libraries })
}

/// `bytes[offset .. offset + len]`, if it lies inside the file.
fn file_range(bytes: &[u8], offset: u64, len: u64) -> Option<&[u8]> {
    let start = usize::try_from(offset).ok()?;
    let len = usize::try_from(len).ok()?;
    bytes.get(start..start.checked_add(len)?)
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

    /// An ELF64 image without interpreter whose dynamic section names
    /// `libs` as DT_NEEDED, the string table reached through a PT_LOAD at a
    /// virtual address unlike its file offset (as in real binaries).
    fn image_needing(libs: &[&str]) -> Vec<u8> {
        const LOAD_VADDR: u64 = 0x40_0000;
        let mut b = image(&[PT_LOAD, PT_DYNAMIC], b"");
        let mut strtab = vec![0u8];
        let mut name_offsets = Vec::new();
        for lib in libs {
            name_offsets.push(strtab.len() as u64);
            strtab.extend_from_slice(lib.as_bytes());
            strtab.push(0);
        }
        let strtab_off = b.len() as u64;
        b.extend_from_slice(&strtab);
        let dyn_off = b.len() as u64;
        let mut entries = vec![(DT_STRTAB, LOAD_VADDR + strtab_off)];
        entries.extend(name_offsets.iter().map(|o| (DT_NEEDED, *o)));
        entries.push((DT_NULL, 0));
        for (tag, val) in &entries {
            b.extend_from_slice(&tag.to_le_bytes());
            b.extend_from_slice(&val.to_le_bytes());
        }
        let total = b.len() as u64;
        let load = ELF64_EHDR_LEN;
        b[load + 16..load + 24].copy_from_slice(&LOAD_VADDR.to_le_bytes());
        b[load + 32..load + 40].copy_from_slice(&total.to_le_bytes());
        let dynamic = ELF64_EHDR_LEN + ELF64_PHDR_LEN;
        b[dynamic + 8..dynamic + 16].copy_from_slice(&dyn_off.to_le_bytes());
        let dyn_len = (entries.len() * ELF64_DYN_LEN) as u64;
        b[dynamic + 32..dynamic + 40].copy_from_slice(&dyn_len.to_le_bytes());
        b
    }

    #[test]
    fn needed_libraries_without_interpreter_are_not_static() {
        // What a +crt-static build that still links libseccomp.so looks like.
        let elf = image_needing(&["libseccomp.so.2", "libc.so.6"]);
        assert_eq!(
            linkage_of(&elf, Path::new("x")).expect("parse"),
            Linkage::NeedsLibraries {
                libraries: vec!["libseccomp.so.2".into(), "libc.so.6".into()]
            }
        );
        assert_eq!(
            linkage_of(&image_needing(&[]), Path::new("x")).expect("parse"),
            Linkage::Static
        );
    }

    #[test]
    fn busybox_static_is_static() {
        let busybox = Path::new("/bin/busybox");
        if busybox.is_file() {
            assert_eq!(linkage(busybox).expect("parse"), Linkage::Static);
        }
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
