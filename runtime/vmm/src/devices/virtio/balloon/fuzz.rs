//! Guarded guest memory for the balloon's tests, and its fuzzing entry
//! point (cargo-fuzz target `balloon`, and the stable smoke test in
//! `tests.rs`).
//!
//! A balloon that discards the wrong host memory does not crash: it
//! silently zeroes whatever the host mapped next to guest RAM. So the
//! tests and the fuzz target run it on [`GuardedMemory`]: guest regions
//! carved out of one host mapping with canary pages before, between and
//! after them, where a discard that strays past a region's end would land.

use std::cell::OnceCell;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use super::{features, Balloon};
use crate::devices::virtio::test_utils::{
    activate_ctx, fuzz_fill_buffers, fuzz_lay_out_queue, test_interrupt, GuestQueue,
};
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

/// Bytes of each canary.
pub const CANARY_LEN: usize = 16 << 10;
/// What canaries hold.
pub const CANARY_BYTE: u8 = 0xa5;
/// Guest regions (guest-physical start, length): A and B are adjacent in
/// guest-physical space (their host mappings are not), C follows a gap.
pub const REGIONS: [(u64, usize); 3] = [(0, 2 << 20), (2 << 20, 2 << 20), (8 << 20, 1 << 20)];

/// Guest memory made of [`REGIONS`], anonymous and private, inside one host
/// mapping laid out `canary A canary B canary C canary`.
///
/// The host mapping is never unmapped (a test's memory lives until the
/// process ends; the fuzz target reuses one), so no clone of [`Self::mem`]
/// can outlive it.
pub struct GuardedMemory {
    mem: GuestMemoryMmap,
    base: *mut u8,
    total: usize,
    /// Host offsets of the canaries.
    canaries: Vec<usize>,
}

impl GuardedMemory {
    /// Maps and fills the whole layout.
    pub fn new() -> Self {
        let total = REGIONS.iter().map(|r| r.1).sum::<usize>() + (REGIONS.len() + 1) * CANARY_LEN;
        // SAFETY: a fresh anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap of the guarded test memory");
        let base = base.cast::<u8>();
        let mut canaries = vec![0];
        let mut regions = Vec::new();
        let mut at = CANARY_LEN;
        for (gpa, len) in REGIONS {
            // SAFETY: [at, at + len) lies inside the mapping made above,
            // which is never unmapped; the flags and protection are the
            // mapping's own.
            let region = unsafe {
                MmapRegion::build_raw(
                    base.add(at),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                )
            }
            .expect("guest region over the guarded mapping");
            regions.push(GuestRegionMmap::new(region, GuestAddress(gpa)).expect("region fits"));
            at += len;
            canaries.push(at);
            at += CANARY_LEN;
        }
        let g = GuardedMemory {
            mem: GuestMemoryMmap::from_regions(regions).expect("guarded guest memory"),
            base,
            total,
            canaries,
        };
        g.fill_canaries();
        g
    }

    /// The guest memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    fn fill_canaries(&self) {
        for &c in &self.canaries {
            // SAFETY: each canary lies inside the mapping (see new) and no
            // guest region overlaps it.
            unsafe { std::ptr::write_bytes(self.base.add(c), CANARY_BYTE, CANARY_LEN) };
        }
    }

    /// Whether every canary still holds [`CANARY_BYTE`].
    pub fn canaries_intact(&self) -> bool {
        self.canaries.iter().all(|&c| {
            // SAFETY: as in fill_canaries; read only.
            let s = unsafe { std::slice::from_raw_parts(self.base.add(c), CANARY_LEN) };
            s.iter().all(|b| *b == CANARY_BYTE)
        })
    }

    /// Zeroes guest memory and refills the canaries (the fuzz target's
    /// fresh start for each input).
    fn reset(&self) {
        // SAFETY: the whole mapping is ours; its contents become zeros,
        // which nothing holds a reference into.
        let r = unsafe { libc::madvise(self.base.cast(), self.total, libc::MADV_DONTNEED) };
        assert_eq!(r, 0, "reset of the guarded test memory");
        self.fill_canaries();
    }
}

impl Default for GuardedMemory {
    fn default() -> Self {
        Self::new()
    }
}

thread_local! {
    /// The fuzz target's memory, made once per thread and reset per input.
    static FUZZ_MEMORY: OnceCell<GuardedMemory> = const { OnceCell::new() };
}

/// Fuzzing entry point. The first byte picks what the driver acks (bit 0:
/// free page reporting, bit 1: deflate on OOM) and the config write (bits
/// 4–7: its offset); then the inflate, deflate and reporting queues are
/// laid out from the input as a hostile driver could (`fuzz_lay_out_queue`:
/// avail index, 16 descriptors, 16 ring entries each), and the rest is
/// buffer memory at 0x10_0000 (so PFN arrays and reported ranges are the
/// input's). Every queue is served. Must never panic, and never discard
/// host memory outside guest RAM: the canaries around the guest regions
/// must come out intact.
pub fn fuzz_balloon(input: &[u8]) {
    FUZZ_MEMORY.with(|cell| {
        let guard = cell.get_or_init(GuardedMemory::new);
        guard.reset();
        run_input(guard, input);
        assert!(
            guard.canaries_intact(),
            "the balloon discarded host memory outside guest RAM"
        );
    });
}

fn run_input(guard: &GuardedMemory, input: &[u8]) {
    const QSIZE: u16 = 16;
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let mem = guard.mem();
    let inflate = GuestQueue::new(mem, QSIZE, 0x1000);
    let deflate = GuestQueue::new(mem, QSIZE, 0x4000);
    let reporting = GuestQueue::new(mem, QSIZE, 0x8000);
    let Some(rest) = fuzz_lay_out_queue(&inflate, rest) else {
        return;
    };
    let Some(rest) = fuzz_lay_out_queue(&deflate, rest) else {
        return;
    };
    let Some(rest) = fuzz_lay_out_queue(&reporting, rest) else {
        return;
    };
    // The config write's bytes come from the input too (before the
    // buffers, which get the rest).
    let (config, rest) = rest.split_at(rest.len().min(4));
    if fuzz_fill_buffers(mem, rest).is_none() {
        return;
    }
    let mut dev = Balloon::new(flags & 2 != 0, true);
    let mut acked = VIRTIO_F_VERSION_1;
    if flags & 1 != 0 {
        acked |= features::FREE_PAGE_REPORTING;
    }
    if flags & 2 != 0 {
        acked |= features::DEFLATE_ON_OOM;
    }
    let irq = test_interrupt();
    if dev
        .activate(activate_ctx(
            mem,
            vec![inflate.queue(), deflate.queue(), reporting.queue()],
            &irq,
            acked,
        ))
        .is_err()
    {
        return;
    }
    let _ = dev.write_config(u64::from(flags >> 4), config);
    let mut cfg = [0u8; 8];
    dev.read_config(u64::from(flags >> 4), &mut cfg);
    for q in 0..4 {
        let _ = dev.process_queue(q);
    }
}
