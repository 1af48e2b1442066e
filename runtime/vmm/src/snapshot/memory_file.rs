//! The memory file's header page (docs/snapshot-design.md §4):
//!
//! ```text
//! off  size  field
//! 0    8     magic "BXLSNPM\0"
//! 8    4     format version, u32 LE
//! 12   4     reserved, 0
//! 16   16    snapshot id (the state file's)
//! 32   8     guest memory bytes, u64 LE
//! 40   4     region count, u32 LE (1..=MAX_REGIONS)
//! 44   4     reserved, 0
//! 48   24*n  regions: guest address, size, memfd offset (u64 LE each)
//! ...        zero
//! 4092 4     CRC32 of bytes 0..4092
//! 4096       guest RAM: region i at 4096 + its memfd offset
//! ```
//!
//! Keeping the memfd's own offsets means a region is mapped from the file
//! exactly as it was from the memfd, and untouched guest pages stay holes
//! in a sparse file.

use std::path::{Path, PathBuf};

use super::{le_u32, le_u64, leading_hex, SnapshotId, FORMAT_VERSION};

pub const MAGIC: [u8; 8] = *b"BXLSNPM\0";
/// The header page; guest RAM starts after it, page aligned.
pub const HEADER_PAGE: u64 = 4096;
/// Guest RAM is at most two regions today (below the MMIO gap and from
/// 4 GiB); a few more leave room without changing the format.
pub const MAX_REGIONS: usize = 8;
const REGIONS_AT: usize = 48;
const REGION_LEN: usize = 24;
const CRC_AT: usize = HEADER_PAGE as usize - 4;

/// One guest RAM region and where its bytes are, relative to the end of
/// the header page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    pub guest_addr: u64,
    pub size: u64,
    pub file_offset: u64,
}

impl Region {
    /// Where the region's first byte is in the memory file.
    pub fn data_offset(&self) -> u64 {
        HEADER_PAGE + self.file_offset
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryHeader {
    pub id: SnapshotId,
    pub guest_memory_bytes: u64,
    pub regions: Vec<Region>,
}

impl MemoryHeader {
    /// The memory file's full length: the header page, then every region
    /// at its offset (the file may be sparse, never shorter).
    pub fn file_len(&self) -> u64 {
        self.regions
            .iter()
            .map(|r| r.data_offset() + r.size)
            .max()
            .unwrap_or(HEADER_PAGE)
    }
}

/// Why a memory file was refused. Each names the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemoryFileError {
    #[error("{path}: not a boxlite-vmm snapshot memory file (it starts with {start})")]
    NotAMemoryFile { path: PathBuf, start: String },
    #[error(
        "{path}: snapshot format version {found}; this boxlite-vmm reads version \
         {FORMAT_VERSION} — recreate the snapshot"
    )]
    Version { path: PathBuf, found: u32 },
    #[error(
        "{path}: header checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): \
         the file is corrupt"
    )]
    Checksum {
        path: PathBuf,
        stored: u32,
        computed: u32,
    },
    #[error("{path} belongs to snapshot {found}, the state file to {expected}")]
    OtherSnapshot {
        path: PathBuf,
        found: SnapshotId,
        expected: SnapshotId,
    },
    #[error("{path} is {len} bytes; its regions need {needed}: the file is truncated")]
    Truncated {
        path: PathBuf,
        len: u64,
        needed: u64,
    },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
    #[error("a snapshot holds at most {MAX_REGIONS} guest memory regions, this VM has {0}")]
    TooManyRegions(usize),
}

/// The header page for `header`.
pub fn encode_header(header: &MemoryHeader) -> Result<Vec<u8>, MemoryFileError> {
    if header.regions.is_empty() || header.regions.len() > MAX_REGIONS {
        return Err(MemoryFileError::TooManyRegions(header.regions.len()));
    }
    let mut page = vec![0u8; HEADER_PAGE as usize];
    page[..8].copy_from_slice(&MAGIC);
    page[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    page[16..32].copy_from_slice(&header.id.0);
    page[32..40].copy_from_slice(&header.guest_memory_bytes.to_le_bytes());
    page[40..44].copy_from_slice(&(header.regions.len() as u32).to_le_bytes());
    for (i, r) in header.regions.iter().enumerate() {
        let at = REGIONS_AT + i * REGION_LEN;
        page[at..at + 8].copy_from_slice(&r.guest_addr.to_le_bytes());
        page[at + 8..at + 16].copy_from_slice(&r.size.to_le_bytes());
        page[at + 16..at + 24].copy_from_slice(&r.file_offset.to_le_bytes());
    }
    let crc = crc32fast::hash(&page[..CRC_AT]);
    page[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    Ok(page)
}

/// Checks the header page `page` of the memory file at `path`, `file_len`
/// bytes long, against the state file's snapshot `expected`.
pub fn decode_header(
    path: &Path,
    page: &[u8],
    file_len: u64,
    expected: SnapshotId,
) -> Result<MemoryHeader, MemoryFileError> {
    let path_buf = || path.to_path_buf();
    if page.len() < MAGIC.len() || page[..MAGIC.len()] != MAGIC {
        return Err(MemoryFileError::NotAMemoryFile {
            path: path_buf(),
            start: leading_hex(page),
        });
    }
    if page.len() < HEADER_PAGE as usize {
        return Err(MemoryFileError::Truncated {
            path: path_buf(),
            len: file_len,
            needed: HEADER_PAGE,
        });
    }
    let version = le_u32(page, 8);
    if version != FORMAT_VERSION {
        return Err(MemoryFileError::Version {
            path: path_buf(),
            found: version,
        });
    }
    let stored = le_u32(page, CRC_AT);
    let computed = crc32fast::hash(&page[..CRC_AT]);
    if stored != computed {
        return Err(MemoryFileError::Checksum {
            path: path_buf(),
            stored,
            computed,
        });
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&page[16..32]);
    let id = SnapshotId(id);
    if id != expected {
        return Err(MemoryFileError::OtherSnapshot {
            path: path_buf(),
            found: id,
            expected,
        });
    }
    let malformed = |what: String| MemoryFileError::Malformed {
        path: path_buf(),
        what,
    };
    let count = le_u32(page, 40) as usize;
    if count == 0 || count > MAX_REGIONS {
        return Err(malformed(format!(
            "{count} memory regions (1..={MAX_REGIONS} expected)"
        )));
    }
    let regions: Vec<Region> = (0..count)
        .map(|i| {
            let at = REGIONS_AT + i * REGION_LEN;
            Region {
                guest_addr: le_u64(page, at),
                size: le_u64(page, at + 8),
                file_offset: le_u64(page, at + 16),
            }
        })
        .collect();
    let guest_memory_bytes = le_u64(page, 32);
    check_regions(&regions, guest_memory_bytes).map_err(malformed)?;
    let header = MemoryHeader {
        id,
        guest_memory_bytes,
        regions,
    };
    // check_regions bounds every end, so this cannot overflow.
    let needed = header.file_len();
    if file_len < needed {
        return Err(MemoryFileError::Truncated {
            path: path_buf(),
            len: file_len,
            needed,
        });
    }
    Ok(header)
}

/// Regions must be page aligned and non-empty, add up to the guest's
/// memory, and overlap neither in the guest nor in the file.
fn check_regions(regions: &[Region], total: u64) -> Result<(), String> {
    let page = HEADER_PAGE;
    let mut sum = 0u64;
    for (i, r) in regions.iter().enumerate() {
        if r.size == 0
            || [r.guest_addr, r.size, r.file_offset]
                .iter()
                .any(|v| v % page != 0)
        {
            return Err(format!(
                "region {i} (guest {:#x}, {:#x} bytes, file offset {:#x}) is empty or not page aligned",
                r.guest_addr, r.size, r.file_offset
            ));
        }
        let ends = [
            r.guest_addr.checked_add(r.size),
            r.file_offset
                .checked_add(HEADER_PAGE)
                .and_then(|o| o.checked_add(r.size)),
        ];
        if ends.iter().any(Option::is_none) {
            return Err(format!("region {i} ends past 2^64"));
        }
        sum = sum
            .checked_add(r.size)
            .ok_or_else(|| "the regions' sizes overflow".to_string())?;
        for (j, o) in regions.iter().enumerate().take(i) {
            let overlap = |a: u64, b: u64| a < b + o.size && b < a + r.size;
            if overlap(r.guest_addr, o.guest_addr) || overlap(r.file_offset, o.file_offset) {
                return Err(format!("regions {j} and {i} overlap"));
            }
        }
    }
    if sum != total {
        return Err(format!(
            "the regions hold {sum} bytes; the header says the guest has {total}"
        ));
    }
    Ok(())
}
