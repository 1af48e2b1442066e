//! The virtio-vsock device: three queues (RX, TX, event), an 8-byte config
//! space holding the guest CID, and the muxer as backend.
//!
//! - TX: each chain is parsed ([`parse_tx`]) and handed to the muxer, then
//!   returned with length 0. A malformed chain fails alone.
//! - RX: while the muxer owes the guest packets, RX chains are filled;
//!   when it has nothing, the chain is left in the queue.
//! - Event queue: used once, by a VM restored from a snapshot: its first
//!   buffer carries a TRANSPORT_RESET event when the VM first runs, so the
//!   driver drops the connections the snapshot froze (their host ends did
//!   not come along) and re-reads the CID. RX is held until the driver
//!   has handled it (it re-posts the buffer), so no new host connection
//!   is reset along with the old ones. Otherwise buffers stay there.
//!
//! A snapshot saves the three queues with their ring positions; the
//! muxer's host connections cannot be saved, so a restored device starts
//! with an empty muxer and the reset above.

use std::os::fd::RawFd;
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::metrics::VsockMetrics;
use super::muxer::Muxer;
use super::queues::{drain_tx, fill_rx, kick, VsockQueues};
use super::{VsockError, EVQ, MAX_GUEST_CID, MIN_GUEST_CID, QUEUE_SIZE, RXQ, TXQ};
use crate::devices::virtio::persist::{restored_context, DeviceSnap};
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateContext, Interrupt, VirtioDevice, VirtioError,
    VIRTIO_F_VERSION_1,
};

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the event's `le32 id`.
const EVENT_TRANSPORT_RESET: u32 = 0;

struct Active {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    /// The event queue, ready or not (the driver may leave it unset).
    evq: Queue,
    interrupt: Arc<Interrupt>,
    /// A transport reset was sent and the driver has not handled it yet:
    /// nothing goes to the guest meanwhile. A connection the host opens
    /// then would otherwise reach the guest first and be reset with the
    /// stale ones (the driver handles RX and events in any order). The
    /// driver re-posts the event buffer once it has handled the event:
    /// RX goes when the event queue's available index has moved past
    /// this one, the index when the reset was sent (a notification alone
    /// proves nothing: the restore kicks every queue once).
    rx_held_until_avail_moves: Option<u16>,
}

impl Active {
    /// The driver's three queues from `ctx`; RX and TX must be ready.
    fn new(ctx: ActivateContext) -> Result<Self, VirtioError> {
        let [rxq, txq, evq]: [Queue; 3] = ctx.queues.try_into().map_err(|q: Vec<Queue>| {
            VirtioError::Activate(format!("{} queues; vsock has 3", q.len()))
        })?;
        for (index, q) in [(RXQ, &rxq), (TXQ, &txq)] {
            if !q.ready() {
                return Err(VirtioError::Activate(format!("queue {index} is not ready")));
            }
        }
        Ok(Active {
            mem: ctx.mem,
            rxq,
            txq,
            evq,
            interrupt: ctx.interrupt,
            rx_held_until_avail_moves: None,
        })
    }

    /// Whether a transport reset is held for and the driver has handled it
    /// (re-posted an event buffer).
    fn reset_handled(&self) -> Result<bool, VirtioError> {
        let Some(at_reset) = self.rx_held_until_avail_moves else {
            return Ok(false);
        };
        let now = self
            .evq
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .map_err(VirtioError::Queue)?
            .0;
        Ok(now != at_reset)
    }

    /// Puts a TRANSPORT_RESET event in the event queue's next buffer and
    /// tells the driver. False when there was no buffer to put it in.
    fn send_transport_reset(&mut self) -> Result<bool, VirtioError> {
        if !self.evq.ready() {
            return Ok(false);
        }
        let Some(chain) = self.evq.iter(&self.mem).map_err(VirtioError::Queue)?.next() else {
            return Ok(false);
        };
        let head = chain.head_index();
        let avail = self
            .evq
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .map_err(VirtioError::Queue)?
            .0;
        // The buffer is the driver's: any write-only descriptor that holds
        // the event will do; a chain without one is returned empty.
        let mut written = 0;
        if let Some(d) = chain
            .into_iter()
            .find(|d| d.is_write_only() && d.len() >= 4)
        {
            self.mem
                .write_obj(EVENT_TRANSPORT_RESET.to_le(), d.addr())
                .map_err(VirtioError::GuestMemory)?;
            written = 4;
        }
        self.evq
            .add_used(&self.mem, head, written)
            .map_err(VirtioError::Queue)?;
        self.rx_held_until_avail_moves = (written == 4).then_some(avail);
        self.interrupt.notify_used(&mut self.evq, &self.mem)?;
        Ok(written == 4)
    }
}

impl VsockQueues for Active {
    fn rx(&mut self, muxer: &mut Muxer, metrics: &VsockMetrics) -> Result<bool, VirtioError> {
        if self.rx_held_until_avail_moves.is_some() {
            return Ok(false);
        }
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
        self.active = Some(Active::new(ctx)?);
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
            // The driver re-posted an event buffer: a reset it was sent
            // is handled, and what the host has for it may go.
            EVQ => match self.active.as_mut() {
                Some(a) if a.reset_handled()? => {
                    a.rx_held_until_avail_moves = None;
                    self.kick()
                }
                _ => Ok(()),
            },
            _ => Err(VirtioError::BadQueueIndex(index)),
        }
    }

    fn save_state(&mut self) -> Result<DeviceSnap, VirtioError> {
        Ok(DeviceSnap::of_queues(
            self.active.as_ref().map(|a| [&a.rxq, &a.txq, &a.evq]),
        ))
    }

    fn restore_state(
        &mut self,
        snap: &DeviceSnap,
        ctx: Option<ActivateContext>,
    ) -> Result<(), VirtioError> {
        // No kick: the muxer is new and empty, and the guest must not see
        // anything before its first run (`wake_after_restore`).
        self.active = restored_context(snap, ctx)?.map(Active::new).transpose()?;
        Ok(())
    }

    fn wake_after_restore(&mut self) -> Result<(), VirtioError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        if a.send_transport_reset()? {
            tracing::info!(
                device = "vsock",
                "transport reset sent to the restored guest"
            );
        } else {
            // Its stale sockets then get a reset from the muxer on their
            // next packet instead, which is slower but as final.
            tracing::warn!(
                device = "vsock",
                "the restored guest's event queue has no buffer: no transport reset sent"
            );
        }
        Ok(())
    }
}
