//! virtio-balloon (device id 5): guest memory goes back to the host.
//!
//! Queues, numbered densely as Linux numbers them (an optional queue that
//! is not negotiated takes no index; we offer no stats and no free page
//! hinting queue): 0 = inflate, 1 = deflate, 2 = free page reporting (only
//! with [`features::FREE_PAGE_REPORTING`]).
//!
//! - **inflate**: device-readable buffers of le32 PFNs (4 KiB balloon
//!   pages); each page's host memory is discarded ([`discard`]).
//! - **deflate**: the same shape; nothing to do on the host (a discarded
//!   page faults back in, zero-filled, when the guest touches it), the
//!   chain is just returned.
//! - **free page reporting**: device-writable buffers, each one
//!   guest-physical range of free memory (Linux reports blocks of at least
//!   2 MiB, 32 per chain); each range is discarded, the chain returned
//!   with used length 0.
//!
//! Every PFN and range is guest input: [`discard::check_range`] makes sure
//! it lies wholly inside one guest RAM region before any host memory is
//! touched. There is no event handler of its own: the balloon has no host
//! fd, so the generic [`super::event_handler::VirtioEventHandler`] runs its
//! queues. Counters live in [`metrics`].

pub mod device;
pub mod discard;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod metrics;
#[cfg(test)]
mod tests;

pub use device::Balloon;
pub use metrics::BalloonMetrics;

/// Size of the inflate and deflate queues.
pub const QUEUE_SIZE: u16 = 256;
/// Size of the reporting queue: Linux refuses a reporting queue smaller
/// than its `PAGE_REPORTING_CAPACITY` (32 ranges per report, one chain).
pub const REPORTING_QUEUE_SIZE: u16 = 32;
/// log2 of the balloon's page: PFNs always count 4 KiB pages, whatever the
/// guest's page size (`VIRTIO_BALLOON_PFN_SHIFT`).
pub const PFN_SHIFT: u32 = 12;
/// The balloon's page size in bytes.
pub const BALLOON_PAGE_SIZE: u64 = 1 << PFN_SHIFT;
/// Balloon pages in a MiB: how the MiB of the config and the control
/// socket become the device's page counts.
pub const PAGES_PER_MIB: u32 = (1 << 20) / BALLOON_PAGE_SIZE as u32;
/// Bytes of one PFN in an inflate/deflate buffer (le32).
pub const PFN_BYTES: u32 = 4;
/// Most PFNs one inflate/deflate chain may carry. Linux sends at most 256
/// (`VIRTIO_BALLOON_ARRAY_PFNS_MAX`); the cap bounds the work (sorting, one
/// discard per run of pages) a single chain can cause.
pub const MAX_PFNS_PER_CHAIN: u32 = 4096;
/// Bytes of the config space we expose: `num_pages`, `actual`.
pub const CONFIG_SPACE_SIZE: usize = 8;
/// Offset of `actual` (le32, written by the driver) in the config space.
pub const CONFIG_ACTUAL_OFFSET: u64 = 4;

/// Queue indices.
pub mod queue {
    pub const INFLATE: u16 = 0;
    pub const DEFLATE: u16 = 1;
    /// Only with free page reporting negotiated (no stats queue before it).
    pub const REPORTING: u16 = 2;
}

/// Feature bits (virtio 1.2 §5.5.3). Not offered: `MUST_TELL_HOST` (our
/// deflate does nothing, so the guest need not wait for it),
/// `STATS_VQ` (no statistics), `FREE_PAGE_HINT` (migration only),
/// `PAGE_POISON` (we cannot keep a poison pattern in discarded pages).
pub mod features {
    pub const DEFLATE_ON_OOM: u64 = 1 << 2;
    pub const FREE_PAGE_REPORTING: u64 = 1 << 5;
}

/// virtio-balloon errors. Guest mistakes are per chain or per range: the
/// chain is still returned and the mistake counted; none fails the device.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    #[error("Descriptor chain {head} on the {queue} queue: descriptor is write-only, the device only reads PFNs")]
    PfnWriteOnly { head: u16, queue: &'static str },
    #[error("Descriptor chain {head} on the reporting queue: descriptor is read-only, reported ranges are device-writable buffers")]
    ReportReadOnly { head: u16 },
    #[error("Descriptor chain {head} on the {queue} queue: PFN buffer of {len} bytes is empty or not a multiple of {PFN_BYTES}")]
    PfnLength {
        head: u16,
        queue: &'static str,
        len: u32,
    },
    #[error("Descriptor chain {head} on the {queue} queue: more than {MAX_PFNS_PER_CHAIN} PFNs")]
    TooManyPfns { head: u16, queue: &'static str },
    #[error("Descriptor chain {head} on the {queue} queue: PFN buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    PfnBuffer {
        head: u16,
        queue: &'static str,
        addr: u64,
        len: u32,
    },
}

/// Logs the first 10 events of a kind, then one in 1000 (`n` = how many
/// happened before this one). Guest-triggered paths log through this.
pub(crate) fn rate_limited(n: u64) -> bool {
    n < 10 || n % 1000 == 0
}
