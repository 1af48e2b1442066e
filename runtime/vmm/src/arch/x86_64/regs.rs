//! Registers, segments, GDT/IDT and identity page tables for the first instruction.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Errors while writing boot registers or tables.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("Failed to get special registers")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("Failed to set special registers")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("Failed to set general registers")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("Failed to set FPU state")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("Failed to write the GDT/IDT to guest memory")]
    WriteGdt(#[source] vm_memory::GuestMemoryError),
    #[error("Failed to write page tables to guest memory")]
    WritePageTables(#[source] vm_memory::GuestMemoryError),
}

/// How the vCPU starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux 64-bit boot protocol: long mode, RSI = zero page.
    Linux64 { entry: u64 },
    /// PVH: 32-bit protected mode without paging, RBX = hvm_start_info.
    Pvh { entry: u64 },
    /// Raw code in 16-bit real mode with CS = 0.
    RawReal { entry: u64 },
    /// Raw code in long mode with 4 GiB identity-mapped.
    RawLong { entry: u64 },
}

/// A GDT entry from flags, base and limit (the Intel SDM layout).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

fn entry_base(e: u64) -> u64 {
    ((e & 0xff00_0000_0000_0000) >> 32)
        | ((e & 0x0000_00ff_0000_0000) >> 16)
        | ((e & 0x0000_0000_ffff_0000) >> 16)
}

fn entry_limit(e: u64) -> u32 {
    let limit = ((e & 0x000f_0000_0000_0000) >> 32) as u32 | (e & 0xffff) as u32;
    if (e >> 55) & 1 == 1 {
        (limit << 12) | 0xfff
    } else {
        limit
    }
}

/// The KVM segment for GDT entry `e` at table index `index`.
pub fn kvm_segment_from_gdt(e: u64, index: u8) -> kvm_segment {
    let bit = |n: u32| ((e >> n) & 1) as u8;
    let present = bit(47);
    kvm_segment {
        base: entry_base(e),
        limit: entry_limit(e),
        selector: u16::from(index) * 8,
        type_: ((e >> 40) & 0xf) as u8,
        present,
        dpl: ((e >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Sets FPU control word and MXCSR to their power-on values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

/// Sets the general registers for `entry`.
pub fn setup_regs(vcpu: &VcpuFd, entry: BootEntry) -> Result<(), RegsError> {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        BootEntry::Linux64 { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootEntry::Pvh { entry } => {
            regs.rip = entry;
            regs.rbx = PVH_INFO_START;
        }
        BootEntry::RawReal { entry } => {
            regs.rip = entry;
            regs.rsp = 0xfff0;
        }
        BootEntry::RawLong { entry } => {
            regs.rip = entry;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
    }
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Sets segments, control registers and EFER for `entry`; writes the GDT,
/// IDT and (for long mode) page tables into guest memory.
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    vcpu: &VcpuFd,
    entry: BootEntry,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    match entry {
        BootEntry::RawReal { .. } => {
            for seg in [
                &mut sregs.cs,
                &mut sregs.ds,
                &mut sregs.es,
                &mut sregs.fs,
                &mut sregs.gs,
                &mut sregs.ss,
            ] {
                seg.base = 0;
                seg.selector = 0;
            }
        }
        BootEntry::Pvh { .. } => {
            let gdt = [
                gdt_entry(0, 0, 0),
                gdt_entry(0xc09b, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x008b, 0, 0x67),
            ];
            configure_segments(mem, &mut sregs, &gdt)?;
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        BootEntry::Linux64 { .. } | BootEntry::RawLong { .. } => {
            let gdt = [
                gdt_entry(0, 0, 0),
                gdt_entry(0xa09b, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x808b, 0, 0xfffff),
            ];
            configure_segments(mem, &mut sregs, &gdt)?;
            write_identity_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

fn configure_segments(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    gdt: &[u64; BOOT_GDT_MAX],
) -> Result<(), RegsError> {
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_START + (i as u64) * 8))
            .map_err(RegsError::WriteGdt)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(RegsError::WriteGdt)?;
    let code = kvm_segment_from_gdt(gdt[1], 1);
    let data = kvm_segment_from_gdt(gdt[2], 2);
    let tss = kvm_segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of::<u64>() * BOOT_GDT_MAX - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (std::mem::size_of::<u64>() - 1) as u16;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    Ok(())
}

/// Identity-maps the low 4 GiB with 2 MiB pages (RAM and the MMIO gap).
pub fn write_identity_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(RegsError::WritePageTables)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x03, GuestAddress(PDPTE_START + pd * 8))
            .map_err(RegsError::WritePageTables)?;
        let mut table = [0u8; 4096];
        for (i, chunk) in table.chunks_exact_mut(8).enumerate() {
            let page = ((pd * 512 + i as u64) << 21) | 0x83;
            chunk.copy_from_slice(&page.to_le_bytes());
        }
        mem.write_slice(&table, GuestAddress(pd_addr))
            .map_err(RegsError::WritePageTables)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_into_segments() {
        let code = kvm_segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(code.selector, 8);
        assert_eq!(code.type_, 0xb);
        assert_eq!(
            (code.present, code.l, code.db, code.g, code.s),
            (1, 1, 0, 1, 1)
        );
        assert_eq!(code.limit, 0xffff_ffff);
        let data = kvm_segment_from_gdt(gdt_entry(0xc093, 0x1234_5678, 0xff), 2);
        assert_eq!(data.base, 0x1234_5678);
        assert_eq!(data.limit, 0xf_ffff);
        assert_eq!((data.db, data.l), (1, 0));
        let null = kvm_segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).expect("guest memory");
        write_identity_page_tables(&mem).expect("tables");
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).expect("pml4");
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPTE_START + 24)).expect("pdpt");
        assert_eq!(pdpt3, (PDE_START + 0x3000) | 3);
        // 0xd000_0000 = PD 3, entry 128.
        let pde: u64 = mem
            .read_obj(GuestAddress(PDE_START + 0x3000 + 128 * 8))
            .expect("pde");
        assert_eq!(pde, 0xd000_0000 | 0x83);
    }
}
