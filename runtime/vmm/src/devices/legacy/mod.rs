//! Legacy port-I/O devices: the 8250 serial console and the i8042 reset line.

pub mod i8042;
pub mod serial;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// A vm-superio interrupt trigger backed by an eventfd (an irqfd when the
/// in-kernel irqchip exists; otherwise nobody listens and it only counts).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
