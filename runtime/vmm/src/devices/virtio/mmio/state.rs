//! A virtio-mmio transport's state for snapshots (docs/snapshot-design.md
//! §5.3): what the driver negotiated and programmed — status, features,
//! register selectors, each queue's size, readiness and ring addresses —
//! and the interrupt line's pending bits.
//!
//! The transport's queues are its configuration copies; the positions a
//! device has reached in its rings live in the device's own copies and are
//! saved with the device. Restoring a transport does not activate its
//! device: that happens when the device's state is restored with its queues.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::MmioTransport;
use crate::devices::virtio::persist::DeviceSnap;
use crate::devices::virtio::{status, VirtioError};

/// A queue as the transport holds it (a serde mirror of virtio-queue's
/// `QueueState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSnap {
    pub max_size: u16,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnap {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnap> for QueueState {
    fn from(q: &QueueSnap) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// The interrupt line's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterruptSnap {
    pub status: u32,
    pub needs_reset: bool,
    pub vring_always: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportSnap {
    pub device_type: u32,
    pub avail_features: u64,
    pub features_select: u32,
    pub acked_features: u64,
    pub acked_features_select: u32,
    pub unknown_features_acked: bool,
    pub queue_select: u32,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt: InterruptSnap,
    pub queues: Vec<QueueSnap>,
}

/// Why a saved transport does not fit this one. The caller adds which
/// device slot it is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportRestoreError {
    #[error("the snapshot's device is virtio type {saved}, this one type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("the snapshot's device offered features {saved:#x}, this one offers {here:#x}")]
    Features { saved: u64, here: u64 },
    #[error("the snapshot's device has {saved} queues, this one {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("queue {index}: the snapshot's holds at most {saved} entries, this device's {here}")]
    QueueMaxSize { index: usize, saved: u16, here: u16 },
    #[error("queue {index}: the saved state is invalid: {what}")]
    Queue { index: usize, what: String },
}

impl MmioTransport {
    /// The transport's state; the VM is paused, so no vCPU is in here.
    pub fn save_state(&self) -> TransportSnap {
        use std::sync::atomic::Ordering::SeqCst;
        TransportSnap {
            device_type: self.device_type,
            avail_features: self.avail_features,
            features_select: self.features_select,
            acked_features: self.acked_features,
            acked_features_select: self.acked_features_select,
            unknown_features_acked: self.unknown_features_acked,
            queue_select: self.queue_select,
            status: self.status,
            config_generation: self.config_generation,
            interrupt: InterruptSnap {
                status: self.interrupt.status.load(SeqCst),
                needs_reset: self.interrupt.needs_reset.load(SeqCst),
                vring_always: self.interrupt.vring_always.load(SeqCst),
            },
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
        }
    }

    /// Puts a saved state into this transport, made for the same device
    /// (type, features, queues) as the saved one; everything is checked
    /// before anything changes.
    pub fn restore_state(&mut self, snap: &TransportSnap) -> Result<(), TransportRestoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        if snap.device_type != self.device_type {
            return Err(TransportRestoreError::DeviceType {
                saved: snap.device_type,
                here: self.device_type,
            });
        }
        if snap.avail_features != self.avail_features {
            return Err(TransportRestoreError::Features {
                saved: snap.avail_features,
                here: self.avail_features,
            });
        }
        if snap.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::QueueCount {
                saved: snap.queues.len(),
                here: self.queues.len(),
            });
        }
        let mut queues = Vec::with_capacity(snap.queues.len());
        for (index, (saved, here)) in snap.queues.iter().zip(&self.queues).enumerate() {
            if saved.max_size != here.max_size() {
                return Err(TransportRestoreError::QueueMaxSize {
                    index,
                    saved: saved.max_size,
                    here: here.max_size(),
                });
            }
            let queue = Queue::try_from(QueueState::from(saved)).map_err(|e| {
                TransportRestoreError::Queue {
                    index,
                    what: e.to_string(),
                }
            })?;
            queues.push(queue);
        }
        self.queues = queues;
        self.features_select = snap.features_select;
        self.acked_features = snap.acked_features;
        self.acked_features_select = snap.acked_features_select;
        self.unknown_features_acked = snap.unknown_features_acked;
        self.queue_select = snap.queue_select;
        self.status = snap.status;
        self.config_generation = snap.config_generation;
        self.interrupt.status.store(snap.interrupt.status, SeqCst);
        self.interrupt
            .needs_reset
            .store(snap.interrupt.needs_reset, SeqCst);
        self.interrupt
            .vring_always
            .store(snap.interrupt.vring_always, SeqCst);
        Ok(())
    }
}

impl MmioTransport {
    /// The device's own state (`persist`); the VM is paused.
    pub fn save_device_state(&self) -> Result<DeviceSnap, VirtioError> {
        self.device
            .lock()
            .expect("virtio device lock poisoned")
            .save_state()
    }

    /// Gives the device its saved state, after [`MmioTransport::restore_state`]:
    /// with the context DRIVER_OK would have built if the restored status
    /// has it, else none.
    pub fn restore_device_state(&mut self, snap: &DeviceSnap) -> Result<(), VirtioError> {
        let ctx = if self.has(status::DRIVER_OK) {
            Some(self.activate_context().map_err(VirtioError::Queue)?)
        } else {
            None
        };
        self.device
            .lock()
            .expect("virtio device lock poisoned")
            .restore_state(snap, ctx)
    }

    /// Readies a restored, running device for the guest's first
    /// instruction: lets the device tell the guest what it must
    /// ([`crate::devices::virtio::VirtioDevice::wake_after_restore`]),
    /// re-raises its interrupt if one was pending when it was
    /// saved (KVM injects irqfd interrupts asynchronously, so one raised
    /// just before the save may be missing from the saved interrupt
    /// controller; a spurious virtio-mmio interrupt only makes the driver
    /// look at its rings), and kicks each ready queue once (a notification
    /// still in its eventfd at the save is not saved; a kick finding an
    /// empty queue does nothing).
    pub fn wake_after_restore(&self) -> Result<(), VirtioError> {
        if !self.has(status::DRIVER_OK) {
            return Ok(());
        }
        self.device
            .lock()
            .expect("virtio device lock poisoned")
            .wake_after_restore()?;
        if self.interrupt.status() != 0 {
            self.interrupt
                .evt
                .write(1)
                .map_err(VirtioError::Interrupt)?;
        }
        for (queue, evt) in self.queues.iter().zip(&self.queue_evts) {
            if queue.ready() {
                evt.write(1).map_err(VirtioError::Backend)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::reg;
    use crate::devices::virtio::test_utils::{
        mmio_negotiate as negotiate, mmio_read as r, mmio_write as w, mock_transport as transport,
    };

    /// A transport the driver set up: features, queue 0 at our addresses,
    /// DRIVER_OK, an interrupt pending.
    fn driven() -> MmioTransport {
        let (mut t, dev) = transport();
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_NUM, 16);
        w(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        w(&mut t, reg::QUEUE_AVAIL_LOW, 0x2000);
        w(&mut t, reg::QUEUE_USED_LOW, 0x3000);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, 0xf);
        assert!(dev.lock().expect("device lock").activated);
        t.interrupt.signal_used_queue().expect("interrupt");
        t
    }

    /// Every register a driver can read, in order.
    fn registers(t: &mut MmioTransport) -> Vec<u32> {
        let mut out = Vec::new();
        for sel in 0..2 {
            w(t, reg::DEVICE_FEATURES_SEL, sel);
            out.push(r(t, reg::DEVICE_FEATURES));
        }
        out.push(r(t, reg::QUEUE_NUM_MAX));
        out.push(r(t, reg::QUEUE_READY));
        for off in [
            reg::DEVICE_ID,
            reg::INTERRUPT_STATUS,
            reg::STATUS,
            reg::CONFIG_GENERATION,
        ] {
            out.push(r(t, off));
        }
        out
    }

    #[test]
    fn a_restored_transport_reads_as_the_saved_one() {
        let mut a = driven();
        let snap = a.save_state();
        let json = serde_json::to_string(&snap).expect("to JSON");
        let snap: TransportSnap = serde_json::from_str(&json).expect("from JSON");
        let (mut b, dev_b) = transport();
        b.restore_state(&snap).expect("restore");
        assert_eq!(b.save_state(), snap);
        assert_eq!(registers(&mut b), registers(&mut a));
        assert_eq!(r(&mut b, reg::STATUS), 0xf);
        assert_eq!(r(&mut b, reg::INTERRUPT_STATUS), 1, "the pending interrupt");
        assert_eq!(b.queues[0].size(), 16);
        assert_eq!(b.queues[0].desc_table(), 0x1000);
        assert!(
            !dev_b.lock().expect("device lock").activated,
            "restoring the transport leaves the device to its own restore"
        );
        // Queue registers stay frozen after DRIVER_OK, as in the original.
        w(&mut b, reg::QUEUE_NUM, 8);
        assert_eq!(b.queues[0].size(), 16);
    }

    /// One way a saved transport differs from the device it is restored to.
    type EditSnap = fn(&mut TransportSnap);

    #[test]
    fn a_saved_transport_for_another_device_is_refused_untouched() {
        let saved = driven().save_state();
        let cases: [(EditSnap, &str); 5] = [
            (
                |s| s.device_type = 1,
                "the snapshot's device is virtio type 1, this one type 4",
            ),
            (
                |s| s.avail_features |= 1 << 5,
                "the snapshot's device offered features 0x100000020, this one offers 0x100000000",
            ),
            (
                |s| s.queues.push(s.queues[0].clone()),
                "the snapshot's device has 2 queues, this one 1",
            ),
            (
                |s| s.queues[0].max_size = 128,
                "queue 0: the snapshot's holds at most 128 entries, this device's 256",
            ),
            (
                |s| s.queues[0].size = 12,
                "queue 0: the saved state is invalid",
            ),
        ];
        for (edit, want) in cases {
            let mut snap = saved.clone();
            edit(&mut snap);
            let (mut t, _) = transport();
            let before = t.save_state();
            let err = t.restore_state(&snap).expect_err(want).to_string();
            assert!(err.starts_with(want), "{err}");
            assert_eq!(t.save_state(), before, "{want}: the transport changed");
        }
    }
}
