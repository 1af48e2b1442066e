//! virtio-vsock (device id 19) with a Firecracker-compatible "hybrid" host
//! side: AF_VSOCK streams in the guest become unix-socket streams on the host.
//!
//! - host → guest: connect to `uds_path`, write `CONNECT <port>\n`, read
//!   `OK <host_port>\n`, then the stream is the guest's port `<port>`;
//! - guest → host: a guest connect to CID 2 port P reaches the unix socket
//!   `<uds_path>_P` if something listens there, else the guest gets RST.
//!
//! Layout: [`packet`] parses and builds packets over descriptor chains (the
//! `virtio-vsock` crate), [`csm`] is one connection's state machine and
//! credit accounting, [`muxer`] owns the listener, the connections and an
//! epoll set of their fds, [`device`] is the `VirtioDevice` (queues) and
//! [`event_handler`] puts the muxer's epoll fd on the VMM event loop.

pub mod csm;
pub mod device;
pub mod event_handler;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod metrics;
pub mod muxer;
pub mod packet;
pub mod queues;
#[cfg(any(test, fuzzing))]
pub mod test_utils;
#[cfg(test)]
mod tests;
pub mod vhost_user;

use std::path::PathBuf;
use std::time::Duration;

pub use device::Vsock;
pub use event_handler::VsockEventHandler;
pub use metrics::VsockMetrics;

/// RX queue index (device → guest packets).
pub const RXQ: u16 = 0;
/// TX queue index (guest → device packets).
pub const TXQ: u16 = 1;
/// Event queue index (transport events; we never send any).
pub const EVQ: u16 = 2;
/// Size of each of the three queues.
pub const QUEUE_SIZE: u16 = 256;

/// The host's CID.
pub const HOST_CID: u64 = 2;
/// Smallest CID a guest may have (0, 1 and 2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// CIDs are 32-bit in Linux and `u32::MAX` is `VMADDR_CID_ANY`.
pub const MAX_GUEST_CID: u64 = u32::MAX as u64 - 1;

/// Largest payload of one packet, both directions (the Linux driver's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`). Longer TX headers fail their chain.
pub const MAX_PKT_BUF_SIZE: u32 = 64 * 1024;
/// Per connection: guest → host bytes the VMM buffers when the host reader
/// is slow. It is also the `buf_alloc` we advertise, so a guest that honours
/// its credit never exceeds it; one that does not gets RST.
pub const MAX_CONN_TX_BUF: u32 = 256 * 1024;
/// Send the guest a credit update once this many bytes were forwarded to
/// the host since the last `fwd_cnt` it saw.
pub const CREDIT_UPDATE_THRESHOLD: u32 = MAX_CONN_TX_BUF / 4;
/// Most connections (established, connecting or still sending `CONNECT`).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most bytes of a `CONNECT <port>\n` line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;
/// Most queued control packets for no connection (RSTs to unknown ports).
/// When full, the TX queue waits until the guest takes RX buffers.
pub const MAX_RAW_RX_QUEUE: usize = 256;
/// Host connections must send their `CONNECT` line and the guest must
/// answer the request within this time.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a full shutdown, the peer has this long to send RST.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
/// How often deadlines are checked while connections exist.
pub const TIMER_TICK: Duration = Duration::from_millis(250);
/// First local port handed to host-initiated connections (Firecracker's choice).
pub const LOCAL_PORT_BASE: u32 = 1 << 30;
/// Longest `uds_path`: `<uds_path>_<u32>` must fit `sun_path` (108 bytes
/// with the terminating NUL).
pub const MAX_UDS_PATH_LEN: usize = 107 - "_4294967295".len();

/// virtio-vsock errors.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("Failed to parse the packet")]
    Packet(#[source] virtio_vsock::packet::Error),
    #[error("Packet length {0} exceeds limit {MAX_PKT_BUF_SIZE}")]
    PacketTooLong(u32),
    #[error("Failed to write the packet header")]
    HeaderWrite(#[source] virtio_vsock::packet::Error),
    #[error("RX buffer has no room for data")]
    NoDataBuffer,
    #[error("Failed to create the muxer's epoll set or timer")]
    Epoll(#[source] std::io::Error),
    #[error("uds_path {0} exists and is not a socket")]
    UdsPathInUse(PathBuf),
    #[error("Failed to remove the stale socket {0}")]
    RemoveStale(PathBuf, #[source] std::io::Error),
    #[error("Failed to listen on {0}")]
    Listen(PathBuf, #[source] std::io::Error),
    #[error("Guest CID {0} is out of range {MIN_GUEST_CID}..={MAX_GUEST_CID}")]
    BadCid(u64),
    #[error("Cannot connect to the listener of host port {port} at {} (guest connections to it are connected before the jail)", path.display())]
    Preconnect {
        port: u32,
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("Failed to read from the host stream")]
    StreamRead(#[source] std::io::Error),
    #[error("Failed to write to the host stream")]
    StreamWrite(#[source] std::io::Error),
    #[error(
        "Guest sent {got} bytes over its credit (buffered {buffered}, limit {MAX_CONN_TX_BUF})"
    )]
    TxBufFull { got: usize, buffered: usize },
}

/// Logs the first 10 events of a kind, then one in 1000 (`n` = how many
/// happened before this one). Guest-triggered paths log through this.
pub(crate) fn rate_limited(n: u64) -> bool {
    n < 10 || n % 1000 == 0
}
