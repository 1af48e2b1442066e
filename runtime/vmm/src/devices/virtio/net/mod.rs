//! virtio-net (device id 1) over a tap device (or any [`NetBackend`]).
//!
//! Two queues (RX, TX), the 12-byte `virtio_net_hdr_v1` on every frame
//! (passed through to and from the tap, which is opened with
//! `IFF_VNET_HDR` and `TUNSETVNETHDRSZ = 12`), MAC and link status in the
//! config space, checksum/TSO offloads mapped onto `TUNSETOFFLOAD` from
//! what the driver acked.
//!
//! - [`backend`]: the `NetBackend` trait and a unix datagram socket
//!   backend (frame boundaries kept; tests, and any future userspace
//!   switch); [`tap`]: the tap backend.
//! - [`device`]: queue logic — TX chain → one `write` to the backend,
//!   backend frame → one RX chain; bounded work per call.
//! - [`event_handler`]: the backend fd and the device's wake eventfd on the
//!   VMM event loop.

pub mod backend;
pub mod device;
pub mod event_handler;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod metrics;
pub mod tap;
#[cfg(test)]
mod tests;

pub use backend::{NetBackend, UnixDgramBackend};
pub use device::Net;
pub use event_handler::NetEventHandler;
pub use metrics::NetMetrics;
pub use tap::Tap;

/// RX queue index (device → guest frames).
pub const RXQ: u16 = 0;
/// TX queue index (guest → device frames).
pub const TXQ: u16 = 1;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_net_hdr_v1` (modern devices always use 12 bytes).
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame we carry: a 64 KiB GSO packet plus Ethernet and
/// VLAN headers.
pub const MAX_FRAME_LEN: usize = 65535 + 14 + 4;
/// Largest header + frame in either direction.
pub const MAX_BUFFER_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;
/// Frames moved backend → guest per call before yielding to the event loop.
pub const RX_BUDGET: usize = 64;
/// TX chains handled per call before yielding to the event loop.
pub const TX_BUDGET: usize = 128;
/// Most descriptors looked at per chain (a longer chain fails alone).
pub const MAX_CHAIN_DESCRIPTORS: usize = QUEUE_SIZE as usize;
/// Bytes of the config space we expose: `mac[6]`, `status` le16.
pub const CONFIG_SPACE_SIZE: usize = 8;

/// Feature bits (virtio 1.2 §5.1.3).
pub mod features {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const GUEST_ECN: u64 = 1 << 9;
    pub const GUEST_UFO: u64 = 1 << 10;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const HOST_ECN: u64 = 1 << 13;
    pub const HOST_UFO: u64 = 1 << 14;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// `VIRTIO_NET_S_LINK_UP`.
pub const STATUS_LINK_UP: u16 = 1;

/// Tap offload flags (`TUNSETOFFLOAD`, linux/if_tun.h).
pub mod tun_flags {
    pub const CSUM: u32 = 0x01;
    pub const TSO4: u32 = 0x02;
    pub const TSO6: u32 = 0x04;
    pub const TSO_ECN: u32 = 0x08;
    pub const UFO: u32 = 0x10;
}

/// What the tap may hand us (and so the guest) given the features the
/// driver acked: partial checksums only with GUEST_CSUM, TSO only on top
/// of it, ECN only with TSO.
pub fn tap_offload_flags(acked: u64) -> u32 {
    let mut f = 0;
    if acked & features::GUEST_CSUM != 0 {
        f |= tun_flags::CSUM;
        if acked & features::GUEST_TSO4 != 0 {
            f |= tun_flags::TSO4;
        }
        if acked & features::GUEST_TSO6 != 0 {
            f |= tun_flags::TSO6;
        }
        if acked & features::GUEST_ECN != 0 && f & (tun_flags::TSO4 | tun_flags::TSO6) != 0 {
            f |= tun_flags::TSO_ECN;
        }
        if acked & features::GUEST_UFO != 0 {
            f |= tun_flags::UFO;
        }
    }
    f
}

/// virtio-net errors.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("Failed to open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    #[error("Tap name {0:?} is empty, longer than 15 bytes or contains a NUL")]
    BadTapName(String),
    #[error("Failed to create or attach tap {0}")]
    SetIff(String, #[source] std::io::Error),
    #[error("tap_fd {0} is not an open file descriptor we may own (must be >= 3)")]
    BadFd(i32),
    #[error("tap_fd {0} is not a tap device")]
    NotATap(i32, #[source] std::io::Error),
    #[error("tap_fd {fd} has flags {flags:#x}: a tap with IFF_NO_PI and IFF_VNET_HDR is needed")]
    TapFlags { fd: i32, flags: u32 },
    #[error("Failed to set the tap's vnet header size to {VNET_HDR_LEN}")]
    VnetHdrSize(#[source] std::io::Error),
    #[error("Failed to set tap offloads {0:#x}")]
    SetOffload(u32, #[source] std::io::Error),
    #[error("Failed to make the backend non-blocking")]
    NonBlocking(#[source] std::io::Error),
    #[error("Failed to create the wake eventfd")]
    EventFd(#[source] std::io::Error),
    // Per-chain errors: the chain is returned with length 0.
    #[error("Descriptor chain {head}: {what} descriptor has the wrong direction")]
    WrongDirection { head: u16, what: &'static str },
    #[error("Descriptor chain {head}: buffer at {addr:#x} (+{len:#x}) is outside guest memory")]
    BadBuffer { head: u16, addr: u64, len: u32 },
    #[error("Descriptor chain {head}: {got} bytes exceed the limit of {MAX_BUFFER_LEN}")]
    TooLong { head: u16, got: u64 },
    #[error("Descriptor chain {head}: {got} bytes cannot hold the {VNET_HDR_LEN}-byte virtio-net header")]
    TooShort { head: u16, got: u64 },
    #[error("Descriptor chain {head}: more than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooManyDescriptors { head: u16 },
    #[error("Failed to copy a frame to or from guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Logs the first 10 events of a kind, then one in 1000 (`n` = how many
/// happened before this one). Guest-triggered paths log through this.
pub(crate) fn rate_limited(n: u64) -> bool {
    n < 10 || n % 1000 == 0
}
