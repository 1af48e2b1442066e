//! Giving guest pages back to the host, safely.
//!
//! [`check_range`] turns a guest-physical range the guest named (an
//! inflated PFN, a reported free block) into a [`Checked`] range: page
//! aligned, not empty, no overflow, wholly inside **one** guest memory
//! region. Only a checked range reaches [`discard`], so the VMM never
//! discards host memory outside guest RAM — not even when two regions are
//! adjacent in guest-physical space, since their host mappings are not.
//!
//! How memory goes back depends on how the region is mapped
//! ([`Method::for_region`]):
//!
//! - **shared, file-backed** (our guest RAM: one memfd mapped `MAP_SHARED`,
//!   so vhost-user backends such as virtiofsd can map it too):
//!   `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the memfd at the region's file
//!   offset. `MADV_DONTNEED` would only drop this process's page-table
//!   entries: the pages stay in the memfd's page cache (and mapped in
//!   virtiofsd), so the host would get nothing back. Punching the hole
//!   frees the pages of the file itself, and the kernel unmaps the range
//!   from every process that maps it; the next access from anyone faults
//!   in a zero page. (`MADV_REMOVE` does the same through the mapping; the
//!   fd route does not depend on the mapping's protection and lets seccomp
//!   allow exactly one `fallocate` mode.)
//! - **shared, anonymous**: `MADV_REMOVE`, which frees the shmem pages
//!   behind the mapping (`MADV_DONTNEED` would not, for the same reason).
//! - **private** (anonymous memory, as the device tests use):
//!   `MADV_DONTNEED` frees the pages; the next access reads zeros. A
//!   private file mapping (never made by the VMM) only loses its private
//!   copies: the file's own pages are someone else's data and stay.

use std::os::fd::AsRawFd;

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::BALLOON_PAGE_SIZE;

/// The region type of our guest memory.
type Region = vm_memory::GuestRegionMmap<()>;

/// Why a guest-named range is not discarded. Each names the range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("range {addr:#x}+{len:#x} is empty")]
    Empty { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} is not aligned to 4 KiB pages")]
    Unaligned { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} overflows the guest-physical address space")]
    Overflow { addr: u64, len: u64 },
    #[error("range {addr:#x}+{len:#x} does not start in guest RAM")]
    OutsideRam { addr: u64, len: u64 },
    #[error(
        "range {addr:#x}+{len:#x} runs past the end of the guest RAM region {start:#x}..{end:#x}"
    )]
    CrossesRegion {
        addr: u64,
        len: u64,
        start: u64,
        end: u64,
    },
}

/// How a region gives memory back (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// `fallocate(PUNCH_HOLE | KEEP_SIZE)` on the backing file.
    PunchHole,
    /// `madvise(MADV_REMOVE)`: shared anonymous (shmem) memory.
    Remove,
    /// `madvise(MADV_DONTNEED)`: private memory.
    DontNeed,
}

impl Method {
    /// The method for `region`, from how it is mapped.
    pub fn for_region(region: &Region) -> Method {
        let shared = region.flags() & libc::MAP_SHARED != 0;
        match (shared, region.file_offset().is_some()) {
            (true, true) => Method::PunchHole,
            (true, false) => Method::Remove,
            (false, _) => Method::DontNeed,
        }
    }
}

/// A range that lies wholly inside one guest memory region, page aligned
/// in guest-physical space and in the region's mapping.
#[derive(Debug, Clone, Copy)]
pub struct Checked<'a> {
    region: &'a Region,
    /// Offset of the range in the region.
    offset: u64,
    len: u64,
}

impl<'a> Checked<'a> {
    /// The guest-physical start.
    pub fn addr(&self) -> u64 {
        self.region.start_addr().0 + self.offset
    }

    /// Length in bytes (never 0).
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Whether `next` continues this range in the same region, so the two
    /// can be discarded as one.
    pub fn is_followed_by(&self, next: &Checked<'_>) -> bool {
        std::ptr::eq(self.region, next.region) && self.offset + self.len == next.offset
    }

    /// This range grown by `next` (which [`Checked::is_followed_by`] it).
    pub fn extend(&mut self, next: &Checked<'_>) {
        self.len += next.len;
    }
}

/// Checks that `[addr, addr + len)` is a non-empty run of whole 4 KiB
/// pages inside one guest memory region (its host mapping page aligned
/// too); anything else is refused, naming the range.
pub fn check_range(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<Checked<'_>, RangeError> {
    if len == 0 {
        return Err(RangeError::Empty { addr, len });
    }
    if addr % BALLOON_PAGE_SIZE != 0 || len % BALLOON_PAGE_SIZE != 0 {
        return Err(RangeError::Unaligned { addr, len });
    }
    let end = addr
        .checked_add(len)
        .ok_or(RangeError::Overflow { addr, len })?;
    let region = mem
        .find_region(GuestAddress(addr))
        .ok_or(RangeError::OutsideRam { addr, len })?;
    let start = region.start_addr().0;
    // A region never wraps the address space (vm-memory refuses that).
    let region_end = start.saturating_add(region.len());
    if end > region_end {
        return Err(RangeError::CrossesRegion {
            addr,
            len,
            start,
            end: region_end,
        });
    }
    let offset = addr - start;
    // A region whose guest base is not page aligned maps guest pages onto
    // host addresses that are not page aligned: nothing there can be
    // discarded page by page.
    if offset % BALLOON_PAGE_SIZE != 0 {
        return Err(RangeError::Unaligned { addr, len });
    }
    Ok(Checked {
        region,
        offset,
        len,
    })
}

/// Gives the host memory behind `range` back (see the module doc). The
/// range's contents read as zeros afterwards.
pub fn discard(range: &Checked<'_>) -> std::io::Result<()> {
    let len =
        usize::try_from(range.len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let offset = usize::try_from(range.offset)
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    let method = Method::for_region(range.region);
    match method {
        Method::PunchHole => {
            let Some(fo) = range.region.file_offset() else {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            };
            let file_off = fo
                .start()
                .checked_add(range.offset)
                .filter(|o| o % BALLOON_PAGE_SIZE == 0)
                .and_then(|o| libc::off_t::try_from(o).ok())
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            let flen = libc::off_t::try_from(range.len)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: fallocate only changes the file behind the fd; the
            // range [file_off, file_off + flen) is inside this region's
            // part of the file (check_range), which is guest RAM.
            let r = unsafe {
                libc::fallocate(
                    fo.file().as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    file_off,
                    flen,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Method::Remove | Method::DontNeed => {
            let advice = if method == Method::Remove {
                libc::MADV_REMOVE
            } else {
                libc::MADV_DONTNEED
            };
            // SAFETY: offset + len <= the region's size (check_range), so
            // the address range is inside the region's own mapping; the
            // pages are guest RAM, which the VMM only ever accesses as
            // volatile guest memory, so their contents turning to zeros
            // breaks no Rust reference.
            let r = unsafe {
                let host = range.region.as_ptr().add(offset);
                libc::madvise(host.cast(), len, advice)
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}
