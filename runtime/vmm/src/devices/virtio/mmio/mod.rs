//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).
//!
//! Runs on vCPU threads: every guest access to the device's 4 KiB slot ends
//! here. Queue notifications go to per-queue eventfds (registered as KVM
//! ioeventfds when the host allows it, so most never reach this code);
//! interrupts go through [`Interrupt`]. [`state`]: the transport's state
//! for snapshots.

use std::sync::{Arc, Mutex};

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{status, ActivateContext, Interrupt, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};
use crate::device_manager::bus::BusDevice;

pub mod state;

/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// Modern (virtio 1.x) virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor id ("BXL\0").
pub const VENDOR_ID: u32 = 0x004c_5842;

/// Register offsets.
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Size of one device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// A virtio device on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_type: u32,
    avail_features: u64,
    features_select: u32,
    acked_features: u64,
    acked_features_select: u32,
    unknown_features_acked: bool,
    queue_select: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is its line (irqfd registered by the caller).
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
    ) -> Result<Self, VirtioError> {
        let (device_type, avail_features, sizes) = {
            let d = device.lock().expect("virtio device lock poisoned");
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes().to_vec(),
            )
        };
        let mut queues = Vec::with_capacity(sizes.len());
        let mut queue_evts = Vec::with_capacity(sizes.len());
        for size in sizes {
            queues.push(Queue::new(size).map_err(VirtioError::Queue)?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(VirtioError::Backend)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            device_type,
            avail_features: avail_features | VIRTIO_F_VERSION_1,
            features_select: 0,
            acked_features: 0,
            acked_features_select: 0,
            unknown_features_acked: false,
            queue_select: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// One eventfd per queue, signalled on QueueNotify.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device.
    pub fn device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        self.device.clone()
    }

    /// Current device status as the driver would read it.
    pub fn status(&self) -> u32 {
        if self.interrupt.needs_reset() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn has(&self, bits: u32) -> bool {
        self.status & bits == bits
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may change only between FEATURES_OK and DRIVER_OK.
    fn queue_config_allowed(&self) -> bool {
        self.has(status::FEATURES_OK) && !self.has(status::DRIVER_OK) && !self.has(status::FAILED)
    }

    fn reset(&mut self) {
        self.device
            .lock()
            .expect("virtio device lock poisoned")
            .reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.acked_features_select = 0;
        self.unknown_features_acked = false;
        self.features_select = 0;
        self.queue_select = 0;
        self.interrupt.reset();
    }

    fn set_status(&mut self, value: u32) {
        use status::*;
        if value == 0 {
            self.reset();
            return;
        }
        if value & FAILED != 0 {
            self.status |= FAILED;
            return;
        }
        // The driver may only add the next bit of the handshake, never clear bits.
        let old = self.status;
        let added = value & !old;
        if value & old != old {
            tracing::warn!(old, value, "virtio: driver cleared status bits; ignored");
            return;
        }
        let ok = match added {
            0 => true,
            ACKNOWLEDGE => old == 0,
            DRIVER => old == ACKNOWLEDGE,
            FEATURES_OK => {
                if old != ACKNOWLEDGE | DRIVER {
                    false
                } else if self.acked_features & !self.avail_features != 0
                    || self.acked_features & VIRTIO_F_VERSION_1 == 0
                    || self.unknown_features_acked
                {
                    // Leave FEATURES_OK clear: the driver reads it back and fails.
                    tracing::warn!(
                        acked = format_args!("{:#x}", self.acked_features),
                        offered = format_args!("{:#x}", self.avail_features),
                        "virtio: refused feature negotiation"
                    );
                    return;
                } else {
                    true
                }
            }
            DRIVER_OK => old == ACKNOWLEDGE | DRIVER | FEATURES_OK,
            _ => false,
        };
        if !ok {
            tracing::warn!(old, value, "virtio: invalid status transition; ignored");
            return;
        }
        self.status = value;
        if added == DRIVER_OK {
            self.activate();
        }
    }

    /// What the device gets at DRIVER_OK (and on restore): its own copies
    /// of the queues; ours stay for QueueReady reads and reset.
    fn activate_context(&self) -> Result<ActivateContext, virtio_queue::Error> {
        let queues = self
            .queues
            .iter()
            .map(|q| Queue::try_from(q.state()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        })
    }

    fn activate(&mut self) {
        let ctx = match self.activate_context() {
            Ok(ctx) => ctx,
            Err(e) => {
                tracing::warn!(error = %e, "virtio: queue state is invalid");
                let _ = self.interrupt.signal_needs_reset();
                return;
            }
        };
        let invalid = self
            .queues
            .iter()
            .enumerate()
            .find(|(_, q)| q.ready() && !q.is_valid(&self.mem))
            .map(|(i, _)| i);
        let result = match invalid {
            Some(i) => Err(VirtioError::Activate(format!(
                "queue {i} is ready but its size or addresses are invalid"
            ))),
            None => self
                .device
                .lock()
                .expect("virtio device lock poisoned")
                .activate(ctx),
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, device_type = self.device_type, "virtio: activation failed");
            let _ = self.interrupt.signal_needs_reset();
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.features_select {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status(),
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    offset,
                    "virtio-mmio: read of a write-only or unknown register"
                );
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.features_select = v,
            reg::DRIVER_FEATURES_SEL => self.acked_features_select = v,
            reg::DRIVER_FEATURES => {
                if self.status != (status::ACKNOWLEDGE | status::DRIVER) {
                    tracing::warn!(
                        status = self.status,
                        "virtio: feature write outside the DRIVER state; ignored"
                    );
                    return;
                }
                match self.acked_features_select {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(v),
                    1 => {
                        self.acked_features =
                            (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                    }
                    // Feature words we do not have: any set bit is a bad ack.
                    _ if v != 0 => self.unknown_features_acked = true,
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_select = v,
            reg::QUEUE_NOTIFY => match self.queue_evts.get(v as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        tracing::error!(error = %e, "virtio: failed to signal a queue");
                    }
                }
                None => {
                    tracing::debug!(queue = v, "virtio: notify for a queue that does not exist")
                }
            },
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.set_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH => {
                if !self.queue_config_allowed() {
                    tracing::warn!(
                        offset,
                        status = self.status,
                        "virtio: queue register write in the wrong state; ignored"
                    );
                    return;
                }
                let Some(q) = self.selected_queue() else {
                    tracing::debug!(
                        "virtio: queue register write with an invalid QueueSel; ignored"
                    );
                    return;
                };
                match offset {
                    reg::QUEUE_NUM => match u16::try_from(v) {
                        Ok(n) if n.is_power_of_two() && n <= q.max_size() => q.set_size(n),
                        _ => tracing::warn!(
                            size = v,
                            max = q.max_size(),
                            "virtio: invalid queue size; ignored"
                        ),
                    },
                    reg::QUEUE_READY => q.set_ready(v == 1),
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    reg::QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
                    reg::QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
                    reg::QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            _ => tracing::debug!(
                offset,
                "virtio-mmio: write to a read-only or unknown register; ignored"
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            self.device
                .lock()
                .expect("virtio device lock poisoned")
                .read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register read must be 4 bytes, aligned"
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            if !self.has(status::DRIVER) {
                tracing::warn!(offset, "virtio: config write before DRIVER; ignored");
                return;
            }
            let r = self
                .device
                .lock()
                .expect("virtio device lock poisoned")
                .write_config(offset - reg::CONFIG, data);
            if let Err(e) = r {
                tracing::warn!(error = %e, "virtio: config write refused");
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset % 4 == 0 => self.write_reg(offset, u32::from_le_bytes(bytes)),
            _ => tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio: register write must be 4 bytes, aligned"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        mmio_negotiate as negotiate, mmio_read as r, mmio_write as w, mock_transport as transport,
    };

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, reg::MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, reg::VERSION), 2);
        assert_eq!(r(&mut t, reg::DEVICE_ID), 4);
        assert_eq!(r(&mut t, reg::VENDOR_ID), VENDOR_ID);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 1);
        w(&mut t, reg::DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, reg::DEVICE_FEATURES), 0);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 256);
        w(&mut t, reg::QUEUE_SEL, 5);
        assert_eq!(r(&mut t, reg::QUEUE_NUM_MAX), 0);
        // Narrow register accesses read as 0 and do not panic.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(reg::MAGIC + 1, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn good_negotiation_activates() {
        let (mut t, dev) = transport();
        negotiate(&mut t);
        assert_eq!(r(&mut t, reg::STATUS), 0xb);
        let (desc, avail, used) = (0x1000u32, 0x2000u32, 0x3000u32);
        w(&mut t, reg::QUEUE_SEL, 0);
        w(&mut t, reg::QUEUE_NUM, 16);
        w(&mut t, reg::QUEUE_DESC_LOW, desc);
        w(&mut t, reg::QUEUE_AVAIL_LOW, avail);
        w(&mut t, reg::QUEUE_USED_LOW, used);
        w(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(r(&mut t, reg::QUEUE_READY), 1);
        w(&mut t, reg::STATUS, 0xf);
        assert_eq!(r(&mut t, reg::STATUS), 0xf);
        let d = dev.lock().expect("dev");
        assert!(d.activated);
        assert_eq!(d.acked, VIRTIO_F_VERSION_1);
        drop(d);
        // Queue registers are frozen after DRIVER_OK.
        w(&mut t, reg::QUEUE_NUM, 8);
        assert_eq!(t.queues[0].size(), 16);
        // Reset.
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        assert!(!dev.lock().expect("dev").activated);
        assert!(!t.queues[0].ready());
    }

    #[test]
    fn bad_negotiation_is_refused() {
        let (mut t, dev) = transport();
        // Features beyond the offer.
        w(&mut t, reg::STATUS, 1);
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 0);
        w(&mut t, reg::DRIVER_FEATURES, 1 << 5);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, 0xb);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Without VERSION_1.
        w(&mut t, reg::STATUS, 0);
        w(&mut t, reg::STATUS, 1);
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::STATUS, 0xb);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        // Skipping steps: DRIVER_OK straight away.
        w(&mut t, reg::STATUS, 0);
        w(&mut t, reg::STATUS, 1 | 4);
        assert_eq!(r(&mut t, reg::STATUS), 0);
        // Feature word past the known ones.
        w(&mut t, reg::STATUS, 1);
        w(&mut t, reg::STATUS, 3);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::DRIVER_FEATURES_SEL, 9);
        w(&mut t, reg::DRIVER_FEATURES, 1);
        w(&mut t, reg::STATUS, 0xb);
        assert_eq!(r(&mut t, reg::STATUS) & status::FEATURES_OK, 0);
        assert!(!dev.lock().expect("dev").activated);
    }

    #[test]
    fn invalid_queue_fails_activation_with_needs_reset() {
        let (mut t, dev) = transport();
        negotiate(&mut t);
        w(&mut t, reg::QUEUE_NUM, 3); // not a power of two: ignored
        assert_eq!(t.queues[0].size(), 256);
        w(&mut t, reg::QUEUE_DESC_LOW, 0xffff_f000); // outside guest memory
        w(&mut t, reg::QUEUE_DESC_HIGH, 0xffff);
        w(&mut t, reg::QUEUE_READY, 1);
        w(&mut t, reg::STATUS, 0xf);
        assert!(!dev.lock().expect("dev").activated);
        assert_ne!(r(&mut t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_ne!(
            r(&mut t, reg::INTERRUPT_STATUS) & crate::devices::virtio::INT_CONFIG,
            0
        );
        w(&mut t, reg::INTERRUPT_ACK, 0x3);
        assert_eq!(r(&mut t, reg::INTERRUPT_STATUS), 0);
        w(&mut t, reg::STATUS, 0);
        assert_eq!(r(&mut t, reg::STATUS), 0);
    }

    #[test]
    fn config_space_read_only_and_notify() {
        let (mut t, _) = transport();
        let mut b = [0u8; 4];
        t.read(reg::CONFIG, &mut b);
        assert_eq!(b, [0; 4]);
        negotiate(&mut t);
        // MockDevice's config is read-only: refused without a panic.
        t.write(reg::CONFIG, &[1, 2, 3, 4]);
        t.write(reg::CONFIG + 0xeff, &[1]);
        w(&mut t, reg::QUEUE_NOTIFY, 0);
        assert_eq!(t.queue_evts()[0].read().expect("notified"), 1);
        w(&mut t, reg::QUEUE_NOTIFY, 99); // no such queue: ignored
                                          // Writes to read-only registers are ignored.
        w(&mut t, reg::MAGIC, 0);
        assert_eq!(r(&mut t, reg::MAGIC), MMIO_MAGIC);
    }
}
