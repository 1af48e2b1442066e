//! The vsock device as a vhost-user backend (the `boxlite-vsock` binary):
//! QEMU runs the virtio transport (`-device vhost-user-vsock-device`) and
//! hands us guest memory and the three vrings; the data path and the hybrid
//! unix socket are the same [`Muxer`] and [`queues`](super::queues) as the
//! built-in VMM's MMIO device.
//!
//! Why not `vhost-device-vsock`: its 0.3.0 release ends its worker thread
//! when a host connection arrives before the guest enables the RX queue,
//! and strands host data (requests, stdin) until an unrelated event when an
//! EPOLLOUT wake-up queues a connection with nothing to send (the RX pass
//! stops at that entry). Both hang a sandbox. Here, a backend event never
//! ends the event loop: queue errors are logged and the queues are left
//! for the next kick, and every RX pass fills until the muxer or the queue
//! is empty.
//!
//! Threading: one vhost-user worker thread runs every queue kick and the
//! muxer's epoll fd ([`BACKEND_EVENT`]); the daemon's main thread answers
//! the frontend (memory table, vring setup, config reads). Both reach the
//! backend through one `Mutex`.

use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_NOTIFY_ON_EMPTY;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::metrics::VsockMetrics;
use super::muxer::Muxer;
use super::queues::{drain_tx, fill_rx, kick, VsockQueues};
use super::{VsockError, EVQ, MAX_GUEST_CID, MIN_GUEST_CID, RXQ, TXQ};
use crate::devices::virtio::{VirtioError, VIRTIO_F_VERSION_1};

/// Number of vrings: RX, TX, event.
pub const NUM_QUEUES: usize = 3;
/// Largest vring the frontend may set up. QEMU's vhost-user-vsock-device
/// uses 1024-entry vrings (the MMIO device offers [`super::QUEUE_SIZE`]).
pub const MAX_QUEUE_SIZE: usize = 1024;
/// Event id of the muxer's epoll fd on the worker thread's epoll set (ids
/// up to `NUM_QUEUES` belong to the vrings and the exit event).
pub const BACKEND_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// The vhost-user vsock backend.
pub struct VhostUserVsock {
    cid: u64,
    muxer: Muxer,
    metrics: Arc<VsockMetrics>,
    /// Guest memory, once the frontend sent its memory table.
    mem: Option<GuestMemoryAtomic<GuestMemoryMmap>>,
    /// Set after a queue failed: the device stays silent until the driver
    /// sets the vrings up again (there is no DEVICE_NEEDS_RESET over
    /// vhost-user).
    broken: bool,
}

impl VhostUserVsock {
    /// A backend for guest `cid` with its hybrid socket at `uds_path`
    /// (bound now, so host clients can connect before the guest is up).
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(VsockError::BadCid(cid));
        }
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(cid, uds_path, metrics.clone())?;
        Ok(VhostUserVsock {
            cid,
            muxer,
            metrics,
            mem: None,
            broken: false,
        })
    }

    /// Connects now to the listeners of the host ports the guest may
    /// connect to ([`super::muxer::Muxer::preconnect`]): done before the
    /// jail, whose seccomp profile has no `socket` or `connect`.
    pub fn preconnect(&mut self, ports: &[u32]) -> Result<(), VsockError> {
        self.muxer.preconnect(ports)
    }

    /// The fd to register as [`BACKEND_EVENT`] on the worker's epoll set.
    pub fn backend_fd(&self) -> RawFd {
        self.muxer.epoll_fd()
    }

    /// The host-side backend (tests).
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// Moves packets if the frontend gave us memory and both data vrings
    /// are ready and enabled; otherwise the muxer keeps what it owes the
    /// guest (a host CONNECT waits for the driver, as in the MMIO device).
    fn kick_if_ready(&mut self, vrings: &[VringRwLock]) {
        if self.broken {
            return;
        }
        let Some(mem) = self.mem.as_ref().map(|m| m.memory()) else {
            return;
        };
        let (Some(rx), Some(tx)) = (vrings.get(RXQ as usize), vrings.get(TXQ as usize)) else {
            return;
        };
        let usable = |v: &VringRwLock| {
            let state = v.get_ref();
            state.is_enabled() && state.get_queue().ready()
        };
        if !usable(rx) || !usable(tx) {
            return;
        }
        let mut queues = Vrings { rx, tx, mem: &mem };
        if let Err(e) = kick(&mut queues, &mut self.muxer, &self.metrics) {
            tracing::error!(device = "vsock", error = %e, source = ?std::error::Error::source(&e),
                "vring failed; the device is silent until the driver sets it up again");
            self.broken = true;
        }
    }
}

/// The RX and TX vrings of one kick, with the memory they point into.
struct Vrings<'a> {
    rx: &'a VringRwLock,
    tx: &'a VringRwLock,
    mem: &'a GuestMemoryMmap,
}

/// One pass of `step` over `vring`'s queue, then the frontend's call
/// eventfd if the driver wants an interrupt.
fn run_and_notify(
    vring: &VringRwLock,
    mem: &GuestMemoryMmap,
    muxer: &mut Muxer,
    metrics: &VsockMetrics,
    step: fn(
        &mut Muxer,
        &VsockMetrics,
        &mut virtio_queue::Queue,
        &GuestMemoryMmap,
    ) -> Result<bool, virtio_queue::Error>,
) -> Result<bool, VirtioError> {
    let mut state = vring.get_mut();
    let used = step(muxer, metrics, state.get_queue_mut(), mem).map_err(VirtioError::Queue)?;
    if used
        && state
            .get_queue_mut()
            .needs_notification(mem)
            .map_err(VirtioError::Queue)?
    {
        state.signal_used_queue().map_err(VirtioError::Interrupt)?;
    }
    Ok(used)
}

impl VsockQueues for Vrings<'_> {
    fn rx(&mut self, muxer: &mut Muxer, metrics: &VsockMetrics) -> Result<bool, VirtioError> {
        run_and_notify(self.rx, self.mem, muxer, metrics, fill_rx)
    }

    fn tx(&mut self, muxer: &mut Muxer, metrics: &VsockMetrics) -> Result<bool, VirtioError> {
        run_and_notify(self.tx, self.mem, muxer, metrics, drain_tx)
    }
}

impl VhostUserBackendMut for VhostUserVsock {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        // As the MMIO device: modern, stream sockets only. No EVENT_IDX:
        // the driver kicks on every buffer it adds, so no kick is lost
        // between a drained queue and re-enabled notifications.
        // NOTIFY_ON_EMPTY: QEMU's transport always acks it, and a backend
        // must offer every bit the frontend acks; it changes nothing here
        // (a used buffer is always notified unless the driver suppressed it).
        VIRTIO_F_VERSION_1
            | (1 << VIRTIO_F_NOTIFY_ON_EMPTY)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        // CONFIG: QEMU reads the guest CID from us. MQ: QEMU asks how many
        // vrings we have.
        VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG
    }

    fn set_event_idx(&mut self, enabled: bool) {
        if enabled {
            // Not offered; a frontend that acks it anyway is logged.
            tracing::warn!(
                device = "vsock",
                "frontend enabled EVENT_IDX, which was not offered"
            );
        }
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.cid.to_le_bytes();
        let (offset, size) = (offset as usize, size as usize);
        match offset.checked_add(size) {
            Some(end) if end <= cfg.len() => cfg[offset..end].to_vec(),
            _ => Vec::new(),
        }
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "vsock config space is read-only (write of {} bytes at offset {offset:#x})",
                buf.len()
            ),
        ))
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn reset_device(&mut self) {
        self.reset_connections("device reset");
    }

    fn stop_vring(&mut self, queue_index: u32) -> io::Result<()> {
        // GET_VRING_BASE: the frontend stops the device (driver reset or VM
        // stop). Guest connections do not survive it, as on a reset of the
        // MMIO device.
        if queue_index == u32::from(RXQ) {
            self.reset_connections("vrings stopped");
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // The worker owns both ends; the daemon writes the notifier when
        // the frontend disconnects.
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!(device = "vsock", error = %e, "cannot create the worker's exit event");
                None
            }
        }
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        // Errors are never returned: an Err ends vhost-user-backend's
        // worker loop, and with it every connection of the sandbox.
        match device_event {
            d if d == RXQ || d == TXQ => self.kick_if_ready(vrings),
            EVQ => {}
            BACKEND_EVENT => {
                self.muxer.process_events();
                self.kick_if_ready(vrings);
            }
            other => {
                tracing::warn!(
                    device = "vsock",
                    event = other,
                    "unexpected event id ignored"
                )
            }
        }
        Ok(())
    }
}

impl VhostUserVsock {
    fn reset_connections(&mut self, why: &str) {
        let n = self.muxer.connection_count();
        if n > 0 {
            tracing::info!(
                device = "vsock",
                connections = n,
                "{why}: closing guest connections"
            );
        }
        self.muxer.reset();
        self.broken = false;
    }
}

/// Serves one frontend on `socket` for guest `cid`, with the hybrid socket
/// at `uds_path`: [`bind`] then [`BoundBackend::serve`].
pub fn serve(cid: u64, socket: &Path, uds_path: &Path) -> Result<(), ServeError> {
    bind(cid, socket, uds_path, None)?.serve()
}

/// [`serve`] with a backend the caller made (and may look into).
pub fn serve_backend(backend: Arc<Mutex<VhostUserVsock>>, socket: &Path) -> Result<(), ServeError> {
    let listener = listen(socket)?;
    BoundBackend { backend, listener }.serve()
}

/// A backend with both its sockets bound and no thread started yet: the
/// state in which `boxlite-vsock` jails itself (namespaces and a uid
/// change need a single-threaded process, and the threads the daemon
/// starts then inherit the seccomp filter).
pub struct BoundBackend {
    backend: Arc<Mutex<VhostUserVsock>>,
    listener: Listener,
}

/// Binds the hybrid socket `uds_path` (host clients may connect from now
/// on) and the vhost-user socket `socket` the frontend connects to; with
/// `host_ports`, connects to their listeners too ([`VhostUserVsock::preconnect`]).
pub fn bind(
    cid: u64,
    socket: &Path,
    uds_path: &Path,
    host_ports: Option<&[u32]>,
) -> Result<BoundBackend, ServeError> {
    let mut backend = VhostUserVsock::new(cid, uds_path).map_err(ServeError::Device)?;
    if let Some(ports) = host_ports {
        backend.preconnect(ports).map_err(ServeError::Device)?;
    }
    let listener = listen(socket)?;
    Ok(BoundBackend {
        backend: Arc::new(Mutex::new(backend)),
        listener,
    })
}

fn listen(socket: &Path) -> Result<Listener, ServeError> {
    Listener::new(socket, true).map_err(|e| ServeError::Listen(socket.to_owned(), e))
}

impl BoundBackend {
    /// Starts the daemon's threads, accepts one frontend and serves it until
    /// it disconnects (`Ok`: QEMU ended) or the protocol fails.
    pub fn serve(mut self) -> Result<(), ServeError> {
        let backend_fd = self
            .backend
            .lock()
            .map_err(|_| ServeError::Poisoned)?
            .backend_fd();
        let mut daemon = vhost_user_backend::VhostUserDaemon::new(
            "boxlite-vsock".to_string(),
            self.backend,
            GuestMemoryAtomic::new(GuestMemoryMmap::new()),
        )
        .map_err(ServeError::Daemon)?;
        let handlers = daemon.get_epoll_handlers();
        let worker = handlers.first().ok_or(ServeError::NoWorker)?;
        worker
            .register_listener(backend_fd, EventSet::IN, u64::from(BACKEND_EVENT))
            .map_err(ServeError::Register)?;
        daemon
            .start(&mut self.listener)
            .map_err(ServeError::Daemon)?;
        let result = daemon.wait();
        // The vring worker ends on its exit event, whatever the outcome.
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        match result {
            // A frontend that quits mid-message is a frontend that quit.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => Ok(()),
            Err(e) => Err(ServeError::Daemon(e)),
        }
    }
}

/// Why [`serve`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("Cannot set up the vsock device")]
    Device(#[source] VsockError),
    #[error("Cannot listen on the vhost-user socket {}", .0.display())]
    Listen(PathBuf, #[source] VhostUserError),
    /// vhost_user_backend::Error implements Display but not Error.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(vhost_user_backend::Error),
    #[error("vhost-user daemon has no worker thread")]
    NoWorker,
    #[error("Cannot watch the hybrid socket's epoll set")]
    Register(#[source] io::Error),
    #[error("vsock backend lock poisoned")]
    Poisoned,
}

#[cfg(test)]
#[path = "vhost_user_tests.rs"]
mod tests;
