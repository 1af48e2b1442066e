//! virtio-balloon counters (`boxlite_balloon_<field>_total`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-device counters. Pages are the balloon's 4 KiB units.
#[derive(Debug, Default)]
pub struct BalloonMetrics {
    /// Inflated pages whose host memory was discarded.
    pub inflated_pages: AtomicU64,
    /// Pages the guest took back (valid deflate PFNs).
    pub deflated_pages: AtomicU64,
    /// Reporting chains served.
    pub reports: AtomicU64,
    /// Bytes of reported free memory whose host memory was discarded.
    pub reported_bytes: AtomicU64,
    /// Chains refused whole and returned without discarding anything.
    pub bad_chains: AtomicU64,
    /// PFNs or reported ranges skipped (outside guest RAM, across a region
    /// end, unaligned, empty, overflowing).
    pub bad_ranges: AtomicU64,
    /// Discards the host kernel refused.
    pub discard_errors: AtomicU64,
}

impl BalloonMetrics {
    /// Adds `n` to `counter`, returns the previous value.
    pub(crate) fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed)
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
