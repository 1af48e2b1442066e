//! Guest RAM: one memfd, mapped shared, one region per RAM range.
//!
//! A memfd with `FileOffset`s makes the memory shareable with vhost-user
//! backends (virtiofsd) later: they map the same fd at the same offsets.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::ram_ranges;

/// Guest memory errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("Failed to create the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    #[error("Failed to size the guest memory memfd to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    #[error("Failed to clone the memfd handle")]
    Clone(#[source] std::io::Error),
    #[error("Guest memory size {0} does not fit this host's address space")]
    TooLarge(u64),
    #[error("Failed to map guest memory")]
    Map(#[source] vm_memory::mmap::FromRangesError),
}

/// Guest RAM and the memfd that backs it.
pub struct GuestRam {
    /// The mapped regions.
    pub mem: GuestMemoryMmap,
    /// The backing memfd (offset 0 = guest address 0). None when the RAM
    /// is a copy-on-write mapping of a snapshot's memory file
    /// (`snapshot::ram::map_private`): then no other process can share it.
    pub memfd: Option<File>,
}

fn create_memfd(name: &CStr) -> Result<File, MemoryError> {
    // SAFETY: `name` is a valid NUL-terminated string; memfd_create has no
    // other memory-safety preconditions and we check the result.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Creates `mem_bytes` of guest RAM laid out around the MMIO gap.
pub fn create_guest_memory(mem_bytes: u64) -> Result<GuestRam, MemoryError> {
    let memfd = create_memfd(c"boxlite-guest-ram")?;
    memfd
        .set_len(mem_bytes)
        .map_err(|e| MemoryError::Truncate(mem_bytes, e))?;
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (start, len) in ram_ranges(mem_bytes) {
        let size = usize::try_from(len).map_err(|_| MemoryError::TooLarge(mem_bytes))?;
        let fd = memfd.try_clone().map_err(MemoryError::Clone)?;
        regions.push((GuestAddress(start), size, Some(FileOffset::new(fd, offset))));
        offset += len;
    }
    let mem = GuestMemoryMmap::from_ranges_with_files(regions).map_err(MemoryError::Map)?;
    Ok(GuestRam {
        mem,
        memfd: Some(memfd),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn memory_is_memfd_backed_and_shared() {
        let ram = create_guest_memory(8 << 20).expect("memory");
        assert_eq!(ram.mem.num_regions(), 1);
        let region = ram.mem.iter().next().expect("region");
        assert!(region.file_offset().is_some());
        ram.mem
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .expect("write");
        // The write is visible through the memfd: the mapping is MAP_SHARED.
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.memfd
            .as_ref()
            .expect("memfd")
            .read_exact_at(&mut buf, 0x1000)
            .expect("read");
        assert_eq!(u32::from_le_bytes(buf), 0xdead_beef);
    }
}
