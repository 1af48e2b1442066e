//! virtio-net counters (`boxlite_net_<field>_total`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-device counters.
#[derive(Debug, Default)]
pub struct NetMetrics {
    /// Frames given to the guest.
    pub rx_frames: AtomicU64,
    /// Bytes given to the guest (frames without the virtio-net header).
    pub rx_bytes: AtomicU64,
    /// Backend frames dropped: larger than the guest's buffer, oversized or runt.
    pub rx_drops: AtomicU64,
    /// Frames taken from the guest and written to the backend.
    pub tx_frames: AtomicU64,
    /// Bytes written to the backend (frames without the virtio-net header).
    pub tx_bytes: AtomicU64,
    /// Guest frames the backend refused (full, link down, invalid GSO header).
    pub tx_drops: AtomicU64,
    /// Malformed chains (either queue) returned with length 0.
    pub bad_chains: AtomicU64,
    /// Backend read errors other than "would block".
    pub backend_errors: AtomicU64,
}

impl NetMetrics {
    /// Adds `n` to `counter`, returns the previous value.
    pub(crate) fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed)
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
