//! virtio-blk (device id 2) over a raw image file.
//!
//! One request queue. Each chain is parsed by [`request`] (header copied
//! once, every data buffer checked against guest memory and the limits
//! below, status descriptor checked) and executed by [`device`] with
//! synchronous `pread`/`pwrite`/`fdatasync` on the VMM event loop thread.
//! The status byte is written last. Metrics live in [`metrics`].

pub mod device;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod metrics;
pub mod request;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::Block;
pub use metrics::BlockMetrics;

/// Size of the one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Logical block size reported to the guest; sectors are always 512 bytes.
pub const SECTOR_SIZE: u64 = 512;
/// log2(SECTOR_SIZE).
pub const SECTOR_SHIFT: u32 = 9;
/// Most data segments per request (`seg_max`), leaving two descriptors of
/// the queue for the header and the status.
pub const SEG_MAX: u32 = 128;
/// Largest data segment (`size_max`).
pub const SIZE_MAX: u32 = 128 * 1024;
/// Largest data transfer of one request: `SEG_MAX * SIZE_MAX` (16 MiB).
pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
/// Bytes of the request header (`type`, `reserved`, `sector`).
pub const REQUEST_HEADER_SIZE: u32 = 16;
/// Bytes of the GET_ID answer (`VIRTIO_BLK_ID_BYTES`).
pub const ID_BYTES: usize = 20;
/// Bytes of the config space we expose (`capacity` .. `blk_size`).
pub const CONFIG_SPACE_SIZE: usize = 24;

/// Feature bits (virtio 1.2 §5.2.3).
pub mod features {
    pub const SIZE_MAX: u64 = 1 << 1;
    pub const SEG_MAX: u64 = 1 << 2;
    pub const RO: u64 = 1 << 5;
    pub const BLK_SIZE: u64 = 1 << 6;
    pub const FLUSH: u64 = 1 << 9;
}

/// Request types.
pub mod req_type {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
}

/// Status byte values.
pub mod blk_status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

/// virtio-blk errors.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("Failed to open disk image {0}")]
    Open(PathBuf, #[source] std::io::Error),
    #[error("Failed to read the size of disk image {0}")]
    Size(PathBuf, #[source] std::io::Error),
    #[error("Disk id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
    // Per-chain errors: the chain is returned without touching the disk.
    #[error("Descriptor chain {head}: no header descriptor")]
    NoHeader { head: u16 },
    #[error("Descriptor chain {head}: header descriptor is write-only")]
    HeaderWriteOnly { head: u16 },
    #[error(
        "Descriptor chain {head}: header descriptor has {len} bytes, {REQUEST_HEADER_SIZE} needed"
    )]
    HeaderTooShort { head: u16, len: u32 },
    #[error("Descriptor chain {head}: failed to read the header")]
    HeaderRead {
        head: u16,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("Descriptor chain {head}: no status descriptor")]
    NoStatus { head: u16 },
    #[error("Descriptor chain {head}: status descriptor is read-only")]
    StatusReadOnly { head: u16 },
    #[error("Descriptor chain {head}: status descriptor at {addr:#x} (+{len:#x}) is outside guest memory")]
    StatusBuffer { head: u16, addr: u64, len: u32 },
    #[error("Descriptor chain {head}: buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    BadBuffer { head: u16, addr: u64, len: u32 },
    // Request errors: answered with IOERR (status written, no I/O).
    #[error("Request {head}: data descriptor has the wrong direction for request type {req_type}")]
    WrongDirection { head: u16, req_type: u32 },
    #[error("Request {head}: {got} data segments, the limit is {SEG_MAX}")]
    TooManySegments { head: u16, got: usize },
    #[error("Request {head}: data segment of {got} bytes, the limit is {SIZE_MAX}")]
    SegmentTooLong { head: u16, got: u32 },
    #[error("Request {head}: {got} data bytes, the limit is {MAX_REQUEST_BYTES}")]
    RequestTooLong { head: u16, got: u64 },
    #[error("Request {head}: {got} data bytes is not a multiple of {SECTOR_SIZE}")]
    Unaligned { head: u16, got: u64 },
    #[error("Request {head}: sector {sector} + {len} bytes is beyond the capacity of {capacity} sectors")]
    OutOfRange {
        head: u16,
        sector: u64,
        len: u64,
        capacity: u64,
    },
    #[error("Request {head}: write to a read-only disk")]
    ReadOnly { head: u16 },
    #[error("Disk I/O failed")]
    Io(#[source] std::io::Error),
    #[error("Failed to copy data to or from guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Logs the first 10 events of a kind, then one in 1000 (`n` = how many
/// happened before this one). Guest-triggered paths log through this.
pub(crate) fn rate_limited(n: u64) -> bool {
    n < 10 || n % 1000 == 0
}
