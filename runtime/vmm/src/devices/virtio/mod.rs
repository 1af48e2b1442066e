//! Virtio devices and their MMIO transport.
//!
//! A device implements [`VirtioDevice`]; [`mmio::MmioTransport`] puts it on
//! the MMIO bus (vCPU threads) and [`event_handler::VirtioEventHandler`]
//! runs its queues on the VMM event loop thread. Each device has its own
//! folder (`rng/` today; `vsock/`, `blk/`, `net/`, `fs/` next) with
//! `mod.rs` (constants + error enum) and `device.rs` (pure queue logic).

pub mod balloon;
pub mod block;
pub mod event_handler;
pub mod fs;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod rng;
#[cfg(any(test, fuzzing))]
pub mod test_utils;
pub mod vsock;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Virtio device type ids (virtio 1.2 §5).
pub mod device_type {
    pub const NET: u32 = 1;
    pub const BLOCK: u32 = 2;
    pub const RNG: u32 = 4;
    pub const BALLOON: u32 = 5;
    pub const VSOCK: u32 = 19;
    pub const FS: u32 = 26;
}

/// VIRTIO_F_VERSION_1: every device we offer is a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits of virtio-mmio.
pub const INT_VRING: u32 = 1;
/// Configuration change (also used to announce DEVICE_NEEDS_RESET).
pub const INT_CONFIG: u32 = 2;

/// Errors of virtio devices and the transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("Queue {0} does not exist")]
    BadQueueIndex(u16),
    #[error("Queue error")]
    Queue(#[source] virtio_queue::Error),
    #[error("Guest memory access failed")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("Config space write of {len} bytes at offset {offset:#x} refused: the config space is read-only")]
    ReadOnlyConfig { offset: u64, len: usize },
    #[error("Device backend failed")]
    Backend(#[source] std::io::Error),
    #[error("Device activation failed: {0}")]
    Activate(String),
    #[error("Failed to signal the guest")]
    Interrupt(#[source] std::io::Error),
    #[error("Device state: {0}")]
    State(#[from] persist::DeviceStateError),
}

/// The interrupt line of one virtio-mmio device: the interrupt status the
/// driver reads and acknowledges, plus the irqfd that raises the GSI.
pub struct Interrupt {
    status: AtomicU32,
    needs_reset: AtomicBool,
    /// Set while an external backend (vhost-user) signals `evt` directly:
    /// InterruptStatus then always shows VRING.
    vring_always: AtomicBool,
    evt: EventFd,
}

impl Interrupt {
    /// An interrupt line signalling `evt` (registered as irqfd by the caller).
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            vring_always: AtomicBool::new(false),
            evt,
        }
    }

    /// The eventfd written on each interrupt.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    fn raise(&self, bit: u32) -> Result<(), VirtioError> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.evt.write(1).map_err(VirtioError::Interrupt)
    }

    /// Tells the driver that used buffers are available.
    pub fn signal_used_queue(&self) -> Result<(), VirtioError> {
        self.raise(INT_VRING)
    }

    /// After a device put buffers on `queue`'s used ring: signals the
    /// driver unless it suppressed notifications for that queue (event
    /// idx / NO_INTERRUPT). Call only when something was used.
    pub fn notify_used(&self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), VirtioError> {
        if queue.needs_notification(mem).map_err(VirtioError::Queue)? {
            self.signal_used_queue()?;
        }
        Ok(())
    }

    /// Tells the driver that the device's config space changed (a new
    /// balloon target).
    pub fn signal_config_change(&self) -> Result<(), VirtioError> {
        self.raise(INT_CONFIG)
    }

    /// Marks the device broken (DEVICE_NEEDS_RESET) and tells the driver.
    pub fn signal_needs_reset(&self) -> Result<(), VirtioError> {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.raise(INT_CONFIG)
    }

    /// Whether the device asked for a reset.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// InterruptStatus as the driver reads it.
    pub fn status(&self) -> u32 {
        let s = self.status.load(Ordering::SeqCst);
        if self.vring_always.load(Ordering::SeqCst) {
            s | INT_VRING
        } else {
            s
        }
    }

    /// For devices whose backend writes the irqfd itself (vhost-user): the
    /// VMM never sees those interrupts, so InterruptStatus reports VRING
    /// on every read while this is on (the driver then checks its used
    /// rings; a spurious check is harmless).
    pub fn set_vring_always(&self, on: bool) {
        self.vring_always.store(on, Ordering::SeqCst);
    }

    /// InterruptACK: clears `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: no pending interrupts, no reset request.
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
        self.vring_always.store(false, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The queues as the driver configured them (only ready ones are usable).
    pub queues: Vec<Queue>,
    /// The device's interrupt line.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// Features both sides agreed on.
    pub acked_features: u64,
}

/// Hands out the driver's queues (an [`ActivateContext`]'s `queues`) in
/// device order: each call takes the next one, and only if the driver
/// marked it ready (`index` names it in the error). A missing or unready
/// queue fails activation.
pub fn ready_queues(queues: Vec<Queue>) -> impl FnMut(u16) -> Result<Queue, VirtioError> {
    let mut queues = queues.into_iter();
    move |index| {
        queues
            .next()
            .filter(|q| q.ready())
            .ok_or_else(|| VirtioError::Activate(format!("queue {index} is not ready")))
    }
}

/// What an activated single-queue device (virtio-blk, virtio-rng) holds:
/// guest memory, its one queue, its interrupt line and the features the
/// driver acked.
pub struct SingleQueue {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// Queue 0.
    pub queue: Queue,
    /// The device's interrupt line.
    pub interrupt: std::sync::Arc<Interrupt>,
    /// Features both sides agreed on.
    pub acked_features: u64,
}

impl SingleQueue {
    /// Takes `ctx`'s queue 0, which the driver must have made ready.
    pub fn activate(ctx: ActivateContext) -> Result<Self, VirtioError> {
        let queue = ready_queues(ctx.queues)(0)?;
        Ok(SingleQueue {
            mem: ctx.mem,
            queue,
            interrupt: ctx.interrupt,
            acked_features: ctx.acked_features,
        })
    }
}

/// The lifecycle half of [`VirtioDevice`] for a single-queue device
/// (virtio-blk, virtio-rng), written once so the devices cannot drift
/// apart: `activate` keeps queue 0 as a [`SingleQueue`] in `self.active`
/// (an `Option<SingleQueue>`), `reset` drops it, and a notification of
/// queue 0 runs `self.process_requests()`, and a snapshot saves and
/// restores queue 0 with its positions. Expands to the six methods inside
/// the device's `impl VirtioDevice`.
macro_rules! single_queue_lifecycle {
    () => {
        fn activate(
            &mut self,
            ctx: $crate::devices::virtio::ActivateContext,
        ) -> Result<(), $crate::devices::virtio::VirtioError> {
            self.active = Some($crate::devices::virtio::SingleQueue::activate(ctx)?);
            Ok(())
        }

        fn is_activated(&self) -> bool {
            self.active.is_some()
        }

        fn reset(&mut self) {
            self.active = None;
        }

        fn process_queue(
            &mut self,
            index: u16,
        ) -> Result<(), $crate::devices::virtio::VirtioError> {
            $crate::devices::virtio::only_queue_0(index)?;
            self.process_requests().map(|_| ())
        }

        fn save_state(
            &mut self,
        ) -> Result<
            $crate::devices::virtio::persist::DeviceSnap,
            $crate::devices::virtio::VirtioError,
        > {
            Ok($crate::devices::virtio::persist::DeviceSnap::of_queues(
                self.active.as_ref().map(|a| std::slice::from_ref(&a.queue)),
            ))
        }

        fn restore_state(
            &mut self,
            snap: &$crate::devices::virtio::persist::DeviceSnap,
            ctx: Option<$crate::devices::virtio::ActivateContext>,
        ) -> Result<(), $crate::devices::virtio::VirtioError> {
            self.active = match $crate::devices::virtio::persist::restored_context(snap, ctx)? {
                Some(ctx) => Some($crate::devices::virtio::SingleQueue::activate(ctx)?),
                None => None,
            };
            Ok(())
        }
    };
}
pub(crate) use single_queue_lifecycle;

/// Answers a config space read from the bytes `config`: byte `i` of `data`
/// is `config[offset + i]`, and every byte past the end (or at an offset
/// that does not fit in memory) reads as 0, as [`VirtioDevice::read_config`]
/// promises.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = offset
            .checked_add(i as u64)
            .and_then(|o| usize::try_from(o).ok())
            .and_then(|o| config.get(o).copied())
            .unwrap_or(0);
    }
}

/// Checks the queue index of a notification for a single-queue device:
/// anything but 0 is [`VirtioError::BadQueueIndex`].
pub fn only_queue_0(index: u16) -> Result<(), VirtioError> {
    if index != 0 {
        return Err(VirtioError::BadQueueIndex(index));
    }
    Ok(())
}

/// A virtio device behind the MMIO transport.
///
/// Called from vCPU threads (config space, activation, reset) and from the
/// VMM event loop (queue processing); the transport keeps it behind a
/// `Mutex`. Nothing here may panic on guest input.
pub trait VirtioDevice: Send {
    /// Virtio device type id (see [`device_type`]).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (must include VERSION_1).
    fn avail_features(&self) -> u64;
    /// Reads device config space at `offset`; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space. Default: read-only, refused.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), VirtioError> {
        Err(VirtioError::ReadOnlyConfig {
            offset,
            len: data.len(),
        })
    }
    /// Starts the device with the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError>;
    /// Whether the device is activated.
    fn is_activated(&self) -> bool;
    /// Returns the device to its pre-activation state (drops queues).
    fn reset(&mut self);
    /// Handles a notification for queue `index` (called on the event loop).
    /// An error fails the device: the transport reports DEVICE_NEEDS_RESET.
    fn process_queue(&mut self, index: u16) -> Result<(), VirtioError>;
    /// Whether an external backend (vhost-user) serves the queues. The
    /// device manager then hands the transport's queue eventfds to the
    /// device ([`VirtioDevice::set_queue_evts`]) and does not watch them
    /// on the VMM event loop, so the backend gets every kick.
    fn has_external_backend(&self) -> bool {
        false
    }
    /// Receives the transport's queue eventfds (KVM ioeventfds), one per
    /// queue; called only if [`VirtioDevice::has_external_backend`].
    fn set_queue_evts(&mut self, _evts: Vec<EventFd>) {}
    /// The device's own state for a snapshot (the VM is paused, so no
    /// queue the VMM serves moves meanwhile; a device whose backend serves
    /// its queues stops them first, hence `&mut`). Default: this device
    /// cannot be snapshotted yet, which fails the snapshot with that
    /// reason.
    fn save_state(&mut self) -> Result<persist::DeviceSnap, VirtioError> {
        Err(persist::DeviceStateError::Unsupported.into())
    }
    /// Puts a saved state into a fresh device whose transport has just
    /// been restored: `ctx` is what the transport would pass at
    /// DRIVER_OK, `None` if its driver had not got there
    /// ([`persist::restored_context`] checks the two agree).
    fn restore_state(
        &mut self,
        _snap: &persist::DeviceSnap,
        _ctx: Option<ActivateContext>,
    ) -> Result<(), VirtioError> {
        Err(persist::DeviceStateError::Unsupported.into())
    }
    /// Runs once, on a started device of a VM restored from a snapshot,
    /// just before the guest runs again: what the device must tell a
    /// guest that was frozen and moved (vsock: its connections are gone).
    /// Default: nothing.
    fn wake_after_restore(&mut self) -> Result<(), VirtioError> {
        Ok(())
    }
}
