//! Device-level virtio-balloon tests: the test is the guest driver (real
//! guest memory, real split queues). Discards are checked on the host side:
//! `mincore` and zeros read back for private anonymous memory, holes in
//! the memfd (`SEEK_HOLE`, allocated blocks) for the VMM's real guest RAM,
//! and canaries around the guest regions ([`GuardedMemory`]) for every
//! hostile input.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::AsRawFd;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::discard::{check_range, Method, RangeError};
use super::fuzz::{fuzz_balloon, GuardedMemory, REGIONS};
use super::*;
use crate::devices::virtio::persist::BalloonSnap;
use crate::devices::virtio::test_utils::{
    activate_ctx, test_interrupt, GuestQueue, F_NEXT, F_WRITE,
};
use crate::devices::virtio::VIRTIO_F_VERSION_1;
use crate::devices::virtio::{Interrupt, VirtioDevice, VirtioError, INT_CONFIG, INT_VRING};
use crate::vstate::memory::{create_guest_memory, GuestRam};

const PAGE: u64 = BALLOON_PAGE_SIZE;
const ALL_FEATURES: u64 =
    VIRTIO_F_VERSION_1 | features::DEFLATE_ON_OOM | features::FREE_PAGE_REPORTING;
/// Where the tests put PFN arrays.
const PFNS_AT: u64 = 0x10_0000;

/// A balloon activated over three queues in `mem` (inflate at 0x1000,
/// deflate at 0x4000, reporting at 0x8000).
struct Rig<'a> {
    dev: Balloon,
    mem: &'a GuestMemoryMmap,
    inflate: GuestQueue<'a>,
    deflate: GuestQueue<'a>,
    reporting: GuestQueue<'a>,
    irq: Arc<Interrupt>,
}

fn rig(mem: &GuestMemoryMmap) -> Rig<'_> {
    let inflate = GuestQueue::new(mem, 16, 0x1000);
    let deflate = GuestQueue::new(mem, 16, 0x4000);
    let reporting = GuestQueue::new(mem, 16, 0x8000);
    let irq = test_interrupt();
    let mut dev = Balloon::new(true, true);
    dev.activate(activate_ctx(
        mem,
        vec![inflate.queue(), deflate.queue(), reporting.queue()],
        &irq,
        ALL_FEATURES,
    ))
    .unwrap();
    Rig {
        dev,
        mem,
        inflate,
        deflate,
        reporting,
        irq,
    }
}

impl Rig<'_> {
    fn metric(&self, f: impl Fn(&BalloonMetrics) -> &AtomicU64) -> u64 {
        BalloonMetrics::get(f(&self.dev.metrics))
    }

    /// Publishes `pfns` as one device-readable buffer at [`PFNS_AT`] on
    /// queue `q` (descriptor `d`) and runs it; the chain must come back.
    fn send_pfns(&mut self, q: u16, d: u16, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.mem.write_slice(&bytes, GuestAddress(PFNS_AT)).unwrap();
        self.send(q, d, &[(PFNS_AT, bytes.len() as u32, 0)]);
    }

    /// Publishes a chain of (addr, len, flags) starting at descriptor
    /// `first` on queue `q`, runs it, and checks it was returned with used
    /// length 0 and an interrupt.
    fn send(&mut self, q: u16, first: u16, descs: &[(u64, u32, u16)]) {
        let gq = match q {
            queue::INFLATE => &mut self.inflate,
            queue::DEFLATE => &mut self.deflate,
            _ => &mut self.reporting,
        };
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let f = if i + 1 < descs.len() {
                flags | F_NEXT
            } else {
                *flags
            };
            gq.write_desc(idx, *addr, *len, f, idx + 1);
        }
        gq.publish(first);
        let before = gq.used_idx();
        self.irq.ack(INT_VRING);
        self.dev.process_queue(q).unwrap();
        let gq = match q {
            queue::INFLATE => &self.inflate,
            queue::DEFLATE => &self.deflate,
            _ => &self.reporting,
        };
        assert_eq!(gq.used_idx(), before.wrapping_add(1), "one chain returned");
        assert_eq!(gq.used_elem(before), (u32::from(first), 0));
        assert_ne!(self.irq.status() & INT_VRING, 0, "driver interrupted");
    }
}

/// Fills page `gpa` with its page number's low byte (+1, never 0).
fn fill_page(mem: &GuestMemoryMmap, gpa: u64) {
    let b = ((gpa / PAGE) as u8).wrapping_add(1).max(1);
    mem.write_slice(&[b; PAGE as usize], GuestAddress(gpa))
        .unwrap();
}

fn page_is_filled(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    let b = ((gpa / PAGE) as u8).wrapping_add(1).max(1);
    let mut buf = [0u8; PAGE as usize];
    mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
    buf.iter().all(|x| *x == b)
}

fn page_is_zero(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    let mut buf = [0xffu8; PAGE as usize];
    mem.read_slice(&mut buf, GuestAddress(gpa)).unwrap();
    buf.iter().all(|x| *x == 0)
}

/// Whether the host page behind guest page `gpa` is resident (`mincore`).
/// Read before touching the page: a read maps it back.
fn resident(mem: &GuestMemoryMmap, gpa: u64) -> bool {
    let host = mem.get_host_address(GuestAddress(gpa)).unwrap();
    let mut v = [0u8; 1];
    // SAFETY: `host` is the start of one page of a live mapping (guest
    // pages are page aligned); mincore writes one byte for it into `v`.
    let r = unsafe { libc::mincore(host.cast(), PAGE as usize, v.as_mut_ptr()) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    v[0] & 1 == 1
}

/// Whether the memfd has a hole at `offset` (`SEEK_HOLE` lands on it).
fn hole_at(ram: &GuestRam, offset: u64) -> bool {
    // SAFETY: lseek on our own fd; the file position is not used elsewhere.
    let r = unsafe {
        libc::lseek(
            ram.memfd.as_ref().expect("memfd").as_raw_fd(),
            offset as libc::off_t,
            libc::SEEK_HOLE,
        )
    };
    assert!(r >= 0, "SEEK_HOLE: {}", std::io::Error::last_os_error());
    r as u64 == offset
}

/// Bytes the memfd holds in memory.
fn memfd_bytes(ram: &GuestRam) -> u64 {
    ram.memfd
        .as_ref()
        .expect("memfd")
        .metadata()
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        })
        .unwrap()
}

#[test]
fn features_queues_and_ids() {
    let full = Balloon::new(true, true);
    assert_eq!(full.device_type(), 5);
    assert_eq!(full.queue_max_sizes(), &[256, 256, 32]);
    assert_eq!(full.avail_features(), ALL_FEATURES);
    let bare = Balloon::new(false, false);
    assert_eq!(bare.queue_max_sizes(), &[256, 256]);
    assert_eq!(bare.avail_features(), VIRTIO_F_VERSION_1);
    let oom = Balloon::new(true, false);
    assert_eq!(
        oom.avail_features(),
        VIRTIO_F_VERSION_1 | features::DEFLATE_ON_OOM
    );
    let mut reporting_only = Balloon::new(false, true);
    assert_eq!(
        reporting_only.avail_features(),
        VIRTIO_F_VERSION_1 | features::FREE_PAGE_REPORTING
    );
    assert!(!reporting_only.process_inflate().unwrap(), "inactive");
    assert!(!reporting_only.process_reporting().unwrap(), "inactive");
    let mut bare = bare;
    assert!(matches!(
        bare.process_queue(2),
        Err(VirtioError::BadQueueIndex(2))
    ));
    assert!(matches!(
        bare.process_queue(3),
        Err(VirtioError::BadQueueIndex(3))
    ));
}

fn config(dev: &Balloon) -> (u32, u32) {
    let mut c = [0xffu8; 12];
    dev.read_config(0, &mut c);
    assert_eq!(&c[8..], &[0; 4], "past the end reads 0");
    (
        u32::from_le_bytes(c[0..4].try_into().unwrap()),
        u32::from_le_bytes(c[4..8].try_into().unwrap()),
    )
}

#[test]
fn config_space_only_actual_is_the_drivers() {
    let mut dev = Balloon::new(true, true);
    assert_eq!(config(&dev), (0, 0));
    dev.set_target_pages(1000).unwrap();
    assert_eq!(config(&dev), (1000, 0));
    assert_eq!(dev.target_pages(), 1000);

    // The driver writes actual (a 4-byte access at 4, as Linux does).
    dev.write_config(4, &700u32.to_le_bytes()).unwrap();
    assert_eq!(config(&dev), (1000, 700));
    assert_eq!(dev.actual_pages(), 700);
    // A write to num_pages is ignored, not an error.
    dev.write_config(0, &5u32.to_le_bytes()).unwrap();
    assert_eq!(config(&dev), (1000, 700));
    // Straddling num_pages and actual: only actual's bytes land.
    dev.write_config(2, &[0xaa, 0xbb, 0x01, 0x02]).unwrap();
    assert_eq!(
        config(&dev),
        (1000, u32::from_le_bytes([0x01, 0x02, 0x00, 0x00]))
    );
    // Byte-wide writes to actual, past the end and at absurd offsets.
    dev.write_config(7, &[0x80]).unwrap();
    assert_eq!(dev.actual_pages(), 0x8000_0201);
    dev.write_config(8, &[1, 2, 3, 4]).unwrap();
    dev.write_config(u64::MAX - 1, &[1, 2, 3, 4]).unwrap();
    assert_eq!(config(&dev), (1000, 0x8000_0201));
    // Partial and odd reads.
    let mut b = [0xffu8; 2];
    dev.read_config(5, &mut b);
    assert_eq!(b, [0x02, 0x00]);
    let mut b = [0xffu8; 4];
    dev.read_config(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4]);
    // A reset empties the balloon; the host's target stays.
    dev.reset();
    assert_eq!(config(&dev), (1000, 0));
}

#[test]
fn a_new_target_interrupts_a_running_driver() {
    let guard = GuardedMemory::new();
    let r = rig(guard.mem());
    let mut dev = r.dev;
    assert_eq!(r.irq.status() & INT_CONFIG, 0);
    dev.set_target_pages(256).unwrap();
    assert_ne!(r.irq.status() & INT_CONFIG, 0, "config change announced");
    assert!(!r.irq.needs_reset(), "not a device failure");
    assert_eq!(r.irq.eventfd().read().unwrap(), 1, "irqfd written");
}

#[test]
fn inflate_discards_exactly_the_named_pages() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    let pages: Vec<u64> = (0x180..0x190).map(|p| p * PAGE).collect();
    for &p in &pages {
        fill_page(mem, p);
    }
    assert!(pages.iter().all(|&p| resident(mem, p)));
    let mut r = rig(mem);
    // Out of order, one duplicate; 0x183..=0x185 form one run.
    let named = [0x185u32, 0x183, 0x184, 0x18a, 0x184];
    r.send_pfns(queue::INFLATE, 0, &named);
    for &p in &pages {
        let pfn = (p / PAGE) as u32;
        assert_eq!(
            resident(mem, p),
            !named.contains(&pfn),
            "page {pfn:#x} residency"
        );
    }
    for &p in &pages {
        let pfn = (p / PAGE) as u32;
        if named.contains(&pfn) {
            assert!(page_is_zero(mem, p), "page {pfn:#x} reads zeros");
        } else {
            assert!(page_is_filled(mem, p), "page {pfn:#x} untouched");
        }
    }
    assert_eq!(r.metric(|m| &m.inflated_pages), 4, "duplicates count once");
    assert_eq!(r.metric(|m| &m.bad_ranges), 0);
    assert_eq!(r.metric(|m| &m.bad_chains), 0);
    assert_eq!(r.metric(|m| &m.discard_errors), 0);
    assert!(guard.canaries_intact());
}

#[test]
fn inflate_on_the_vmms_memfd_punches_holes() {
    let ram = create_guest_memory(8 << 20).unwrap();
    let mem = &ram.mem;
    assert_eq!(
        Method::for_region(mem.iter().next().unwrap()),
        Method::PunchHole,
        "the VMM's guest RAM is a shared memfd mapping"
    );
    let pages: Vec<u64> = (0x300..0x310).map(|p| p * PAGE).collect();
    for &p in &pages {
        fill_page(mem, p);
    }
    let mut r = rig(mem);
    // The PFN array's page, allocated before counting.
    fill_page(mem, PFNS_AT);
    let held = memfd_bytes(&ram);
    r.send_pfns(queue::INFLATE, 0, &[0x301, 0x302, 0x30f]);
    assert_eq!(
        held - memfd_bytes(&ram),
        3 * PAGE,
        "exactly three pages left the memfd"
    );
    for &p in &pages {
        let pfn = p / PAGE;
        let named = [0x301, 0x302, 0x30f].contains(&pfn);
        assert_eq!(hole_at(&ram, p), named, "hole at page {pfn:#x}");
        // A page of a MAP_SHARED mapping is resident while the memfd
        // holds it: the punched ones are gone from the mapping too.
        assert_eq!(resident(mem, p), !named, "page {pfn:#x} residency");
    }
    for &p in &pages {
        let named = [0x301, 0x302, 0x30f].contains(&(p / PAGE));
        assert_eq!(page_is_zero(mem, p), named);
        assert_eq!(page_is_filled(mem, p), !named);
    }
    assert_eq!(r.metric(|m| &m.inflated_pages), 3);
}

#[test]
fn reporting_discards_the_ranges_on_the_memfd() {
    let ram = create_guest_memory(16 << 20).unwrap();
    let mem = &ram.mem;
    // Two reported blocks and their neighbours.
    let blocks = [(4u64 << 20, 2u64 << 20), (8 << 20, 64 << 10)];
    let probes: Vec<u64> = blocks
        .iter()
        .flat_map(|&(a, l)| [a - PAGE, a, a + l - PAGE, a + l])
        .collect();
    for &p in &probes {
        fill_page(mem, p);
    }
    for &(a, l) in &blocks {
        for p in (a..a + l).step_by(PAGE as usize) {
            fill_page(mem, p);
        }
    }
    let mut r = rig(mem);
    let held = memfd_bytes(&ram);
    r.send(
        queue::REPORTING,
        0,
        &[
            (blocks[0].0, blocks[0].1 as u32, F_WRITE),
            (blocks[1].0, blocks[1].1 as u32, F_WRITE),
        ],
    );
    let total = blocks[0].1 + blocks[1].1;
    assert_eq!(held - memfd_bytes(&ram), total);
    for &(a, l) in &blocks {
        assert!(hole_at(&ram, a) && hole_at(&ram, a + l - PAGE));
        assert!(!hole_at(&ram, a - PAGE) && !hole_at(&ram, a + l));
        assert!(page_is_zero(mem, a) && page_is_zero(mem, a + l - PAGE));
        assert!(page_is_filled(mem, a - PAGE) && page_is_filled(mem, a + l));
    }
    assert_eq!(r.metric(|m| &m.reports), 1);
    assert_eq!(r.metric(|m| &m.reported_bytes), total);
    assert_eq!(r.metric(|m| &m.bad_ranges), 0);
}

#[test]
fn reporting_discards_private_memory_too() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    // The last 64 KiB of region A and the first of region B.
    let (a_end, b_start) = (REGIONS[0].1 as u64, REGIONS[1].0);
    // The reported pages and one neighbour on each side.
    for p in (a_end - (64 << 10) - PAGE..=b_start + (64 << 10)).step_by(PAGE as usize) {
        fill_page(mem, p);
    }
    let mut r = rig(mem);
    r.send(
        queue::REPORTING,
        0,
        &[
            (a_end - (64 << 10), 64 << 10, F_WRITE),
            (b_start, 64 << 10, F_WRITE),
        ],
    );
    for p in (a_end - (64 << 10)..b_start + (64 << 10)).step_by(PAGE as usize) {
        assert!(!resident(mem, p), "page {p:#x} discarded");
        assert!(page_is_zero(mem, p));
    }
    assert!(page_is_filled(mem, a_end - (64 << 10) - PAGE));
    assert!(page_is_filled(mem, b_start + (64 << 10)));
    assert_eq!(r.metric(|m| &m.reported_bytes), 128 << 10);
    assert!(
        guard.canaries_intact(),
        "ranges ending at a region end stay inside it"
    );
}

#[test]
fn hostile_pfns_are_skipped_and_counted() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    // Region A's last page and region B's first: adjacent guest pages in
    // two host mappings with a canary between them.
    let last_a = (REGIONS[0].1 as u64 / PAGE) as u32 - 1;
    let first_b = (REGIONS[1].0 / PAGE) as u32;
    let in_gap = (5u64 << 20) / PAGE; // between B and C
    let past_c = ((REGIONS[2].0 + REGIONS[2].1 as u64) / PAGE) as u32;
    for p in [last_a, first_b, 0x20] {
        fill_page(mem, u64::from(p) * PAGE);
    }
    let mut r = rig(mem);
    r.send_pfns(
        queue::INFLATE,
        0,
        &[u32::MAX, in_gap as u32, last_a, first_b, past_c, 0x20],
    );
    assert_eq!(r.metric(|m| &m.bad_ranges), 3, "u32::MAX, the gap, past C");
    assert_eq!(r.metric(|m| &m.inflated_pages), 3);
    for p in [last_a, first_b, 0x20] {
        assert!(page_is_zero(mem, u64::from(p) * PAGE));
    }
    assert!(
        guard.canaries_intact(),
        "the run across A's end was split at the region boundary"
    );
}

#[test]
fn hostile_reported_ranges_are_skipped_and_counted() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    let a_end = REGIONS[0].1 as u64;
    let c_end = REGIONS[2].0 + REGIONS[2].1 as u64;
    for p in [a_end - PAGE, a_end, c_end - PAGE, 0x20000, 0x30000] {
        fill_page(mem, p);
    }
    let mut r = rig(mem);
    let hostile: [(u64, u32); 8] = [
        (a_end - PAGE, 2 * PAGE as u32), // across A's end into B
        (c_end - PAGE, 2 * PAGE as u32), // past the last region
        (5 << 20, PAGE as u32),          // in the gap
        (!(PAGE - 1), 2 * PAGE as u32),  // the last page, and past the end
        (0x1800, PAGE as u32),           // unaligned address
        (0x20000, 100),                  // partial page
        (0x20000, 0),                    // empty
        (0x30000, 0x1000_0000),          // 256 MiB from inside A: far past its end
    ];
    let mut descs: Vec<(u64, u32, u16)> = hostile.iter().map(|&(a, l)| (a, l, F_WRITE)).collect();
    descs.push((0x40000, PAGE as u32, F_WRITE)); // the one good range
    fill_page(mem, 0x40000);
    r.send(queue::REPORTING, 0, &descs);
    assert_eq!(r.metric(|m| &m.bad_ranges), hostile.len() as u64);
    assert_eq!(r.metric(|m| &m.reported_bytes), PAGE);
    assert_eq!(r.metric(|m| &m.reports), 1);
    assert!(page_is_zero(mem, 0x40000));
    for p in [a_end - PAGE, a_end, c_end - PAGE, 0x20000, 0x30000] {
        assert!(page_is_filled(mem, p), "page {p:#x} untouched");
    }
    assert!(guard.canaries_intact());
}

#[test]
fn range_checks_name_the_range_and_the_reason() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    let a_end = REGIONS[0].1 as u64;
    assert_eq!(
        check_range(mem, a_end - PAGE, 2 * PAGE).unwrap_err(),
        RangeError::CrossesRegion {
            addr: a_end - PAGE,
            len: 2 * PAGE,
            start: 0,
            end: a_end
        }
    );
    assert_eq!(
        check_range(mem, a_end - PAGE, 2 * PAGE)
            .unwrap_err()
            .to_string(),
        "range 0x1ff000+0x2000 runs past the end of the guest RAM region 0x0..0x200000"
    );
    assert!(matches!(
        check_range(mem, u64::MAX - PAGE + 1, PAGE),
        Err(RangeError::Overflow { .. })
    ));
    assert!(matches!(
        check_range(mem, 5 << 20, PAGE),
        Err(RangeError::OutsideRam { .. })
    ));
    assert!(matches!(
        check_range(mem, 0, 0),
        Err(RangeError::Empty { .. })
    ));
    assert!(matches!(
        check_range(mem, 8, PAGE),
        Err(RangeError::Unaligned { .. })
    ));
    let ok = check_range(mem, REGIONS[2].0, REGIONS[2].1 as u64).unwrap();
    assert_eq!((ok.addr(), ok.bytes()), (REGIONS[2].0, REGIONS[2].1 as u64));
    // A region whose guest base is not page aligned: its pages cannot be
    // discarded (host addresses would not be page aligned).
    let odd = GuestMemoryMmap::from_ranges(&[(GuestAddress(0x800), 0x10000)]).unwrap();
    assert!(matches!(
        check_range(&odd, 0x1000, PAGE),
        Err(RangeError::Unaligned { .. })
    ));
    assert_eq!(odd.iter().next().unwrap().start_addr(), GuestAddress(0x800));
}

#[test]
fn wrong_directions_and_lengths_refuse_the_whole_chain() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    for p in [0x50000u64, 0x51000] {
        fill_page(mem, p);
    }
    let mut r = rig(mem);
    mem.write_slice(&0x50u32.to_le_bytes(), GuestAddress(PFNS_AT))
        .unwrap();
    // Inflate: a write-only PFN buffer.
    r.send(queue::INFLATE, 0, &[(PFNS_AT, 4, F_WRITE)]);
    // Inflate: a good buffer, then a write-only one: nothing discarded.
    r.send(queue::INFLATE, 1, &[(PFNS_AT, 4, 0), (PFNS_AT, 4, F_WRITE)]);
    // Inflate: 6 bytes, 0 bytes.
    r.send(queue::INFLATE, 3, &[(PFNS_AT, 6, 0)]);
    r.send(queue::INFLATE, 4, &[(PFNS_AT, 0, 0)]);
    // Inflate: a PFN buffer outside guest memory, and one overflowing.
    r.send(queue::INFLATE, 5, &[(5 << 20, 4, 0)]);
    r.send(queue::INFLATE, 6, &[(u64::MAX - 1, 4, 0)]);
    // Inflate: one PFN too many (two buffers, 4096 + 1 PFNs).
    r.send(
        queue::INFLATE,
        7,
        &[(PFNS_AT, MAX_PFNS_PER_CHAIN * 4, 0), (PFNS_AT, 4, 0)],
    );
    // Deflate: write-only.
    r.send(queue::DEFLATE, 0, &[(PFNS_AT, 4, F_WRITE)]);
    // Reporting: a good range, then a read-only descriptor.
    r.send(
        queue::REPORTING,
        0,
        &[(0x51000, PAGE as u32, F_WRITE), (0x51000, PAGE as u32, 0)],
    );
    assert_eq!(r.metric(|m| &m.bad_chains), 9);
    assert_eq!(r.metric(|m| &m.inflated_pages), 0);
    assert_eq!(r.metric(|m| &m.reported_bytes), 0);
    assert_eq!(r.metric(|m| &m.reports), 0);
    assert!(page_is_filled(mem, 0x50000) && page_is_filled(mem, 0x51000));
    assert!(guard.canaries_intact());
    // The queue still works.
    r.send_pfns(queue::INFLATE, 9, &[0x50]);
    assert!(page_is_zero(mem, 0x50000));
}

#[test]
fn deflate_only_returns_the_chain() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    fill_page(mem, 0x60000);
    let mut r = rig(mem);
    r.send_pfns(queue::DEFLATE, 0, &[0x60, 0x61, u32::MAX]);
    assert_eq!(r.metric(|m| &m.deflated_pages), 2);
    assert_eq!(r.metric(|m| &m.bad_ranges), 1);
    assert!(page_is_filled(mem, 0x60000), "deflate discards nothing");
}

#[test]
fn reporting_queue_exists_only_when_negotiated() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    let irq = test_interrupt();
    let inflate = GuestQueue::new(mem, 16, 0x1000);
    let deflate = GuestQueue::new(mem, 16, 0x4000);
    let mut reporting = GuestQueue::new(mem, 16, 0x8000);
    // Acked without reporting: two queues are enough, queue 2 is ignored.
    let mut dev = Balloon::new(true, true);
    dev.activate(activate_ctx(
        mem,
        vec![inflate.queue(), deflate.queue()],
        &irq,
        VIRTIO_F_VERSION_1 | features::DEFLATE_ON_OOM,
    ))
    .unwrap();
    fill_page(mem, 0x70000);
    reporting.write_desc(0, 0x70000, PAGE as u32, F_WRITE, 0);
    reporting.publish(0);
    dev.process_queue(queue::REPORTING).unwrap();
    assert_eq!(reporting.used_idx(), 0, "queue 2 is not the driver's");
    assert!(page_is_filled(mem, 0x70000));
    // Acked with reporting: queue 2 must be ready.
    dev.reset();
    let mut not_ready = reporting.queue();
    not_ready.set_ready(false);
    let err = dev
        .activate(activate_ctx(
            mem,
            vec![inflate.queue(), deflate.queue(), not_ready],
            &irq,
            ALL_FEATURES,
        ))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "Device activation failed: queue 2 is not ready"
    );
    assert!(!dev.is_activated());
}

#[test]
fn avail_index_too_far_ahead_is_a_device_error() {
    let guard = GuardedMemory::new();
    let mut r = rig(guard.mem());
    r.reporting.set_avail_idx(100);
    assert!(matches!(
        r.dev.process_queue(queue::REPORTING),
        Err(VirtioError::Queue(_))
    ));
    r.inflate.set_avail_idx(17);
    assert!(matches!(
        r.dev.process_inflate(),
        Err(VirtioError::Queue(_))
    ));
}

#[test]
fn the_driver_sees_densely_numbered_queues_over_mmio() {
    use crate::device_manager::bus::BusDevice;
    use crate::devices::virtio::mmio::{reg, MmioTransport};
    let guard = GuardedMemory::new();
    let dev: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(Balloon::new(true, true)));
    let mut t = MmioTransport::new(dev, guard.mem().clone(), test_interrupt()).unwrap();
    let read = |t: &mut MmioTransport, off| {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(read(&mut t, reg::DEVICE_ID), 5);
    let mut sizes = Vec::new();
    for q in 0..4u32 {
        t.write(reg::QUEUE_SEL, &q.to_le_bytes());
        sizes.push(read(&mut t, reg::QUEUE_NUM_MAX));
    }
    assert_eq!(
        sizes,
        [256, 256, 32, 0],
        "inflate, deflate, reporting, none"
    );
    assert_eq!(read(&mut t, reg::DEVICE_FEATURES), (1 << 2) | (1 << 5));
}

#[test]
fn fuzz_entry_points_balloon_survives_random_input() {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..300 {
        let len = (next() % 2048) as usize;
        let mut input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        // Bias descriptors towards the buffers and towards region edges.
        if round % 2 == 0 {
            for chunk in input.chunks_mut(16).skip(1).take(40) {
                if chunk.len() == 16 {
                    let addr = match next() % 4 {
                        0 => 0x10_0000 + (next() % 4096),
                        1 => (2 << 20) - 0x1000 * (next() % 3),
                        2 => (9 << 20) - 0x1000 * (next() % 3),
                        _ => next() & !0xfff,
                    };
                    chunk[..8].copy_from_slice(&addr.to_le_bytes());
                    chunk[8..12].copy_from_slice(&((next() % 3 + 1) as u32 * 0x1000).to_le_bytes());
                }
            }
        }
        fuzz_balloon(&input);
    }
}

#[test]
fn a_restored_balloon_keeps_its_queues_and_actual_and_tells_a_new_target() {
    let guard = GuardedMemory::new();
    let mut r = rig(guard.mem());
    r.dev.set_target_pages(300).unwrap();
    r.dev.write_config(4, &200u32.to_le_bytes()).unwrap();
    r.send_pfns(queue::INFLATE, 0, &[0x70]);
    let snap = r.dev.save_state().unwrap();
    assert_eq!(
        snap.balloon,
        Some(BalloonSnap {
            num_pages: 300,
            actual: 200
        })
    );
    assert_eq!(snap.queues.len(), 3, "inflate, deflate, reporting");
    assert_eq!(snap.queues[0].next_avail, 1);

    let restore = |target: u32| {
        let irq = test_interrupt();
        let mut dev = Balloon::new(true, true);
        dev.set_target_pages(target).unwrap();
        let ctx = activate_ctx(
            r.mem,
            vec![r.inflate.queue(), r.deflate.queue(), r.reporting.queue()],
            &irq,
            ALL_FEATURES,
        );
        dev.restore_state(&snap, Some(ctx)).unwrap();
        assert!(dev.is_activated());
        assert_eq!(dev.actual_pages(), 200, "the guest's word comes back");
        assert_eq!(dev.target_pages(), target, "the target is this VMM's");
        assert_eq!(irq.status(), 0, "nothing before the guest runs");
        dev.wake_after_restore().unwrap();
        (dev, irq)
    };
    // The same target: nothing to tell.
    let (mut dev, irq) = restore(300);
    assert_eq!(irq.status() & INT_CONFIG, 0);
    assert_eq!(dev.save_state().unwrap(), snap, "queues as they were");
    // Another target: the driver hears of it when it first runs.
    let (_, irq) = restore(100);
    assert_ne!(irq.status() & INT_CONFIG, 0);

    // A state without the balloon's section is refused.
    let mut other = snap.clone();
    other.balloon = None;
    let mut dev = Balloon::new(true, true);
    let err = dev.restore_state(&other, None).unwrap_err().to_string();
    assert!(err.contains("has no balloon section"), "{err}");
}

#[test]
fn a_balloon_without_reporting_acked_saves_its_unused_queue_too() {
    let guard = GuardedMemory::new();
    let mem = guard.mem();
    let qs = [
        GuestQueue::new(mem, 16, 0x1000),
        GuestQueue::new(mem, 16, 0x4000),
        GuestQueue::new(mem, 16, 0x8000),
    ];
    let mut dev = Balloon::new(true, true);
    dev.activate(activate_ctx(
        mem,
        qs.iter().map(GuestQueue::queue).collect(),
        &test_interrupt(),
        VIRTIO_F_VERSION_1,
    ))
    .unwrap();
    let snap = dev.save_state().unwrap();
    assert_eq!(snap.queues.len(), 3, "the transport's three queues");
}
