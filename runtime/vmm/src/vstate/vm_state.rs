//! The VM-wide KVM state of a VM with the in-kernel irqchip: the two PICs,
//! the IOAPIC, the PIT and kvmclock — the VM part of snapshot and restore
//! (docs/snapshot-design.md §5.1 step 5, §5.2 step 8).
//!
//! Restore runs after every vCPU's state is back (so the clock is set
//! against the vCPUs' settled TSC offsets) and before anything can inject
//! an interrupt: `KVM_SET_IRQCHIP` would overwrite it.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// A VM-wide KVM call failed.
#[derive(Debug, thiserror::Error)]
#[error("VM state: {call} failed")]
pub struct VmStateError {
    pub call: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn kvm(call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError { call, source }
}

fn chip(vm: &VmFd, chip_id: u32, call: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm(call))?;
    Ok(chip)
}

impl VmState {
    /// Reads the state of `vm`, whose vCPUs are all stopped. The clock is
    /// read last, closest to the vCPUs' TSC reads.
    pub fn save(vm: &VmFd) -> Result<Self, VmStateError> {
        let pit = vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?;
        let pic_master = chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?;
        let pic_slave = chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?;
        let ioapic = chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?;
        let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK refuses flags it does not take; TSC_STABLE is a
        // property of the saving host, not state to restore.
        clock.flags &= !KVM_CLOCK_TSC_STABLE;
        Ok(Self {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    /// Writes this state into `vm`, created with the in-kernel irqchip and
    /// PIT, after its vCPUs' state is restored.
    pub fn restore(&self, vm: &VmFd) -> Result<(), VmStateError> {
        vm.set_pit2(&self.pit).map_err(kvm("KVM_SET_PIT2"))?;
        for (chip, call) in [
            (&self.pic_master, "KVM_SET_IRQCHIP (PIC master)"),
            (&self.pic_slave, "KVM_SET_IRQCHIP (PIC slave)"),
            (&self.ioapic, "KVM_SET_IRQCHIP (IOAPIC)"),
        ] {
            vm.set_irqchip(chip).map_err(kvm(call))?;
        }
        vm.set_clock(&self.clock).map_err(kvm("KVM_SET_CLOCK"))
    }
}
