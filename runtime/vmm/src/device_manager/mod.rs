//! Device wiring: legacy devices on the PIO bus, virtio-mmio slots on the
//! MMIO bus (address, IRQ, ioeventfds, irqfd, kernel command line), and the
//! event-loop subscribers of the virtio devices.

pub mod bus;

use std::io::Write;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::layout::*;
use crate::devices::legacy::i8042::I8042;
use crate::devices::legacy::serial::{SerialDevice, SerialSnap};
use crate::devices::legacy::EventFdTrigger;
use crate::devices::virtio::event_handler::VirtioEventHandler;
use crate::devices::virtio::mmio::{reg, MmioTransport, MMIO_WINDOW_SIZE};
use crate::devices::virtio::{Interrupt, VirtioDevice, VirtioError};
use crate::snapshot::body::DeviceEntry;
use crate::vstate::vcpu::ExitSignal;
use crate::vstate::vm::Vm;
use bus::{Bus, BusError};

/// Device manager errors.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("Failed to create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error("Failed to register irqfd for IRQ {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    #[error("Bus setup failed")]
    Bus(#[from] BusError),
    #[error("Virtio transport setup failed")]
    Virtio(#[from] VirtioError),
    #[error("No virtio-mmio slot left (limit {0})")]
    NoSlot(usize),
    #[error("Failed to add the device to the kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// COM1's saved state does not fit a UART (the message names it).
    #[error("{0}")]
    SerialState(String),
    #[error("virtio device slot {slot} ({kind}): {source}")]
    DeviceState {
        slot: usize,
        kind: String,
        #[source]
        source: VirtioError,
    },
    #[error("virtio device slot {slot} ({kind}): {what}")]
    TransportState {
        slot: usize,
        kind: String,
        what: String,
    },
    #[error("the snapshot has {saved} virtio devices, this VM {here}")]
    DeviceCount { saved: usize, here: usize },
    #[error("virtio device slot {slot}: the snapshot's is a {saved} device, this VM's a {here}")]
    DeviceKind {
        slot: usize,
        saved: String,
        here: String,
    },
}

/// Where one virtio device ended up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioSlot {
    /// MMIO base address.
    pub addr: u64,
    /// GSI.
    pub irq: u32,
    /// Whether queue notifications are KVM ioeventfds (else MMIO exits).
    pub ioeventfd: bool,
}

/// Buses and device subscribers of one VM.
#[derive(Default)]
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Virtio slots in attach order.
    pub slots: Vec<VirtioSlot>,
    /// Event-loop subscribers, handed to the event manager.
    pub handlers: Vec<VirtioEventHandler>,
    /// COM1, for snapshots.
    serial: Option<Arc<Mutex<SerialDevice>>>,
    /// Each slot's kind (`rng`, `block`, ...) and transport, in slot
    /// order, for snapshots.
    transports: Vec<(String, Arc<Mutex<MmioTransport>>)>,
}

impl DeviceManager {
    /// An empty manager.
    pub fn new() -> Self {
        Self::default()
    }

    fn irq_evt(vm: &Vm, irq: u32) -> Result<EventFd, DeviceManagerError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
        if vm.has_irqchip() {
            vm.fd()
                .register_irqfd(&evt, irq)
                .map_err(|e| DeviceManagerError::Irqfd(irq, e))?;
        }
        Ok(evt)
    }

    /// COM1 (writing to `console`; in the `saved` state when restoring a
    /// snapshot) and the i8042 (ending the VM through `exit`).
    pub fn attach_legacy(
        &mut self,
        vm: &Vm,
        console: Box<dyn Write + Send>,
        exit: Arc<ExitSignal>,
        saved: Option<&SerialSnap>,
    ) -> Result<(), DeviceManagerError> {
        let serial_irq = EventFdTrigger(Self::irq_evt(vm, SERIAL_IRQ)?);
        let serial = match saved {
            Some(snap) => SerialDevice::from_state(snap, serial_irq, console)
                .map_err(DeviceManagerError::SerialState)?,
            None => SerialDevice::new(serial_irq, console),
        };
        let serial = Arc::new(Mutex::new(serial));
        self.serial = Some(serial.clone());
        self.pio.insert(
            serial,
            u64::from(SERIAL_PORT_BASE),
            u64::from(SERIAL_PORT_SIZE),
        )?;
        self.pio.insert(
            Arc::new(Mutex::new(I8042::new(exit))),
            u64::from(I8042_PORT_BASE),
            u64::from(I8042_PORT_SIZE),
        )?;
        Ok(())
    }

    /// Puts `device`, of `kind` (`rng`, `block`, ...: the config's name),
    /// in the next virtio-mmio slot and announces it on `cmdline`. Logs
    /// name it `<kind><slot>` (`rng0`), as the metrics do.
    pub fn attach_virtio(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        kind: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        cmdline: Option<&mut Cmdline>,
    ) -> Result<VirtioSlot, DeviceManagerError> {
        let index = self.slots.len();
        if index >= crate::config::MAX_VIRTIO_DEVICES {
            return Err(DeviceManagerError::NoSlot(
                crate::config::MAX_VIRTIO_DEVICES,
            ));
        }
        let name = format!("{kind}{index}");
        let name = name.as_str();
        let addr = VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SLOT_SIZE;
        let irq = VIRTIO_IRQ_BASE + index as u32;
        let interrupt = Arc::new(Interrupt::new(Self::irq_evt(vm, irq)?));
        let transport = MmioTransport::new(device.clone(), mem.clone(), interrupt.clone())?;

        let mut ioeventfd = true;
        for (i, evt) in transport.queue_evts().iter().enumerate() {
            let at = IoEventAddress::Mmio(addr + reg::QUEUE_NOTIFY);
            if let Err(e) = vm.fd().register_ioevent(evt, &at, i as u32) {
                tracing::warn!(device = name, error = %e, "KVM refused an ioeventfd; queue notifications use MMIO exits");
                ioeventfd = false;
            }
        }
        let evts = transport
            .queue_evts()
            .iter()
            .map(|e| e.try_clone().map_err(DeviceManagerError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        let mut dev = device.lock().expect("virtio device lock poisoned");
        if dev.has_external_backend() {
            // vhost-user: the backend polls the ioeventfds itself.
            dev.set_queue_evts(evts);
            drop(dev);
        } else {
            drop(dev);
            self.handlers.push(VirtioEventHandler::new(
                format!("{name}@{addr:#x}"),
                device,
                interrupt,
                evts,
            ));
        }
        let transport = Arc::new(Mutex::new(transport));
        self.transports.push((kind.to_owned(), transport.clone()));
        self.mmio.insert(transport, addr, MMIO_WINDOW_SIZE)?;
        if let Some(c) = cmdline {
            c.add_virtio_mmio_device(MMIO_WINDOW_SIZE, GuestAddress(addr), irq, None)
                .map_err(DeviceManagerError::Cmdline)?;
        }
        let slot = VirtioSlot {
            addr,
            irq,
            ioeventfd,
        };
        tracing::info!(
            device = name,
            addr = format_args!("{addr:#x}"),
            irq,
            ioeventfd,
            "virtio device attached"
        );
        self.slots.push(slot);
        Ok(slot)
    }

    /// COM1's state and every virtio device's, in slot order, for a
    /// snapshot of the paused VM. Per slot the device goes first, then
    /// its transport, so that whatever saving the device does to the
    /// interrupt status is in the transport's state.
    pub fn save_states(
        &self,
    ) -> Result<(Option<SerialSnap>, Vec<DeviceEntry>), DeviceManagerError> {
        let serial = self
            .serial
            .as_ref()
            .map(|s| s.lock().expect("serial lock poisoned").save_state());
        let mut entries = Vec::with_capacity(self.transports.len());
        for (slot, (kind, transport)) in self.transports.iter().enumerate() {
            let t = transport.lock().expect("virtio transport lock poisoned");
            let device =
                t.save_device_state()
                    .map_err(|source| DeviceManagerError::DeviceState {
                        slot,
                        kind: kind.clone(),
                        source,
                    })?;
            entries.push(DeviceEntry {
                slot: slot as u32,
                kind: kind.clone(),
                transport: t.save_state(),
                device,
            });
        }
        Ok((serial, entries))
    }

    /// Readies every restored device for its first run
    /// ([`MmioTransport::wake_after_restore`]); call once, after the
    /// interrupt controller's state is restored and before any vCPU runs.
    pub fn wake_after_restore(&self) -> Result<(), DeviceManagerError> {
        for (slot, (kind, transport)) in self.transports.iter().enumerate() {
            transport
                .lock()
                .expect("virtio transport lock poisoned")
                .wake_after_restore()
                .map_err(|source| DeviceManagerError::DeviceState {
                    slot,
                    kind: kind.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// Puts a snapshot's virtio device states into this VM's devices,
    /// attached as at boot (same kinds, same order) but not yet running:
    /// each transport, then its device.
    pub fn restore_virtio_states(&self, saved: &[DeviceEntry]) -> Result<(), DeviceManagerError> {
        if saved.len() != self.transports.len() {
            return Err(DeviceManagerError::DeviceCount {
                saved: saved.len(),
                here: self.transports.len(),
            });
        }
        for (slot, (entry, (kind, transport))) in saved.iter().zip(&self.transports).enumerate() {
            if &entry.kind != kind {
                return Err(DeviceManagerError::DeviceKind {
                    slot,
                    saved: entry.kind.clone(),
                    here: kind.clone(),
                });
            }
            let mut t = transport.lock().expect("virtio transport lock poisoned");
            t.restore_state(&entry.transport)
                .map_err(|e| DeviceManagerError::TransportState {
                    slot,
                    kind: kind.clone(),
                    what: e.to_string(),
                })?;
            t.restore_device_state(&entry.device).map_err(|source| {
                DeviceManagerError::DeviceState {
                    slot,
                    kind: kind.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }
}
