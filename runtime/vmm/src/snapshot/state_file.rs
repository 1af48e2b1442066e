//! The state file's framing (docs/snapshot-design.md §3):
//!
//! ```text
//! off  size  field
//! 0    8     magic "BXLSNAP\0"
//! 8    4     format version, u32 LE
//! 12   4     header length, u32 LE (128)
//! 16   4     flags, u32 LE (bit 0: the body is JSON; others must be 0)
//! 20   4     reserved, 0
//! 24   8     body length, u64 LE
//! 32   16    snapshot id
//! 48   32    CPUID digest (SHA-256 of every vCPU's CPUID, as installed)
//! 80   8     guest memory bytes, u64 LE
//! 88   8     created, Unix milliseconds, u64 LE
//! 96   24    VMM version, UTF-8, NUL-padded (logged, not compared)
//! 120  4     CRC32 of bytes 0..120
//! 124  4     reserved, 0
//! 128  N     body
//! 128+N 4    CRC32 of bytes 0..128+N
//! ```
//!
//! The CRCs catch truncation and corruption, not tampering: templates live
//! in a root-owned directory, and restore still validates everything it
//! hands to KVM or a device.

use std::path::{Path, PathBuf};

use super::{le_u32, le_u64, leading_hex, SnapshotId, FORMAT_VERSION};

pub const MAGIC: [u8; 8] = *b"BXLSNAP\0";
pub const HEADER_LEN: usize = 128;
const TRAILER_LEN: usize = 4;
/// Bit 0 of the flags: the body is JSON (the only body this build writes).
pub const FLAG_JSON_BODY: u32 = 1;
/// The largest body read back: a few vCPUs' state is tens of KiB; anything
/// near this bound is not a state file of ours.
pub const MAX_BODY_LEN: u64 = 16 << 20;
const VMM_VERSION_LEN: usize = 24;

/// What the header says about the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateHeader {
    pub id: SnapshotId,
    pub cpuid_digest: [u8; 32],
    pub guest_memory_bytes: u64,
    pub created_unix_ms: u64,
    /// At most 24 bytes of UTF-8; longer is cut at a character boundary.
    pub vmm_version: String,
}

/// Why a state file was refused. Each names the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateFileError {
    #[error("{path}: not a boxlite-vmm snapshot (it starts with {start})")]
    NotASnapshot { path: PathBuf, start: String },
    #[error(
        "{path}: snapshot format version {found}; this boxlite-vmm reads version \
         {FORMAT_VERSION} — recreate the snapshot"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: truncated: {what} needs {needed} bytes, the file has {len}")]
    Truncated {
        path: PathBuf,
        what: &'static str,
        needed: u64,
        len: u64,
    },
    #[error(
        "{path}: {what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): \
         the file is corrupt"
    )]
    Checksum {
        path: PathBuf,
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("{path}: {what}")]
    Malformed { path: PathBuf, what: String },
}

/// The whole state file for `header` and `body` (JSON).
pub fn encode(header: &StateHeader, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
    out.extend_from_slice(&FLAG_JSON_BODY.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&header.id.0);
    out.extend_from_slice(&header.cpuid_digest);
    out.extend_from_slice(&header.guest_memory_bytes.to_le_bytes());
    out.extend_from_slice(&header.created_unix_ms.to_le_bytes());
    let mut version = [0u8; VMM_VERSION_LEN];
    let v = truncate_utf8(&header.vmm_version, VMM_VERSION_LEN);
    version[..v.len()].copy_from_slice(v.as_bytes());
    out.extend_from_slice(&version);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    debug_assert_eq!(out.len(), HEADER_LEN);
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Checks a whole state file read into `bytes` (from `path`, for the
/// errors) and returns its header and body. Checked in the order that
/// gives the most useful error: ours at all, which version, the header's
/// own checksum, then lengths, then the checksum of everything.
pub fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<(StateHeader, &'a [u8]), StateFileError> {
    let path_buf = || path.to_path_buf();
    let len = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(StateFileError::NotASnapshot {
            path: path_buf(),
            start: leading_hex(bytes),
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(StateFileError::Truncated {
            path: path_buf(),
            what: "the header",
            needed: HEADER_LEN as u64,
            len,
        });
    }
    let version = le_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(StateFileError::Version {
            path: path_buf(),
            found: version,
        });
    }
    let stored = le_u32(bytes, 120);
    let computed = crc32fast::hash(&bytes[..120]);
    if stored != computed {
        return Err(StateFileError::Checksum {
            path: path_buf(),
            what: "header",
            stored,
            computed,
        });
    }
    let malformed = |what: String| StateFileError::Malformed {
        path: path_buf(),
        what,
    };
    let header_len = le_u32(bytes, 12);
    if header_len as usize != HEADER_LEN {
        return Err(malformed(format!(
            "header length {header_len}, expected {HEADER_LEN}"
        )));
    }
    let flags = le_u32(bytes, 16);
    if flags != FLAG_JSON_BODY {
        return Err(malformed(format!(
            "flags {flags:#x}: this build reads only a JSON body (flags 0x1)"
        )));
    }
    if le_u32(bytes, 20) != 0 || le_u32(bytes, 124) != 0 {
        return Err(malformed("reserved header bytes are not zero".into()));
    }
    let body_len = le_u64(bytes, 24);
    if body_len > MAX_BODY_LEN {
        return Err(malformed(format!(
            "the header announces a {body_len}-byte body; at most {MAX_BODY_LEN} is read"
        )));
    }
    let total = HEADER_LEN as u64 + body_len + TRAILER_LEN as u64;
    if len < total {
        return Err(StateFileError::Truncated {
            path: path_buf(),
            what: "the header's body length and the trailer",
            needed: total,
            len,
        });
    }
    if len > total {
        return Err(malformed(format!(
            "{} bytes after the trailer (the header announces {total} in all)",
            len - total
        )));
    }
    let end = HEADER_LEN + body_len as usize;
    let stored = le_u32(bytes, end);
    let computed = crc32fast::hash(&bytes[..end]);
    if stored != computed {
        return Err(StateFileError::Checksum {
            path: path_buf(),
            what: "body",
            stored,
            computed,
        });
    }
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[32..48]);
    let mut cpuid_digest = [0u8; 32];
    cpuid_digest.copy_from_slice(&bytes[48..80]);
    let version_bytes = &bytes[96..96 + VMM_VERSION_LEN];
    let used = version_bytes
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(VMM_VERSION_LEN);
    let vmm_version = std::str::from_utf8(&version_bytes[..used])
        .map_err(|_| malformed("the VMM version is not UTF-8".into()))?
        .to_owned();
    let header = StateHeader {
        id: SnapshotId(id),
        cpuid_digest,
        guest_memory_bytes: le_u64(bytes, 80),
        created_unix_ms: le_u64(bytes, 88),
        vmm_version,
    };
    Ok((header, &bytes[HEADER_LEN..end]))
}

/// The longest prefix of `s` of at most `max` bytes that ends on a
/// character boundary.
fn truncate_utf8(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
