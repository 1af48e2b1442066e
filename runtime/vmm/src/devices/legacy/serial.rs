//! 8250 UART on COM1 (vm-superio), writing the guest console to a log file.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use super::EventFdTrigger;
use crate::device_manager::bus::BusDevice;

/// COM1 as a bus device.
pub struct SerialDevice {
    serial: Serial<EventFdTrigger, NoEvents, Box<dyn Write + Send>>,
}

/// The UART's registers and unread input, for snapshots (a serde mirror
/// of vm-superio's `SerialState`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialSnap {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    /// A UART raising `irq` and writing transmitted bytes to `out`.
    pub fn new(irq: EventFdTrigger, out: Box<dyn Write + Send>) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    /// The UART's state; the VM is paused, so no vCPU is in here.
    pub fn save_state(&self) -> SerialSnap {
        let s = self.serial.state();
        SerialSnap {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in the saved state `snap`, raising `irq` and writing to `out`;
    /// an interrupt the saved state had pending is raised again. Refused
    /// when the saved input holds more than the UART's 64-byte FIFO.
    pub fn from_state(
        snap: &SerialSnap,
        irq: EventFdTrigger,
        out: Box<dyn Write + Send>,
    ) -> Result<Self, String> {
        let state = SerialState {
            baud_divisor_low: snap.baud_divisor_low,
            baud_divisor_high: snap.baud_divisor_high,
            interrupt_enable: snap.interrupt_enable,
            interrupt_identification: snap.interrupt_identification,
            line_control: snap.line_control,
            line_status: snap.line_status,
            modem_control: snap.modem_control,
            modem_status: snap.modem_status,
            scratch: snap.scratch,
            in_buffer: snap.in_buffer.clone(),
        };
        let serial = Serial::from_state(&state, irq, NoEvents, out).map_err(|e| {
            format!(
                "serial: the saved state cannot be restored ({} bytes of unread input): {e:?}",
                snap.in_buffer.len()
            )
        })?;
        Ok(SerialDevice { serial })
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

    /// Registers 0..8 as the guest reads them, DLAB clear.
    fn registers(s: &mut SerialDevice) -> Vec<u8> {
        (1..8)
            .map(|off| {
                let mut b = [0u8];
                s.read(off, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn a_restored_uart_reads_as_the_saved_one() {
        let evt = || EventFdTrigger(EventFd::new(0).expect("evt"));
        let mut a = SerialDevice::new(evt(), Box::new(Sink::default()));
        // A driver's setup: 8N1 at 115200 through the divisor latch,
        // THR-empty interrupts on, a scratch value.
        for (off, v) in [
            (3, 0x83),
            (0, 1),
            (1, 0),
            (3, 0x03),
            (1, 0x02),
            (4, 0x0b),
            (7, 0x5a),
        ] {
            a.write(off, &[v]);
        }
        let snap = a.save_state();
        let json = serde_json::to_string(&snap).expect("to JSON");
        let snap: SerialSnap = serde_json::from_str(&json).expect("from JSON");
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("evt");
        let trigger = EventFdTrigger(irq.try_clone().expect("evt"));
        let mut b =
            SerialDevice::from_state(&snap, trigger, Box::new(Sink::default())).expect("restore");
        assert_eq!(b.save_state(), a.save_state());
        assert_eq!(registers(&mut b), registers(&mut a));
        assert_eq!(
            irq.read()
                .expect("the pending THR-empty interrupt is raised again"),
            1
        );

        let mut full = snap.clone();
        full.in_buffer = vec![b'x'; 65];
        let err = SerialDevice::from_state(&full, evt(), Box::new(Sink::default()))
            .err()
            .expect("65 bytes of input do not fit the FIFO");
        assert!(
            err.starts_with("serial: the saved state cannot be restored (65 bytes"),
            "{err}"
        );
    }
}
