//! Guest-physical memory layout.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), then IDT (empty)
//! 0x0000_6000  PVH hvm_start_info, 0x6100 its memory map
//! 0x0000_7000  zero page (Linux boot_params)
//! 0x0000_8ff0  initial stack pointer
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four PDs (2 MiB pages, 4 GiB identity)
//! 0x0002_0000  kernel command line (2 KiB)
//! 0x0009_fc00  EBDA: MP table
//! 0x000a_0000  legacy hole up to 1 MiB (reported reserved)
//! 0x0010_0000  kernel (HIMEM_START), then the initramfs at the top of low RAM
//! 0xd000_0000  MMIO gap up to 4 GiB: virtio-mmio slots (4 KiB each), IOAPIC, LAPIC
//! 0x1_0000_0000  RAM above the gap, if any
//! ```

use crate::config::CpuMode;

/// GDT address.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of GDT entries we write.
pub const BOOT_GDT_MAX: usize = 4;
/// IDT address (an empty IDT: the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map (array of `hvm_memmap_table_entry`).
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP/RBP.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page-map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line including the NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; the MP table goes here.
pub const EBDA_START: u64 = 0x9fc00;
/// End of usable low memory (start of the VGA/BIOS hole).
pub const LOW_RAM_END: u64 = 0xa0000;
/// Where the kernel is loaded (1 MiB).
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SLOT_SIZE: u64 = 0x1000;
/// First IRQ (GSI) given to virtio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Serial port COM1.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// Size of the COM1 port range.
pub const SERIAL_PORT_SIZE: u16 = 8;
/// COM1's IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 controller ports 0x60..=0x64.
pub const I8042_PORT_BASE: u16 = 0x60;
/// Size of the i8042 port range.
pub const I8042_PORT_SIZE: u16 = 5;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's TSS (3 pages) just below the IOAPIC... placed at the end of the gap's low part.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity map page, right before the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// RAM mapped below the MMIO gap for a guest of `mem_bytes`.
pub fn ram_below_gap(mem_bytes: u64) -> u64 {
    mem_bytes.min(MMIO_GAP_START)
}

/// Lowest address a raw image may be loaded at in `mode`.
///
/// Real mode: 0x1000 (the VMM writes nothing below 64 KiB in real mode).
/// Long mode: 64 KiB, above the GDT, stack and page tables.
pub fn raw_image_min_addr(mode: CpuMode) -> u64 {
    match mode {
        CpuMode::Real => 0x1000,
        CpuMode::Long => 0x1_0000,
    }
}

/// The guest RAM ranges `(start, len)` for a guest of `mem_bytes`.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = ram_below_gap(mem_bytes);
    let mut ranges = vec![(0, low)];
    if mem_bytes > low {
        ranges.push((MMIO_GAP_END, mem_bytes - low));
    }
    ranges
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_ranges_split_around_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
    }
}
