//! virtio-fs counters (`boxlite_fs_<event>_total`).

use std::sync::atomic::AtomicU64;

/// Per-device counters.
#[derive(Debug, Default)]
pub struct FsMetrics {
    /// Successful activations (vrings handed to virtiofsd).
    pub activations: AtomicU64,
    /// Activations that failed (bad queues, no backend, refused negotiation).
    pub activation_failures: AtomicU64,
    /// Connections to virtiofsd lost while the device was in use.
    pub backend_lost: AtomicU64,
}
