//! 8250 UART on COM1 (vm-superio), writing the guest console to a log file.

use std::io::Write;

use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::device_manager::bus::BusDevice;

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing transmitted bytes to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (data, u8::try_from(offset)) {
            ([b], Ok(off)) => *b = self.serial.read(off),
            (data, _) => data.fill(0),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([value], Ok(off)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.serial.write(off, *value) {
                tracing::debug!(error = ?e, "serial write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("sink").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_log() {
        let sink = Sink::default();
        let evt = EventFd::new(0).expect("evt");
        let mut s = SerialDevice::new(EventFdTrigger(evt), Box::new(sink.clone()));
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        // Multi-byte or out-of-range accesses are ignored.
        s.write(0, b"xy");
        s.write(0x1_0000, b"z");
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "THR empty");
        assert_eq!(&*sink.0.lock().expect("sink"), b"hi\n");
    }
}
