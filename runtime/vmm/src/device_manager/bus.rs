//! The PIO and MMIO buses: address ranges → devices.
//!
//! A bus is built once before the vCPUs start and is then read-only, so
//! every vCPU thread shares it through an `Arc<Bus>`; each device sits behind
//! its own `Mutex`, so vCPUs touching different devices do not contend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable by guest port I/O or MMIO.
pub trait BusDevice: Send {
    /// Guest read of `data.len()` bytes at `offset` into the device's range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest write of `data` at `offset` into the device's range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Bus errors.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("Bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("Bus range {base:#x}+{len:#x} overlaps a device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

type Shared = Arc<Mutex<dyn BusDevice>>;

/// An address space of devices.
#[derive(Default)]
pub struct Bus {
    // base -> (len, device)
    devices: BTreeMap<u64, (u64, Shared)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `base..base+len`.
    pub fn insert(&mut self, device: Shared, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some((&other, _)) = self
            .devices
            .range(..end)
            .next_back()
            .filter(|(b, (l, _))| **b + *l > base)
        {
            return Err(BusError::Overlap { base, len, other });
        }
        self.devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(u64, &Shared)> {
        let (base, (len, dev)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let end = offset.checked_add(size as u64)?;
        (end <= *len).then_some((offset, dev))
    }

    /// Dispatches a read; false if no device covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .expect("bus device lock poisoned")
                    .read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a write; false if no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((offset, dev)) => {
                dev.lock()
                    .expect("bus device lock poisoned")
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_and_overlap() {
        let mut bus = Bus::new();
        let dev = Arc::new(Mutex::new(Echo(Vec::new())));
        bus.insert(dev.clone(), 0x100, 0x10).expect("insert");
        assert!(matches!(
            bus.insert(dev.clone(), 0x108, 0x10),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 0xf8, 0x10),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), 5, 0),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(dev.clone(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(dev.clone(), 0x110, 0x10).expect("adjacent");
        let mut b = [0u8; 2];
        assert!(bus.read(0x104, &mut b));
        assert_eq!(b, [4, 4]);
        assert!(!bus.read(0x0ff, &mut b));
        // An access straddling the end of a device's range is refused.
        let mut b4 = [0u8; 4];
        assert!(!bus.read(0x11e, &mut b4));
        assert!(bus.write(0x10f, &[9]));
        assert_eq!(dev.lock().expect("lock").0, vec![(0xf, vec![9])]);
    }
}
