//! The virtio-fs `VirtioDevice`: config space, queue validation, and the
//! activation/reset lifecycle of the vhost-user backend.
//!
//! Snapshots: virtiofsd holds the rings' positions, so saving stops the
//! vrings (their bases are the next available indexes), refuses when a
//! request is still in flight (virtiofsd's FUSE state cannot be saved),
//! and starts them again from the same bases. A restored device holds
//! the saved queues and starts them on its own virtiofsd when the VM
//! first runs. Only a VM whose memory is shared restores an fs device
//! (`memory_mode` copy): virtiofsd maps guest memory by fd.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use boxlite_protocol::error_chain::chain;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address as _, Bytes as _, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::backend::{Connection, VringSetup};
use super::{
    FsError, FsMetrics, CONFIG_SPACE_SIZE, CONNECT_TIMEOUT, NUM_QUEUES, NUM_REQUEST_QUEUES,
    QUEUE_SIZE, TAG_LEN,
};
use crate::devices::virtio::persist::{restored_context, DeviceSnap, DeviceStateError};
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateContext, Interrupt, VirtioDevice, VirtioError,
    VIRTIO_F_VERSION_1,
};

/// Features offered to the driver; virtiofsd 1.x implements all of them.
/// The guest only gets what the backend also offers: anything else acked
/// fails activation.
pub const AVAIL_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// A started device: what its vrings were started with, kept so a
/// snapshot can save and restart them.
struct Active {
    interrupt: Arc<Interrupt>,
    mem: GuestMemoryMmap,
    /// The driver's queues; their `next_avail` is where virtiofsd started
    /// (updated when a snapshot stops and restarts it).
    queues: Vec<Queue>,
    acked_features: u64,
}

/// A virtio-fs device backed by virtiofsd over vhost-user.
pub struct Fs {
    tag: String,
    config: [u8; CONFIG_SPACE_SIZE],
    socket_path: PathBuf,
    connect_timeout: Duration,
    queue_evts: Vec<EventFd>,
    conn: Option<Connection>,
    /// Whether activation may connect when there is no connection: false
    /// once [`Fs::connect_now`] connected before the jail.
    may_connect: bool,
    active: Option<Active>,
    /// Restored from a snapshot, not started yet: started on its new
    /// virtiofsd when the VM first runs ([`VirtioDevice::wake_after_restore`]).
    restored: Option<Active>,
    /// Watches the connection for a hang-up; on the VMM event loop through
    /// [`FsEventHandler`](super::FsEventHandler).
    epoll: Epoll,
    /// Per-device counters.
    pub metrics: Arc<FsMetrics>,
}

/// Checks a tag: 1..=36 bytes, no NUL.
pub fn validate_tag(tag: &str) -> Result<(), FsError> {
    if tag.is_empty() || tag.len() > TAG_LEN {
        return Err(FsError::TagLength {
            tag: tag.to_string(),
            got: tag.len(),
        });
    }
    if tag.bytes().any(|b| b == 0) {
        return Err(FsError::TagNul(tag.to_string()));
    }
    Ok(())
}

impl Fs {
    /// A device announcing `tag`, served by virtiofsd listening on `socket_path`.
    /// Nothing is connected until the driver activates the device, or
    /// [`Fs::connect_now`] (the jailed VMM, before its jail).
    pub fn new(tag: &str, socket_path: &Path) -> Result<Self, FsError> {
        validate_tag(tag)?;
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[..tag.len()].copy_from_slice(tag.as_bytes());
        config[TAG_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
        Ok(Fs {
            tag: tag.to_string(),
            config,
            socket_path: socket_path.to_path_buf(),
            connect_timeout: CONNECT_TIMEOUT,
            queue_evts: Vec::new(),
            conn: None,
            may_connect: true,
            active: None,
            restored: None,
            epoll: Epoll::new().map_err(FsError::Epoll)?,
            metrics: Arc::new(FsMetrics::default()),
        })
    }

    /// Changes how long activation retries to connect (default [`CONNECT_TIMEOUT`]).
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Connects to virtiofsd now (retrying as activation would), before
    /// the jail: a jailed VMM has no `socket` or `connect`. The connection
    /// lives as long as the device (driver resets keep it); once it is
    /// lost, activation fails with [`FsError::ConnectionLost`] instead of
    /// connecting again.
    pub fn connect_now(&mut self) -> Result<(), FsError> {
        let conn = self.open_connection()?;
        self.conn = Some(conn);
        self.may_connect = false;
        Ok(())
    }

    /// The tag the guest mounts.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The virtiofsd socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Whether a vhost-user session with virtiofsd is open.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// The fd the event loop watches (an epoll set holding the connection).
    pub fn backend_fd(&self) -> i32 {
        self.epoll.as_raw_fd()
    }

    /// Called when [`Fs::backend_fd`] is readable: the only event is a
    /// hang-up of virtiofsd. Drops the connection and, if the device is in
    /// use, marks it DEVICE_NEEDS_RESET.
    pub fn process_backend(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(device = "fs", error = %e, "epoll_wait on the virtiofsd watch failed");
                return;
            }
        };
        if n == 0 || self.conn.is_none() {
            return;
        }
        tracing::error!(
            device = "fs",
            tag = %self.tag,
            socket = %self.socket_path.display(),
            "virtiofsd closed the vhost-user connection (did it exit?); the device needs a reset"
        );
        self.drop_connection();
        if let Some(active) = self.active.take() {
            self.metrics.backend_lost.fetch_add(1, Ordering::Relaxed);
            active.interrupt.set_vring_always(false);
            if let Err(e) = active.interrupt.signal_needs_reset() {
                tracing::error!(device = "fs", error = %e, "failed to signal DEVICE_NEEDS_RESET");
            }
        }
    }

    fn drop_connection(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                conn.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn open_connection(&self) -> Result<Connection, FsError> {
        let conn = Connection::connect(&self.socket_path, self.connect_timeout)?;
        // EPOLLRDHUP (and the implicit HUP/ERR) only: virtiofsd never sends
        // on this socket unasked, and replies are read synchronously.
        self.epoll
            .ctl(
                ControlOperation::Add,
                conn.as_raw_fd(),
                EpollEvent::new(EventSet::READ_HANG_UP, 0),
            )
            .map_err(FsError::Watch)?;
        tracing::info!(
            device = "fs",
            tag = %self.tag,
            socket = %self.socket_path.display(),
            features = format_args!("{:#x}", conn.backend_features()),
            protocol_features = format_args!("{:#x}", conn.protocol_features().bits()),
            "connected to virtiofsd"
        );
        Ok(conn)
    }

    /// Starts virtiofsd's vrings on `queues` (each from its `next_avail`).
    fn start_vrings(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &[Queue],
        acked_features: u64,
        interrupt: &Interrupt,
    ) -> Result<(), FsError> {
        // Guest input first: nothing reaches virtiofsd unless every queue
        // lies inside guest memory.
        let mut vrings = Vec::with_capacity(NUM_QUEUES);
        for index in 0..NUM_QUEUES as u16 {
            let q = queues
                .get(usize::from(index))
                .ok_or(FsError::QueueNotReady(index))?;
            vrings.push(vring_setup(mem, q, index)?);
        }
        super::backend::memory_table(mem)?;
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None if self.may_connect => self.open_connection()?,
            None => return Err(FsError::ConnectionLost(self.socket_path.clone())),
        };
        let r = conn.start(
            mem,
            acked_features,
            &vrings,
            interrupt.eventfd(),
            &self.queue_evts,
        );
        self.conn = Some(conn);
        r
    }

    /// Stops the vrings for a snapshot, records in the active queues the
    /// positions virtiofsd reached, and starts them again from there;
    /// refuses (after the restart) when a request is in flight.
    fn stop_for_snapshot(&mut self) -> Result<(), FsError> {
        let Some(mut a) = self.active.take() else {
            return Ok(());
        };
        let r = self.stop_and_restart(&mut a);
        self.active = Some(a);
        r
    }

    fn stop_and_restart(&mut self, a: &mut Active) -> Result<(), FsError> {
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| FsError::ConnectionLost(self.socket_path.clone()))?;
        let bases = conn.stop_vrings(NUM_QUEUES)?;
        let mut in_flight = None;
        for (index, (q, base)) in a.queues.iter_mut().zip(&bases).enumerate() {
            // Every request virtiofsd took is answered when the used index
            // has caught up with where it stopped reading.
            let used: u16 = a
                .mem
                .read_obj(GuestAddress(q.used_ring()).unchecked_add(2))
                .map_err(|_| FsError::QueueAddress {
                    index: index as u16,
                    ring: "used ring",
                    addr: q.used_ring(),
                    len: 4,
                })?;
            let used = u16::from_le(used);
            if used != *base && in_flight.is_none() {
                in_flight = Some((index as u16, *base, used));
            }
            q.set_next_avail(*base);
            q.set_next_used(used);
        }
        // The snapshot is taken from the stopped rings; the VM goes on
        // from the same place when it resumes.
        self.start_vrings(&a.mem, &a.queues, a.acked_features, &a.interrupt)?;
        match in_flight {
            Some((index, available, used)) => Err(FsError::InFlight {
                tag: self.tag.clone(),
                index,
                available,
                used,
            }),
            None => Ok(()),
        }
    }

    fn try_activate(&mut self, ctx: &ActivateContext) -> Result<(), FsError> {
        if self.queue_evts.len() != NUM_QUEUES {
            return Err(FsError::QueueEvents {
                got: self.queue_evts.len(),
                need: NUM_QUEUES,
            });
        }
        self.start_vrings(&ctx.mem, &ctx.queues, ctx.acked_features, &ctx.interrupt)
    }
}

/// Validates queue `index` as the driver configured it and translates its
/// rings to the VMM's addresses. Each ring must lie, whole and aligned, in
/// one guest memory region.
pub fn vring_setup(mem: &GuestMemoryMmap, q: &Queue, index: u16) -> Result<VringSetup, FsError> {
    if !q.ready() {
        return Err(FsError::QueueNotReady(index));
    }
    let size = q.size();
    if size == 0 || !size.is_power_of_two() || size > q.max_size() {
        return Err(FsError::QueueSize {
            index,
            size,
            max: q.max_size(),
        });
    }
    let n = u64::from(size);
    let rings = [
        ("descriptor table", q.desc_table(), 16 * n, 16u64),
        ("available ring", q.avail_ring(), 6 + 2 * n, 2),
        ("used ring", q.used_ring(), 6 + 8 * n, 4),
    ];
    let mut hva = [0u64; 3];
    for (slot, (ring, addr, len, align)) in hva.iter_mut().zip(rings) {
        let bad = FsError::QueueAddress {
            index,
            ring,
            addr,
            len,
        };
        if addr % align != 0 {
            return Err(bad);
        }
        let len_usize = usize::try_from(len).map_err(|_| FsError::QueueSize {
            index,
            size,
            max: q.max_size(),
        })?;
        // get_slice checks the whole range inside one region (no overflow).
        let slice = mem.get_slice(GuestAddress(addr), len_usize);
        if slice.is_err() {
            return Err(bad);
        }
        *slot = mem.get_host_address(GuestAddress(addr)).map_err(|_| bad)? as u64;
    }
    Ok(VringSetup {
        index,
        size,
        max_size: q.max_size(),
        desc_hva: hva[0],
        avail_hva: hva[1],
        used_hva: hva[2],
        next_avail: q.next_avail(),
    })
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        device_type::FS
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn avail_features(&self) -> u64 {
        AVAIL_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        match self.try_activate(&ctx) {
            Ok(()) => {
                // virtiofsd signals the irqfd directly; the driver must see
                // VRING in InterruptStatus on every such interrupt.
                ctx.interrupt.set_vring_always(true);
                self.active = Some(Active {
                    interrupt: ctx.interrupt,
                    mem: ctx.mem,
                    queues: ctx.queues,
                    acked_features: ctx.acked_features,
                });
                self.metrics.activations.fetch_add(1, Ordering::Relaxed);
                tracing::info!(device = "fs", tag = %self.tag, "vrings handed to virtiofsd");
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .activation_failures
                    .fetch_add(1, Ordering::Relaxed);
                // A protocol error leaves the session in an unknown state.
                if matches!(
                    e,
                    FsError::VhostUser { .. } | FsError::UnsupportedFeatures { .. }
                ) {
                    self.drop_connection();
                }
                tracing::error!(
                    device = "fs",
                    tag = %self.tag,
                    socket = %self.socket_path.display(),
                    error = %chain(&e),
                    "virtio-fs activation failed"
                );
                Err(VirtioError::Activate(chain(&e)))
            }
        }
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        let Some(active) = self.active.take() else {
            return;
        };
        active.interrupt.set_vring_always(false);
        if let Some(conn) = self.conn.as_mut() {
            if let Err(e) = conn.stop(NUM_QUEUES) {
                tracing::warn!(
                    device = "fs",
                    socket = %self.socket_path.display(),
                    error = %chain(&e),
                    "stopping the virtiofsd vrings failed; dropping the connection"
                );
                self.drop_connection();
            }
        }
    }

    fn process_queue(&mut self, _index: u16) -> Result<(), VirtioError> {
        // virtiofsd serves the queues; the VMM never sees their kicks.
        Ok(())
    }

    fn has_external_backend(&self) -> bool {
        true
    }

    fn set_queue_evts(&mut self, evts: Vec<EventFd>) {
        self.queue_evts = evts;
    }

    fn save_state(&mut self) -> Result<DeviceSnap, VirtioError> {
        match self.stop_for_snapshot() {
            Ok(()) => Ok(DeviceSnap::of_queues(
                self.active.as_ref().map(|a| &a.queues),
            )),
            Err(e) => {
                tracing::warn!(device = "fs", tag = %self.tag, error = %chain(&e), "virtio-fs not saved");
                Err(DeviceStateError::Backend(chain(&e)).into())
            }
        }
    }

    /// Holds the saved queues; virtiofsd gets them when the VM first
    /// runs, so nothing it does reaches the guest before then.
    fn restore_state(
        &mut self,
        snap: &DeviceSnap,
        ctx: Option<ActivateContext>,
    ) -> Result<(), VirtioError> {
        self.restored = restored_context(snap, ctx)?.map(|ctx| Active {
            interrupt: ctx.interrupt,
            mem: ctx.mem,
            queues: ctx.queues,
            acked_features: ctx.acked_features,
        });
        Ok(())
    }

    fn wake_after_restore(&mut self) -> Result<(), VirtioError> {
        let Some(r) = self.restored.take() else {
            return Ok(());
        };
        self.start_vrings(&r.mem, &r.queues, r.acked_features, &r.interrupt)
            .map_err(|e| {
                tracing::error!(device = "fs", tag = %self.tag, error = %chain(&e), "restored virtio-fs not started");
                VirtioError::from(DeviceStateError::Backend(chain(&e)))
            })?;
        r.interrupt.set_vring_always(true);
        tracing::info!(device = "fs", tag = %self.tag, "restored vrings handed to virtiofsd");
        self.active = Some(r);
        Ok(())
    }
}
