//! virtio-fs (device id 26) as a vhost-user frontend: the queues are served
//! by an external `virtiofsd`; the VMM only owns the config space and the
//! vhost-user control connection.
//!
//! - [`device`]: the `VirtioDevice` (config space, queue validation,
//!   activation and reset);
//! - [`backend`]: the vhost-user connection to virtiofsd (connect with a
//!   bounded retry, feature negotiation, memory table, vring setup/stop);
//! - [`event_handler`]: puts the connection on the VMM event loop so a dead
//!   virtiofsd is noticed (DEVICE_NEEDS_RESET);
//! - [`metrics`]: per-device counters.
//!
//! Queue notifications never reach the VMM: the transport's ioeventfds are
//! the vrings' kick fds and the device's irqfd is their call fd, so the
//! guest and virtiofsd talk to each other through KVM directly.

pub mod backend;
pub mod device;
pub mod event_handler;
pub mod metrics;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::time::Duration;

pub use device::Fs;
pub use event_handler::FsEventHandler;
pub use metrics::FsMetrics;

/// High-priority queue index (FUSE_INTERRUPT, FUSE_FORGET).
pub const HIPRIO_QUEUE: u16 = 0;
/// The one request queue.
pub const REQUEST_QUEUE: u16 = 1;
/// Request queues announced in the config space (`num_request_queues`).
pub const NUM_REQUEST_QUEUES: u32 = 1;
/// hiprio + request queues.
pub const NUM_QUEUES: usize = 1 + NUM_REQUEST_QUEUES as usize;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 1024;
/// Length of the tag field in the config space; a tag of exactly this many
/// bytes is not NUL-terminated (virtio 1.2 §5.11.4).
pub const TAG_LEN: usize = 36;
/// Config space: tag + le32 `num_request_queues`.
pub const CONFIG_SPACE_SIZE: usize = TAG_LEN + 4;
/// Longest socket path (`sun_path` holds 108 bytes with the NUL).
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// How long activation keeps retrying to connect to a socket that is
/// missing or refuses connections (virtiofsd still starting).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between connection attempts.
pub const CONNECT_RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// Longest wait for one vhost-user reply; a backend that hangs fails the
/// device instead of blocking a vCPU forever.
pub const BACKEND_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// virtio-fs errors.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {tag:?} is {got} bytes long, it must be 1..={TAG_LEN}")]
    TagLength { tag: String, got: usize },
    #[error("virtio-fs tag {0:?} contains a NUL byte")]
    TagNul(String),
    #[error("Failed to create the virtio-fs backend epoll set")]
    Epoll(#[source] std::io::Error),
    #[error("The connection to virtiofsd at {} was lost and is not made again (it was made before the jail, which allows no new one); the share is gone until the VM ends", .0.display())]
    ConnectionLost(PathBuf),
    #[error("Failed to connect to virtiofsd at {path} within {timeout:?}")]
    Connect {
        path: PathBuf,
        timeout: Duration,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to configure the virtiofsd socket {0}")]
    SocketSetup(PathBuf, #[source] std::io::Error),
    #[error("vhost-user {step} failed on virtiofsd socket {path}")]
    VhostUser {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: vhost::Error,
    },
    #[error("virtiofsd at {path} does not offer VIRTIO_F_VERSION_1 (features {features:#x})")]
    BackendNotModern { path: PathBuf, features: u64 },
    #[error("The driver acked features {acked:#x} that virtiofsd at {path} does not offer ({backend:#x})")]
    UnsupportedFeatures {
        path: PathBuf,
        acked: u64,
        backend: u64,
    },
    #[error("virtiofsd at {path} serves {got} queues, the device needs {need}")]
    QueueCount {
        path: PathBuf,
        got: u64,
        need: usize,
    },
    #[error("Guest memory region at {addr:#x} is not a shared file mapping; vhost-user needs memfd-backed guest memory")]
    MemoryNotShared { addr: u64 },
    #[error("Guest memory has {0} regions, vhost-user takes at most {max}", max = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES)]
    TooManyRegions(usize),
    #[error("Queue {0} is not ready; virtio-fs needs the hiprio and the request queue")]
    QueueNotReady(u16),
    #[error("Queue {index} size {size} is invalid (power of two, 1..={max})")]
    QueueSize { index: u16, size: u16, max: u16 },
    #[error("Queue {index} {ring} at {addr:#x} (+{len:#x}) is misaligned or outside guest memory")]
    QueueAddress {
        index: u16,
        ring: &'static str,
        addr: u64,
        len: u64,
    },
    #[error("The transport's {got} queue eventfds were not handed to the device (needs {need})")]
    QueueEvents { got: usize, need: usize },
    #[error(
        "virtio-fs {tag}: queue {index} has requests in flight (virtiofsd took up to {available}, \
         answered up to {used}); retry when the share is idle"
    )]
    InFlight {
        tag: String,
        index: u16,
        available: u16,
        used: u16,
    },
    #[error("Failed to watch the virtiofsd connection")]
    Watch(#[source] std::io::Error),
}
