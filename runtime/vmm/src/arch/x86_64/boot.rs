//! Loading a Linux guest: vmlinux (ELF) with linux-loader, the initramfs,
//! the command line, e820 and either the PVH start info or the zero page.

use std::fs::File;
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::layout::*;
use super::regs::BootEntry;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const E820_MAX_ENTRIES: usize = 128;
const PVH_START_MAGIC: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 0x1000;

/// Errors while loading the guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("Failed to open {0}")]
    Open(std::path::PathBuf, #[source] std::io::Error),
    #[error("Failed to load the kernel ELF image")]
    Kernel(#[source] linux_loader::loader::Error),
    #[error("initramfs of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitramfsTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("Failed to write the initramfs into guest memory")]
    InitramfsWrite(#[source] vm_memory::GuestMemoryError),
    #[error("Failed to write the command line into guest memory")]
    Cmdline(#[source] linux_loader::loader::Error),
    #[error("Failed to write the zero page")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    #[error("Failed to write the PVH start info")]
    PvhInfo(#[source] vm_memory::GuestMemoryError),
    #[error("Failed to load the raw image")]
    RawImage(#[source] vm_memory::GuestMemoryError),
}

/// One e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemRange {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The guest's memory map: low RAM up to the EBDA, the EBDA reserved,
/// RAM from 1 MiB to the MMIO gap, RAM above 4 GiB.
pub fn e820_map(mem_bytes: u64) -> Vec<MemRange> {
    let low = ram_below_gap(mem_bytes);
    let mut map = vec![
        MemRange {
            addr: 0,
            size: EBDA_START.min(low),
            kind: E820_RAM,
        },
        MemRange {
            addr: EBDA_START,
            size: LOW_RAM_END - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    if low > HIMEM_START {
        map.push(MemRange {
            addr: HIMEM_START,
            size: low - HIMEM_START,
            kind: E820_RAM,
        });
    }
    if mem_bytes > low {
        map.push(MemRange {
            addr: MMIO_GAP_END,
            size: mem_bytes - low,
            kind: E820_RAM,
        });
    }
    map
}

/// Loads `kernel` (and `initramfs`) into `mem`, writes the command line and
/// boot information, and returns how the boot vCPU must start.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &Cmdline,
) -> Result<BootEntry, BootError> {
    let mut f = File::open(kernel).map_err(|e| BootError::Open(kernel.to_path_buf(), e))?;
    let loaded =
        Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(BootError::Kernel)?;

    let initrd = match initramfs {
        Some(p) => Some(load_initramfs(mem, mem_bytes, loaded.kernel_end, p)?),
        None => None,
    };
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::Cmdline)?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);
    let map = e820_map(mem_bytes);

    match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => {
            write_pvh_info(mem, &map, initrd)?;
            Ok(BootEntry::Pvh { entry: entry.0 })
        }
        _ => {
            write_zero_page(mem, &map, initrd, cmdline_len)?;
            // For an ELF vmlinux, kernel_load is the ELF entry (startup_64).
            Ok(BootEntry::Linux64 {
                entry: loaded.kernel_load.0,
            })
        }
    }
}

/// Places the initramfs page-aligned at the top of low RAM; returns (addr, size).
fn load_initramfs(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel_end: u64,
    path: &Path,
) -> Result<(u64, u64), BootError> {
    let data = std::fs::read(path).map_err(|e| BootError::Open(path.to_path_buf(), e))?;
    let size = data.len() as u64;
    let limit = ram_below_gap(mem_bytes);
    let addr = limit
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= kernel_end)
        .ok_or(BootError::InitramfsTooLarge {
            size,
            kernel_end,
            limit,
        })?;
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(BootError::InitramfsWrite)?;
    Ok((addr, size))
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    map: &[MemRange],
    initrd: Option<(u64, u64)>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, r) in map.iter().take(E820_MAX_ENTRIES).enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: r.addr,
            size: r.size,
            r#type: r.kind,
        };
    }
    params.e820_entries = map.len().min(E820_MAX_ENTRIES) as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

/// Writes `hvm_start_info`, one module (the initramfs) and the memory map.
fn write_pvh_info(
    mem: &GuestMemoryMmap,
    map: &[MemRange],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut memmap = Vec::with_capacity(map.len() * 24);
    for r in map {
        memmap.extend_from_slice(&r.addr.to_le_bytes());
        memmap.extend_from_slice(&r.size.to_le_bytes());
        memmap.extend_from_slice(&r.kind.to_le_bytes());
        memmap.extend_from_slice(&0u32.to_le_bytes());
    }
    mem.write_slice(&memmap, GuestAddress(PVH_MEMMAP_START))
        .map_err(BootError::PvhInfo)?;
    // The module list sits right after the memory map.
    let modlist_addr = PVH_MEMMAP_START + memmap.len() as u64;
    let nr_modules: u32 = if let Some((addr, size)) = initrd {
        let mut m = Vec::with_capacity(32);
        m.extend_from_slice(&addr.to_le_bytes());
        m.extend_from_slice(&size.to_le_bytes());
        m.extend_from_slice(&[0u8; 16]);
        mem.write_slice(&m, GuestAddress(modlist_addr))
            .map_err(BootError::PvhInfo)?;
        1
    } else {
        0
    };
    let mut info = Vec::with_capacity(56);
    info.extend_from_slice(&PVH_START_MAGIC.to_le_bytes());
    info.extend_from_slice(&1u32.to_le_bytes()); // version
    info.extend_from_slice(&0u32.to_le_bytes()); // flags
    info.extend_from_slice(&nr_modules.to_le_bytes());
    info.extend_from_slice(&(if nr_modules > 0 { modlist_addr } else { 0 }).to_le_bytes());
    info.extend_from_slice(&CMDLINE_START.to_le_bytes());
    info.extend_from_slice(&0u64.to_le_bytes()); // rsdp
    info.extend_from_slice(&PVH_MEMMAP_START.to_le_bytes());
    info.extend_from_slice(&(map.len() as u32).to_le_bytes());
    info.extend_from_slice(&0u32.to_le_bytes());
    mem.write_slice(&info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::PvhInfo)
}

/// Copies raw guest code to `addr`.
pub fn load_raw_image(mem: &GuestMemoryMmap, code: &[u8], addr: u64) -> Result<(), BootError> {
    mem.write_slice(code, GuestAddress(addr))
        .map_err(BootError::RawImage)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_small_and_large() {
        let m = e820_map(128 << 20);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[2],
            MemRange {
                addr: HIMEM_START,
                size: (128 << 20) - HIMEM_START,
                kind: E820_RAM
            }
        );
        let m = e820_map(5 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(m[3].addr, MMIO_GAP_END);
        assert_eq!(m[3].size, (5 << 30) - MMIO_GAP_START);
    }

    #[test]
    fn zero_page_and_pvh_info_are_written() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).expect("mem");
        let map = e820_map(16 << 20);
        write_zero_page(&mem, &map, Some((0x80_0000, 0x1000)), 10).expect("zero page");
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).expect("read");
        let (flag, ramdisk) = (p.hdr.boot_flag, p.hdr.ramdisk_image);
        assert_eq!(flag, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!(ramdisk, 0x80_0000);
        assert_eq!(p.e820_entries, 3);
        write_pvh_info(&mem, &map, Some((0x80_0000, 0x1000))).expect("pvh");
        let magic: u32 = mem.read_obj(GuestAddress(PVH_INFO_START)).expect("magic");
        assert_eq!(magic, PVH_START_MAGIC);
        let nmods: u32 = mem
            .read_obj(GuestAddress(PVH_INFO_START + 12))
            .expect("mods");
        assert_eq!(nmods, 1);
    }

    #[test]
    fn initramfs_too_large_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem");
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("initrd");
        std::fs::write(&p, vec![0u8; 3 << 20]).expect("write");
        assert!(matches!(
            load_initramfs(&mem, 2 << 20, HIMEM_START, &p),
            Err(BootError::InitramfsTooLarge { .. })
        ));
        std::fs::write(&p, vec![7u8; 4096]).expect("write");
        let (addr, size) = load_initramfs(&mem, 2 << 20, HIMEM_START, &p).expect("fits");
        assert_eq!((addr, size), ((2 << 20) - 4096, 4096));
    }
}
