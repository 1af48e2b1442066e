//! vsock counters (`boxlite_vsock_<field>_total`).

use std::sync::atomic::{AtomicU64, Ordering};

/// Per-device counters, shared by the device, the muxer and its connections.
#[derive(Debug, Default)]
pub struct VsockMetrics {
    /// Payload bytes host → guest.
    pub rx_bytes: AtomicU64,
    /// Payload bytes guest → host (accepted from the TX queue).
    pub tx_bytes: AtomicU64,
    /// Packets given to the guest.
    pub rx_packets: AtomicU64,
    /// Packets taken from the guest.
    pub tx_packets: AtomicU64,
    /// Connections that reached the host socket (both directions).
    pub conns_opened: AtomicU64,
    /// Connections removed.
    pub conns_closed: AtomicU64,
    /// Connections refused: no listener, limit reached, bad `CONNECT` line.
    pub conns_refused: AtomicU64,
    /// RST packets sent to the guest.
    pub rst_sent: AtomicU64,
    /// Malformed chains returned with length 0.
    pub bad_chains: AtomicU64,
    /// Guest packets dropped (spoofed source CID, nothing to answer).
    pub dropped_packets: AtomicU64,
    /// Connections reset because the guest broke the protocol (credit, state).
    pub protocol_errors: AtomicU64,
}

impl VsockMetrics {
    /// Adds `n` to `counter`, returns the previous value.
    pub(crate) fn add(counter: &AtomicU64, n: u64) -> u64 {
        counter.fetch_add(n, Ordering::Relaxed)
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}
