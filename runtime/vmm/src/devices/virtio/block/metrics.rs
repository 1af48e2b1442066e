//! virtio-blk counters (`boxlite_block_<field>_total`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-device counters.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// IN requests completed with OK.
    pub reads: AtomicU64,
    /// OUT requests completed with OK.
    pub writes: AtomicU64,
    /// FLUSH requests completed with OK.
    pub flushes: AtomicU64,
    /// GET_ID requests completed with OK.
    pub get_ids: AtomicU64,
    /// Bytes read from the image into the guest.
    pub read_bytes: AtomicU64,
    /// Bytes written from the guest to the image.
    pub write_bytes: AtomicU64,
    /// Requests answered IOERR (bad request, out of range, read-only, I/O error).
    pub io_errors: AtomicU64,
    /// Requests answered UNSUPP (unknown type).
    pub unsupported: AtomicU64,
    /// Chains returned with length 0 (no usable status byte or header).
    pub bad_chains: AtomicU64,
}

impl BlockMetrics {
    /// Adds `n` to `counter`, returns the previous value.
    pub(crate) fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed)
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
