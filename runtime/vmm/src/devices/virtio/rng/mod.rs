//! virtio-rng: fills the guest's write-only buffers from a host entropy
//! source (default `/dev/urandom`).

pub mod device;

pub use device::Rng;

/// The one request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes served for one descriptor chain.
pub const MAX_REQUEST_BYTES: u32 = 64 * 1024;
/// Default entropy source.
pub const DEFAULT_SOURCE: &str = "/dev/urandom";

/// virtio-rng errors.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("Failed to open entropy source {0}")]
    Open(std::path::PathBuf, #[source] std::io::Error),
    #[error("Descriptor chain {head}: descriptor is read-only, the device only writes")]
    ReadOnlyDescriptor { head: u16 },
    #[error("Descriptor chain {head}: buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    BadBuffer { head: u16, addr: u64, len: u32 },
    #[error("Descriptor chain {head}: total length overflows")]
    LengthOverflow { head: u16 },
    #[error("Failed to read the entropy source")]
    Source(#[source] std::io::Error),
}
