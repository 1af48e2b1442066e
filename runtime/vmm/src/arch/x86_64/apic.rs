//! Local APIC LINT0/LINT1 wiring (needs the in-kernel irqchip).

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LAPIC errors.
#[derive(Debug, thiserror::Error)]
pub enum ApicError {
    #[error("Failed to get the LAPIC state")]
    Get(#[source] kvm_ioctls::Error),
    #[error("Failed to set the LAPIC state")]
    Set(#[source] kvm_ioctls::Error),
}

fn get_reg(l: &kvm_lapic_state, off: usize) -> u32 {
    let b = &l.regs[off..off + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_reg(l: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, byte) in v.to_le_bytes().iter().enumerate() {
        l.regs[off + i] = *byte as _;
    }
}

fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a BIOS would.
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), ApicError> {
    let mut l = vcpu.get_lapic().map_err(ApicError::Get)?;
    let lvt0 = get_reg(&l, APIC_LVT0);
    set_reg(
        &mut l,
        APIC_LVT0,
        with_delivery_mode(lvt0, APIC_MODE_EXTINT),
    );
    let lvt1 = get_reg(&l, APIC_LVT1);
    set_reg(&mut l, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&l).map_err(ApicError::Set)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_modes() {
        let mut l = kvm_lapic_state::default();
        set_reg(&mut l, APIC_LVT0, 0x0001_0000);
        let v = with_delivery_mode(get_reg(&l, APIC_LVT0), APIC_MODE_EXTINT);
        assert_eq!(v, 0x0001_0700);
        assert_eq!(with_delivery_mode(0x700, APIC_MODE_NMI), 0x400);
    }
}
