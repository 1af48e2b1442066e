//! The virtio-vsock device: three queues (RX, TX, event), an 8-byte config
//! space holding the guest CID, and the muxer as backend.
//!
//! - TX: each chain is parsed ([`parse_tx`]) and handed to the muxer, then
//!   returned with length 0. A malformed chain fails alone.
//! - RX: while the muxer owes the guest packets, RX chains are filled;
//!   when it has nothing, the chain is left in the queue.
//! - Event queue: never used (no live migration), buffers stay there.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::metrics::VsockMetrics;
use super::muxer::Muxer;
use super::queues::{drain_tx, fill_rx, kick, VsockQueues};
use super::{VsockError, EVQ, MAX_GUEST_CID, MIN_GUEST_CID, QUEUE_SIZE, RXQ, TXQ};
use crate::devices::virtio::{
    device_type, read_config_bytes, ready_queues, ActivateContext, Interrupt, VirtioDevice,
    VirtioError, VIRTIO_F_VERSION_1,
};

struct Active {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    /// Kept so the driver's buffers stay owned by the device.
    _evq: Option<Queue>,
    interrupt: Arc<Interrupt>,
}

impl VsockQueues for Active {
    fn rx(&mut self, muxer: &mut Muxer, metrics: &VsockMetrics) -> Result<bool, VirtioError> {
        let used = fill_rx(muxer, metrics, &mut self.rxq, &self.mem).map_err(VirtioError::Queue)?;
        if used {
            self.interrupt.notify_used(&mut self.rxq, &self.mem)?;
        }
        Ok(used)
    }

    fn tx(&mut self, muxer: &mut Muxer, metrics: &VsockMetrics) -> Result<bool, VirtioError> {
        let used =
            drain_tx(muxer, metrics, &mut self.txq, &self.mem).map_err(VirtioError::Queue)?;
        if used {
            self.interrupt.notify_used(&mut self.txq, &self.mem)?;
        }
        Ok(used)
    }
}

/// The virtio-vsock device.
pub struct Vsock {
    cid: u64,
    muxer: Muxer,
    active: Option<Active>,
    /// Per-device counters.
    pub metrics: Arc<VsockMetrics>,
}

impl Vsock {
    /// A device for guest `cid` listening on `uds_path`.
    pub fn new(cid: u64, uds_path: &Path) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&cid) {
            return Err(VsockError::BadCid(cid));
        }
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = Muxer::new(cid, uds_path, metrics.clone())?;
        Ok(Vsock {
            cid,
            muxer,
            active: None,
            metrics,
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// The fd the event loop watches for host-side activity.
    pub fn backend_fd(&self) -> RawFd {
        self.muxer.epoll_fd()
    }

    /// The host-side backend.
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// The backend, mutable (tests drive its timer).
    #[cfg(any(test, fuzzing))]
    pub fn muxer_mut(&mut self) -> &mut Muxer {
        &mut self.muxer
    }

    /// Connects now to the listeners of the host ports the guest may
    /// connect to ([`Muxer::preconnect`]): before the jail, which leaves the
    /// VMM no `socket` or `connect`.
    pub fn preconnect(&mut self, ports: &[u32]) -> Result<(), VsockError> {
        self.muxer.preconnect(ports)
    }

    /// RX, then TX, until neither moves.
    pub fn kick(&mut self) -> Result<(), VirtioError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        kick(a, &mut self.muxer, &self.metrics)
    }

    /// Host-side activity (the muxer's epoll fd is readable): handle it,
    /// then move packets. A queue failure asks the driver for a reset.
    pub fn process_backend(&mut self) {
        self.muxer.process_events();
        let Some(irq) = self.active.as_ref().map(|a| a.interrupt.clone()) else {
            return;
        };
        if irq.needs_reset() {
            return;
        }
        if let Err(e) = self.kick() {
            tracing::warn!(device = "vsock", error = %e, "virtio device failed; the driver must reset it");
            let _ = irq.signal_needs_reset();
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        device_type::VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn avail_features(&self) -> u64 {
        // Stream sockets only (no VIRTIO_VSOCK_F_SEQPACKET).
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.cid.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        let mut ready = ready_queues(ctx.queues);
        let rxq = ready(RXQ)?;
        let txq = ready(TXQ)?;
        let evq = ready(EVQ).ok();
        self.active = Some(Active {
            mem: ctx.mem,
            rxq,
            txq,
            _evq: evq,
            interrupt: ctx.interrupt,
        });
        // Anything queued before the driver came up (host CONNECTs) goes now.
        self.kick()
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
    }

    fn process_queue(&mut self, index: u16) -> Result<(), VirtioError> {
        match index {
            RXQ | TXQ => self.kick(),
            EVQ => Ok(()),
            _ => Err(VirtioError::BadQueueIndex(index)),
        }
    }
}
