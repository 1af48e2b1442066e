//! Guest RAM into a memory file and back (docs/snapshot-design.md §4).
//!
//! - [`save`] writes a paused VM's RAM after the header page, at each
//!   region's memfd offset. It copies only what the guest has touched: the
//!   memfd's data extents (`SEEK_DATA`/`SEEK_HOLE`), less the pages in them
//!   that are all zeros. The rest stays holes, so the file is as sparse as
//!   the guest's use of its memory (a ballooned-out page is a hole too).
//! - [`map_private`] maps a memory file's regions copy-on-write: many VMs
//!   restored from one file share its page cache, and each guest's writes
//!   land in its own anonymous pages. Nothing is read up front.
//! - [`copy_into`] reads a memory file into fresh memfd-backed RAM, for a
//!   VM whose memory must stay shareable by file descriptor (vhost-user
//!   backends map the memfd).
//!
//! The memory file is immutable once written: [`save`] refuses to replace
//! one, since a file mapped `MAP_PRIVATE` by a running VM must never change
//! under it (truncation is SIGBUS in the guest, a rewrite corrupts it).

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address as _, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::memory_file::{
    decode_header, encode_header, MemoryFileError, MemoryHeader, Region, HEADER_PAGE,
};
use super::SnapshotId;
use crate::vstate::memory::GuestRam;

/// The unit [`save`] checks for zeros: the guest's page size.
const PAGE: usize = 4096;
/// How much [`save`] and [`copy_into`] move per read/write call.
const CHUNK: usize = 1 << 20;

/// Why guest RAM could not be saved to, or restored from, a memory file.
/// Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum RamFileError {
    #[error("{path}: {what}")]
    Io {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Format(#[from] MemoryFileError),
    #[error("{path}: guest memory region {index} is not backed by the guest's memfd")]
    NotMemfdBacked { path: PathBuf, index: usize },
    #[error(
        "{path}: this VM's RAM is a copy-on-write mapping of the snapshot it was restored from \
         (memory_mode \"private\"), not a memfd; restore it with memory_mode \"copy\" to save \
         or copy into its RAM"
    )]
    PrivateMapping { path: PathBuf },
    #[error("{path}: region {index} ({size} bytes at {guest_addr:#x}) does not fit this host's address space")]
    TooLarge {
        path: PathBuf,
        index: usize,
        guest_addr: u64,
        size: u64,
    },
    #[error("{path}: cannot map region {index} ({size} bytes at {guest_addr:#x})")]
    Map {
        path: PathBuf,
        index: usize,
        guest_addr: u64,
        size: u64,
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("{path}: the regions do not form a guest memory map: {what}")]
    Layout { path: PathBuf, what: String },
    #[error("{path}: the file's regions do not match this VM's RAM (file: {file:?}, VM: {vm:?})")]
    OtherLayout {
        path: PathBuf,
        file: Vec<Region>,
        vm: Vec<Region>,
    },
}

/// The memfd behind `ram`, which a private mapping of a snapshot lacks.
fn memfd_of<'a>(ram: &'a GuestRam, path: &Path) -> Result<&'a File, RamFileError> {
    ram.memfd
        .as_ref()
        .ok_or_else(|| RamFileError::PrivateMapping {
            path: path.to_path_buf(),
        })
}

fn io_error<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> RamFileError + 'a {
    move |source| RamFileError::Io {
        path: path.to_path_buf(),
        what,
        source,
    }
}

/// The region table of `ram`: each region's guest address, size and
/// offset in the memfd.
pub fn regions_of(ram: &GuestRam, path: &Path) -> Result<Vec<Region>, RamFileError> {
    ram.mem
        .iter()
        .enumerate()
        .map(|(index, r)| {
            let offset = r
                .file_offset()
                .ok_or_else(|| RamFileError::NotMemfdBacked {
                    path: path.to_path_buf(),
                    index,
                })?;
            Ok(Region {
                guest_addr: r.start_addr().raw_value(),
                size: r.len(),
                file_offset: offset.start(),
            })
        })
        .collect()
}

/// What [`save`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub header: MemoryHeader,
    /// Bytes of guest RAM actually written (the rest are holes).
    pub data_bytes: u64,
}

/// Writes `ram` (a paused VM's, so nothing changes it meanwhile) to a new
/// memory file at `path` for snapshot `id`, and syncs it to disk. Refuses
/// an existing file. On any error the partial file is removed.
pub fn save(path: &Path, id: SnapshotId, ram: &GuestRam) -> Result<Saved, RamFileError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_error(path, "cannot create the memory file"))?;
    save_to(&file, path, id, ram).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

/// Writes `ram` for snapshot `id` into `file`, new and empty, opened for
/// writing by the caller (`path` names it in errors), and syncs it.
pub fn save_to(
    file: &File,
    path: &Path,
    id: SnapshotId,
    ram: &GuestRam,
) -> Result<Saved, RamFileError> {
    let memfd = memfd_of(ram, path)?;
    let regions = regions_of(ram, path)?;
    let header = MemoryHeader {
        id,
        guest_memory_bytes: regions.iter().map(|r| r.size).sum(),
        regions,
    };
    let page = encode_header(&header)?;
    let data_bytes = write_all(path, file, &page, &header, memfd)?;
    Ok(Saved { header, data_bytes })
}

fn write_all(
    path: &Path,
    file: &File,
    page: &[u8],
    header: &MemoryHeader,
    memfd: &File,
) -> Result<u64, RamFileError> {
    file.write_all_at(page, 0)
        .map_err(io_error(path, "cannot write the header page"))?;
    let mut data_bytes = 0;
    let mut buf = vec![0u8; CHUNK];
    for r in &header.regions {
        let read = ChunkSource {
            path,
            file: memfd,
            extents_error: "cannot find the guest memory's data extents",
            read_error: "cannot read guest memory",
        };
        read.for_each_chunk(r.file_offset, r.size, &mut buf, |chunk, at| {
            data_bytes += write_nonzero_pages(file, chunk, HEADER_PAGE + at)
                .map_err(io_error(path, "cannot write guest memory"))?;
            Ok(())
        })?;
    }
    // The full length, so the trailing holes are part of the file.
    file.set_len(header.file_len())
        .map_err(io_error(path, "cannot size the memory file"))?;
    file.sync_all()
        .map_err(io_error(path, "cannot sync the memory file"))?;
    Ok(data_bytes)
}

/// A file whose data (not its holes) is read a chunk at a time, with the
/// errors naming `path` and what was being read.
struct ChunkSource<'a> {
    path: &'a Path,
    file: &'a File,
    extents_error: &'static str,
    read_error: &'static str,
}

impl ChunkSource<'_> {
    /// Reads the data extents of `[start, start + len)` into `buf` a chunk
    /// at a time and hands each chunk to `sink` with its offset in the file.
    fn for_each_chunk(
        &self,
        start: u64,
        len: u64,
        buf: &mut [u8],
        mut sink: impl FnMut(&[u8], u64) -> Result<(), RamFileError>,
    ) -> Result<(), RamFileError> {
        let extents =
            data_extents(self.file, start, len).map_err(io_error(self.path, self.extents_error))?;
        for (start, len) in extents {
            let mut at = start;
            while at < start + len {
                let n = (start + len - at).min(buf.len() as u64) as usize;
                self.file
                    .read_exact_at(&mut buf[..n], at)
                    .map_err(io_error(self.path, self.read_error))?;
                sink(&buf[..n], at)?;
                at += n as u64;
            }
        }
        Ok(())
    }
}

/// Writes the pages of `buf` that are not all zeros to `file` at `at` +
/// their offset in `buf`; returns how many bytes it wrote.
fn write_nonzero_pages(file: &File, buf: &[u8], at: u64) -> io::Result<u64> {
    let mut written = 0;
    for (i, page) in buf.chunks(PAGE).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        file.write_all_at(page, at + (i * PAGE) as u64)?;
        written += page.len() as u64;
    }
    Ok(written)
}

/// The data extents of `file` within `[start, start + len)`, as (offset,
/// length) pairs: where it is not a hole. A file system without
/// `SEEK_DATA` reports the whole range as data, which only costs time.
fn data_extents(file: &File, start: u64, len: u64) -> io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{lseek, Whence};
    let offset =
        |at: u64| i64::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    let end = start + len;
    let mut extents = Vec::new();
    let mut at = start;
    while at < end {
        let data = match lseek(file, offset(at)?, Whence::SeekData) {
            Ok(d) => d as u64,
            // ENXIO: no data at or after `at`.
            Err(nix::errno::Errno::ENXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= end {
            break;
        }
        let hole = (lseek(file, offset(data)?, Whence::SeekHole)? as u64).min(end);
        extents.push((data, hole - data));
        at = hole;
    }
    Ok(extents)
}

/// Opens the memory file at `path` and checks its header page against
/// snapshot `id`.
fn open_checked(path: &Path, id: SnapshotId) -> Result<(File, MemoryHeader), RamFileError> {
    let mut file = File::open(path).map_err(io_error(path, "cannot open the memory file"))?;
    let len = file
        .metadata()
        .map_err(io_error(path, "cannot stat the memory file"))?
        .len();
    let mut page = Vec::with_capacity(HEADER_PAGE as usize);
    (&mut file)
        .take(HEADER_PAGE)
        .read_to_end(&mut page)
        .map_err(io_error(path, "cannot read the header page"))?;
    let header = decode_header(path, &page, len, id)?;
    Ok((file, header))
}

/// Maps the memory file at `path` (snapshot `id`) as guest RAM,
/// copy-on-write: reads come from the file's page cache, shared by every
/// VM that maps it; writes go to private anonymous pages. The file must
/// not change while any mapping lives (it never does: see the module).
pub fn map_private(path: &Path, id: SnapshotId) -> Result<GuestMemoryMmap, RamFileError> {
    let (file, header) = open_checked(path, id)?;
    let mut regions = Vec::with_capacity(header.regions.len());
    for (index, r) in header.regions.iter().enumerate() {
        let size = usize::try_from(r.size).map_err(|_| RamFileError::TooLarge {
            path: path.to_path_buf(),
            index,
            guest_addr: r.guest_addr,
            size: r.size,
        })?;
        let fd = file.try_clone().map_err(io_error(
            path,
            "cannot duplicate the memory file's descriptor",
        ))?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(fd, r.data_offset())),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_NORESERVE | libc::MAP_PRIVATE,
        )
        .map_err(|source| RamFileError::Map {
            path: path.to_path_buf(),
            index,
            guest_addr: r.guest_addr,
            size: r.size,
            source,
        })?;
        let region =
            GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr)).ok_or_else(|| {
                RamFileError::Layout {
                    path: path.to_path_buf(),
                    what: format!(
                        "region {index} at {:#x} wraps the address space",
                        r.guest_addr
                    ),
                }
            })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| RamFileError::Layout {
        path: path.to_path_buf(),
        what: e.to_string(),
    })
}

/// Reads the memory file at `path` (snapshot `id`) into `ram`, fresh
/// memfd-backed RAM of the same layout: only the file's data extents are
/// read, since `ram` is zeros (holes) to begin with.
pub fn copy_into(path: &Path, id: SnapshotId, ram: &GuestRam) -> Result<u64, RamFileError> {
    let memfd = memfd_of(ram, path)?;
    let (file, header) = open_checked(path, id)?;
    let vm = regions_of(ram, path)?;
    if vm != header.regions {
        return Err(RamFileError::OtherLayout {
            path: path.to_path_buf(),
            file: header.regions,
            vm,
        });
    }
    let mut copied = 0;
    let mut buf = vec![0u8; CHUNK];
    let read = ChunkSource {
        path,
        file: &file,
        extents_error: "cannot find the memory file's data extents",
        read_error: "cannot read the memory file",
    };
    for r in &header.regions {
        read.for_each_chunk(r.data_offset(), r.size, &mut buf, |chunk, at| {
            memfd
                .write_all_at(chunk, at - HEADER_PAGE)
                .map_err(io_error(path, "cannot write guest memory"))?;
            copied += chunk.len() as u64;
            Ok(())
        })?;
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use vm_memory::Bytes;

    use super::*;
    use crate::vstate::memory::create_guest_memory;

    const MIB: u64 = 1 << 20;

    fn id(byte: u8) -> SnapshotId {
        SnapshotId([byte; 16])
    }

    /// 16 MiB of RAM with two pages written and one touched with zeros.
    fn guest_ram() -> GuestRam {
        let ram = create_guest_memory(16 * MIB).expect("guest memory");
        ram.mem
            .write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x1000))
            .unwrap();
        ram.mem
            .write_obj(0xabcdu16, GuestAddress(0x80_0ffe))
            .unwrap();
        ram.mem
            .write_slice(&[0u8; PAGE], GuestAddress(0x40_0000))
            .unwrap();
        ram
    }

    fn saved(dir: &Path) -> (PathBuf, Saved) {
        let path = dir.join("mem");
        let saved = save(&path, id(7), &guest_ram()).expect("save");
        (path, saved)
    }

    #[test]
    fn save_writes_the_touched_pages_and_leaves_the_rest_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, saved) = saved(dir.path());
        // Two pages of data; the page written with zeros is skipped.
        assert_eq!(saved.data_bytes, 2 * PAGE as u64);
        assert_eq!(saved.header.guest_memory_bytes, 16 * MIB);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), HEADER_PAGE + 16 * MIB);
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "{} bytes allocated for 3 pages",
            meta.blocks() * 512
        );
        assert_eq!(meta.mode() & 0o777, 0o600);
        let file = File::open(&path).unwrap();
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, HEADER_PAGE + 0x1000).unwrap();
        assert_eq!(u64::from_le_bytes(word), 0x1122_3344_5566_7788);
    }

    #[test]
    fn save_refuses_to_replace_a_memory_file() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = saved(dir.path());
        let before = std::fs::read(&path).unwrap();
        let err = save(&path, id(8), &guest_ram()).unwrap_err();
        assert!(
            err.to_string().contains("cannot create the memory file"),
            "{err}"
        );
        // The file a VM may have mapped is untouched.
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_private_mapping_reads_the_snapshot_and_keeps_its_writes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = saved(dir.path());
        let before = std::fs::read(&path).unwrap();
        let mem = map_private(&path, id(7)).expect("map");
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344_5566_7788
        );
        assert_eq!(
            mem.read_obj::<u16>(GuestAddress(0x80_0ffe)).unwrap(),
            0xabcd
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x40_0000)).unwrap(), 0);
        mem.write_obj(0x99u8, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x42u8, GuestAddress(0x20_0000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x99);
        // Neither the file nor a second VM's mapping sees those writes.
        assert_eq!(std::fs::read(&path).unwrap(), before);
        let other = map_private(&path, id(7)).expect("second map");
        assert_eq!(other.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x88);
        assert_eq!(other.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 0);
    }

    #[test]
    fn copy_into_fills_fresh_ram_with_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = saved(dir.path());
        let ram = create_guest_memory(16 * MIB).unwrap();
        let copied = copy_into(&path, id(7), &ram).expect("copy");
        assert!(copied >= 2 * PAGE as u64, "{copied}");
        assert_eq!(
            ram.mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344_5566_7788
        );
        assert_eq!(
            ram.mem.read_obj::<u16>(GuestAddress(0x80_0ffe)).unwrap(),
            0xabcd
        );
    }

    #[test]
    fn another_snapshots_file_or_another_layout_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = saved(dir.path());
        let err = map_private(&path, id(9)).unwrap_err();
        assert!(
            matches!(
                err,
                RamFileError::Format(MemoryFileError::OtherSnapshot { .. })
            ),
            "{err}"
        );
        let small = create_guest_memory(8 * MIB).unwrap();
        let err = copy_into(&path, id(7), &small).unwrap_err();
        assert!(matches!(err, RamFileError::OtherLayout { .. }), "{err}");
        assert!(
            err.to_string().contains("do not match this VM's RAM"),
            "{err}"
        );
    }

    #[test]
    fn a_truncated_memory_file_is_refused_before_it_is_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = saved(dir.path());
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(HEADER_PAGE + 8 * MIB).unwrap();
        let err = map_private(&path, id(7)).unwrap_err();
        assert!(
            matches!(err, RamFileError::Format(MemoryFileError::Truncated { .. })),
            "{err}"
        );
    }

    #[test]
    fn data_extents_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(8 * MIB).unwrap();
        file.write_all_at(&[1u8; PAGE], 2 * MIB).unwrap();
        let extents = data_extents(&file, 0, 8 * MIB).unwrap();
        // File systems allocate in their own block size; the data extent
        // covers the written page and no more than a block-aligned MiB.
        assert_eq!(extents.len(), 1, "{extents:?}");
        let (start, len) = extents[0];
        assert!(
            start <= 2 * MIB && start + len >= 2 * MIB + PAGE as u64,
            "{extents:?}"
        );
        assert!(len <= MIB, "{extents:?}");
        assert!(data_extents(&file, 4 * MIB, 4 * MIB).unwrap().is_empty());
    }
}
