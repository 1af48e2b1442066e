//! The Intel MultiProcessor table (spec 1.4), so an SMP guest finds its
//! CPUs, the IOAPIC and the ISA interrupt routing without ACPI.
//!
//! Written at the EBDA: the 16-byte floating pointer, then the config table.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START, LOW_RAM_END};

/// IOAPIC pins (and the ISA/GSI IRQs routed 1:1 to them).
pub const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ISA: u8 = 0;
const CONFIG_HEADER_LEN: usize = 44;

/// MP table errors.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    #[error("{0} vCPUs do not fit in an MP table (limit 254)")]
    TooManyCpus(u8),
    #[error("MP table of {0} bytes does not fit in the EBDA")]
    TooLarge(usize),
    #[error("Failed to write the MP table to guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// `(ISA IRQ, IOAPIC pin)` for every I/O interrupt entry.
///
/// KVM's default GSI routing (`kvm_setup_default_irq_routing`) sends GSI 0,
/// the in-kernel PIT, to IOAPIC pin 2, and every other GSI to the pin of the
/// same number. The table must say the same: IRQ 0 → pin 2 as an ordinary
/// interrupt (the "IRQ0 override" PC firmware reports). IRQ 2 is the 8259
/// cascade and gets no entry, so pin 2 has one source.
///
/// Found booting Linux 6.1 in the nested test host: with pin 0 given as
/// ExtINT and no entry for IRQ 0, `setup_IO_APIC()` → `check_timer()`
/// dereferenced the missing irq_cfg of IRQ 0 (NULL pointer at 0x4) and the
/// guest panicked before any driver ran.
fn isa_irq_routes() -> impl Iterator<Item = (u8, u8)> {
    (0..IOAPIC_PINS)
        .filter(|&irq| irq != 2)
        .map(|irq| match irq {
            0 => (0, 2),
            irq => (irq, irq),
        })
}

/// Builds the MP table bytes for `nvcpus` to be placed at `base`.
pub fn build(nvcpus: u8, base: u64) -> Result<Vec<u8>, MptableError> {
    if nvcpus >= 0xfe {
        return Err(MptableError::TooManyCpus(nvcpus));
    }
    let ioapic_id = nvcpus + 1;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..nvcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(cpu);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for (irq, pin) in isa_irq_routes() {
        entries.extend_from_slice(&[
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ISA,
            irq,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let table_addr = base + 16;
    let table_len = CONFIG_HEADER_LEN + entries.len();
    let mut header = Vec::with_capacity(CONFIG_HEADER_LEN);
    header.extend_from_slice(b"PCMP");
    header.extend_from_slice(&(table_len as u16).to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"BOXLITE ");
    header.extend_from_slice(b"MICROVM     ");
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    header.extend_from_slice(&0u16.to_le_bytes());
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    header.extend_from_slice(&[0, 0, 0, 0]); // extended table length/checksum, reserved
    debug_assert_eq!(header.len(), CONFIG_HEADER_LEN);
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = Vec::with_capacity(16);
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&(table_addr as u32).to_le_bytes());
    fp.push(1); // length in 16-byte units
    fp.push(4);
    fp.push(0); // checksum
    fp.extend_from_slice(&[0u8; 5]);
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `nvcpus` at the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, nvcpus: u8) -> Result<(), MptableError> {
    let bytes = build(nvcpus, EBDA_START)?;
    if EBDA_START + bytes.len() as u64 > LOW_RAM_END {
        return Err(MptableError::TooLarge(bytes.len()));
    }
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        for n in [1u8, 2, 16] {
            let t = build(n, EBDA_START).expect("build");
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let cfg = &t[16..];
            assert_eq!(&cfg[0..4], b"PCMP");
            let len = u16::from_le_bytes([cfg[4], cfg[5]]) as usize;
            assert_eq!(len, cfg.len());
            assert_eq!(cfg.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let count = u16::from_le_bytes([cfg[34], cfg[35]]);
            // IRQ 2 (the cascade) has no I/O interrupt entry.
            assert_eq!(count, u16::from(n) + 1 + 1 + u16::from(IOAPIC_PINS) - 1 + 2);
            assert_eq!(
                len,
                44 + 20 * n as usize + 8 * (count as usize - n as usize)
            );
            assert!(EBDA_START + t.len() as u64 <= LOW_RAM_END);
            let ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
            assert_eq!(u64::from(ptr), EBDA_START + 16);
        }
        assert!(build(0xfe, EBDA_START).is_err());
    }

    #[test]
    fn irq0_goes_to_pin2_like_kvm_default_routing() {
        let routes: Vec<(u8, u8)> = isa_irq_routes().collect();
        assert_eq!(routes[0], (0, 2));
        assert!(!routes.iter().any(|&(irq, _)| irq == 2));
        assert_eq!(routes.iter().filter(|&&(_, pin)| pin == 2).count(), 1);
        assert!(routes[1..].iter().all(|&(irq, pin)| irq == pin));
        assert_eq!(routes.len(), usize::from(IOAPIC_PINS) - 1);
    }
}
