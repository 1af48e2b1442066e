//! i8042 keyboard controller, only for its CPU reset line: the guest writes
//! 0xfe to port 0x64 (Linux `reboot=k`) and the VM ends.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::device_manager::bus::BusDevice;
use crate::vstate::vcpu::{ExitReason, ExitSignal};

/// Records a guest reset on the VM's exit signal.
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        tracing::info!("guest requested a reset through the i8042");
        self.0.set(ExitReason::GuestReset);
        Ok(())
    }
}

/// The i8042 on ports 0x60..=0x64.
pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    /// An i8042 whose reset ends the VM through `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        I8042(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = u8::try_from(offset).map(|o| self.0.read(o)).unwrap_or(0);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], Ok(off)) = (data, u8::try_from(offset)) {
            // Infallible.
            let _ = self.0.write(off, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_ends_the_vm() {
        let exit = Arc::new(ExitSignal::new().expect("signal"));
        let mut dev = I8042::new(exit.clone());
        dev.write(4, &[0x01]);
        dev.write(0, &[0xfe]);
        assert_eq!(exit.get(), None);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.get(), Some(ExitReason::GuestReset));
    }
}
