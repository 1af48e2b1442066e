//! Test helpers: guest memory and a guest-side split virtqueue driver that
//! writes descriptors and rings straight into guest memory, the way a
//! guest driver would, so tests can also write hostile layouts.
#![allow(clippy::unwrap_used, missing_docs)]

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    device_type, ActivateContext, Interrupt, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1,
};

/// Size of the test guest memory.
pub const GUEST_MEM_SIZE: u64 = 4 << 20;
/// VIRTQ_DESC_F_NEXT.
pub const F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE.
pub const F_WRITE: u16 = 2;

/// A virtio-mmio transport over a fresh [`MockDevice`].
pub fn mock_transport() -> (super::mmio::MmioTransport, Arc<Mutex<MockDevice>>) {
    let dev = Arc::new(Mutex::new(MockDevice::new()));
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("evt")));
    let t = super::mmio::MmioTransport::new(dev.clone(), guest_memory(), irq).expect("transport");
    (t, dev)
}

/// A 32-bit read of a transport register, as a vCPU makes it.
pub fn mmio_read(t: &mut super::mmio::MmioTransport, offset: u64) -> u32 {
    use crate::device_manager::bus::BusDevice;
    let mut b = [0u8; 4];
    t.read(offset, &mut b);
    u32::from_le_bytes(b)
}

/// A 32-bit write of a transport register, as a vCPU makes it.
pub fn mmio_write(t: &mut super::mmio::MmioTransport, offset: u64, value: u32) {
    use crate::device_manager::bus::BusDevice;
    t.write(offset, &value.to_le_bytes());
}

/// The driver's feature handshake up to FEATURES_OK, acking VERSION_1.
pub fn mmio_negotiate(t: &mut super::mmio::MmioTransport) {
    use super::mmio::reg;
    use super::status::{ACKNOWLEDGE, DRIVER, FEATURES_OK};
    mmio_write(t, reg::STATUS, ACKNOWLEDGE);
    mmio_write(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
    mmio_write(t, reg::DRIVER_FEATURES_SEL, 1);
    mmio_write(t, reg::DRIVER_FEATURES, 1); // VERSION_1
    mmio_write(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

/// Guest memory for device tests.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), GUEST_MEM_SIZE as usize)])
        .expect("test guest memory")
}

/// A device's interrupt line on a fresh non-blocking eventfd.
pub fn test_interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()))
}

/// What the transport passes at DRIVER_OK: guest memory `mem`, the
/// device-side `queues` (as [`GuestQueue::queue`] gives them), the line
/// `irq` and the `acked` features.
pub fn activate_ctx(
    mem: &GuestMemoryMmap,
    queues: Vec<Queue>,
    irq: &Arc<Interrupt>,
    acked: u64,
) -> ActivateContext {
    ActivateContext {
        mem: mem.clone(),
        queues,
        interrupt: irq.clone(),
        acked_features: acked,
    }
}

/// A split virtqueue as the guest driver sees it.
pub struct GuestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
}

impl<'a> GuestQueue<'a> {
    /// Lays out the descriptor table at `base`, then the avail and used rings.
    pub fn new(mem: &'a GuestMemoryMmap, size: u16, base: u64) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        let q = GuestQueue {
            mem,
            size,
            desc,
            avail,
            used,
            avail_idx: 0,
        };
        mem.write_slice(
            &vec![0u8; (used + 6 + 8 * u64::from(size) - base) as usize],
            GuestAddress(base),
        )
        .unwrap();
        q
    }

    pub fn mem(&self) -> &GuestMemoryMmap {
        self.mem
    }

    /// Writes descriptor `idx`.
    pub fn write_desc(&self, idx: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = GuestAddress(self.desc + 16 * u64::from(idx));
        self.mem.write_obj(addr, a).unwrap();
        self.mem.write_obj(len, a.unchecked_add(8)).unwrap();
        self.mem.write_obj(flags, a.unchecked_add(12)).unwrap();
        self.mem.write_obj(next, a.unchecked_add(14)).unwrap();
    }

    /// Makes chain `head` available.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Writes avail.idx directly (hostile tests).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// used.idx.
    pub fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used element `i` as (id, len).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let a = self.used + 4 + 8 * u64::from(i % self.size);
        (
            self.mem.read_obj(GuestAddress(a)).unwrap(),
            self.mem.read_obj(GuestAddress(a + 4)).unwrap(),
        )
    }

    /// The device-side queue as the transport would configure it.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// (desc, avail, used) addresses.
    pub fn addrs(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }
}

/// A device that records what the transport did to it.
pub struct MockDevice {
    pub activated: bool,
    pub acked: u64,
    pub processed: Vec<u16>,
}

impl MockDevice {
    pub fn new() -> Self {
        MockDevice {
            activated: false,
            acked: 0,
            processed: Vec::new(),
        }
    }
}

impl Default for MockDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        self.activated = true;
        self.acked = ctx.acked_features;
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.activated
    }
    fn reset(&mut self) {
        self.activated = false;
    }
    fn process_queue(&mut self, index: u16) -> Result<(), VirtioError> {
        self.processed.push(index);
        Ok(())
    }
}

// Guest memory whose host mapping has canaries around every region, for
// the tests and fuzz targets that must show a device never touches host
// memory next to guest RAM (balloon discards, block and vsock copies): a
// stray access past a region's end lands on a canary, not on unrelated
// VMM memory where nothing would notice.

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
        // One slice comparison per canary, not a byte loop: under the
        // fuzzer every comparison in a loop is a coverage callback.
        const INTACT: [u8; CANARY_LEN] = [CANARY_BYTE; CANARY_LEN];
        self.canaries.iter().all(|&c| {
            // SAFETY: as in fill_canaries; read only.
            let s = unsafe { std::slice::from_raw_parts(self.base.add(c), CANARY_LEN) };
            s == INTACT
        })
    }

    /// Zeroes guest memory and refills the canaries (the fuzz target's
    /// fresh start for each input).
    pub fn reset(&self) {
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

/// A fuzz input decoded front to back into operations. Once it runs out
/// every read gives 0, so the last operation of a short input still
/// decodes to something (if dull) instead of being dropped.
pub struct FuzzInput<'a> {
    data: &'a [u8],
}

impl<'a> FuzzInput<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        FuzzInput { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (b, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        b
    }

    fn le<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let b = self.bytes(N);
        a[..b.len()].copy_from_slice(b);
        a
    }

    pub fn u8(&mut self) -> u8 {
        self.le::<1>()[0]
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.le())
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.le())
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.le())
    }
}

/// Where fuzz inputs put buffer memory.
pub const FUZZ_BUFFERS: u64 = 0x10_0000;

/// Lays out a guest queue from fuzz input, the way a hostile driver
/// could: the first byte is the avail index the guest claims, then 16
/// bytes per descriptor of the table, then 2 bytes per avail ring entry
/// (as much of each as the input has). Returns the rest of the input.
pub fn fuzz_lay_out_queue<'i>(gq: &GuestQueue<'_>, input: &'i [u8]) -> Option<&'i [u8]> {
    let (&avail_idx, rest) = input.split_first()?;
    let size = usize::from(gq.size);
    let (table, rest) = rest.split_at(rest.len().min(16 * size));
    let (ring, rest) = rest.split_at(rest.len().min(2 * size));
    let (desc, avail, _) = gq.addrs();
    gq.mem().write_slice(table, GuestAddress(desc)).ok()?;
    gq.mem().write_slice(ring, GuestAddress(avail + 4)).ok()?;
    gq.set_avail_idx(u16::from(avail_idx));
    Some(rest)
}

/// Writes (up to 1 MiB of) fuzz input as buffer memory at [`FUZZ_BUFFERS`].
pub fn fuzz_fill_buffers(mem: &GuestMemoryMmap, data: &[u8]) -> Option<()> {
    mem.write_slice(
        &data[..data.len().min(0x10_0000)],
        GuestAddress(FUZZ_BUFFERS),
    )
    .ok()
}

/// Fuzzing entry point for virtqueue handling: the first byte is the avail
/// index the "guest" claims, the next 16 × 16 bytes the descriptor table,
/// then 16 × 2 bytes of avail ring entries, the rest buffer memory at
/// 0x10_0000. Every chain the queue yields is parsed as a virtio-blk
/// request. Must never panic and never touch memory outside the guest.
pub fn fuzz_virtqueue(input: &[u8]) {
    const QSIZE: u16 = 16;
    let mem = guest_memory();
    let gq = GuestQueue::new(&mem, QSIZE, 0x1000);
    let Some(rest) = fuzz_lay_out_queue(&gq, input) else {
        return;
    };
    if fuzz_fill_buffers(&mem, rest).is_none() {
        return;
    }
    let mut q = gq.queue();
    // An avail index beyond the queue size yields nothing, not a panic.
    for _ in 0..QSIZE {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let _ = super::block::request::parse(&mem, head, chain);
    }
}

/// Fuzzing entry point for the virtio-mmio register state machine: the
/// input is a sequence of 7-byte guest accesses — a kind byte (even: a
/// read, odd: a write; bit 1 picks a 1-byte access instead of 4), a 16-bit
/// register offset and a 32-bit value — played against a transport over a
/// [`MockDevice`] (one queue), so feature negotiation, queue set-up,
/// status changes (activation, reset, FAILED) and notifications happen in
/// any order the guest likes. Must never panic.
pub fn fuzz_mmio(input: &[u8]) {
    use crate::device_manager::bus::BusDevice;
    use std::sync::Mutex;

    let device: Arc<Mutex<dyn VirtioDevice>> = Arc::new(Mutex::new(MockDevice::new()));
    let Ok(mut transport) =
        super::mmio::MmioTransport::new(device, guest_memory(), test_interrupt())
    else {
        return;
    };
    for access in input.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([access[1], access[2]]) % 0x200);
        let value = [access[3], access[4], access[5], access[6]];
        let width = if access[0] & 2 == 0 { 4 } else { 1 };
        if access[0] & 1 == 0 {
            let mut data = [0u8; 4];
            transport.read(offset, &mut data[..width]);
        } else {
            transport.write(offset, &value[..width]);
        }
    }
}

#[cfg(test)]
mod fuzz_smoke {
    /// The fuzz targets' entry points on a bounded set of pseudo-random
    /// inputs (xorshift), so plain `cargo test` covers them on stable.
    #[test]
    fn fuzz_entry_points_survive_random_input() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..300 {
            let len = (next() % 1024) as usize;
            let mut input: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Bias descriptors towards valid addresses now and then.
            if round % 3 == 0 {
                for chunk in input.chunks_mut(16).skip(1).take(8) {
                    if chunk.len() == 16 {
                        chunk[..8].copy_from_slice(&(0x10_0000u64 + (next() % 4096)).to_le_bytes());
                        chunk[8..12].copy_from_slice(&((next() % 600) as u32).to_le_bytes());
                    }
                }
            }
            super::fuzz_virtqueue(&input);
            super::fuzz_mmio(&input);
            super::super::net::fuzz::fuzz_net(&input);
            crate::devices::virtio::vsock::packet::fuzz_parse_chain(&input);
            super::super::block::fuzz::fuzz_block(&input);
            super::super::vsock::fuzz::fuzz_muxer(&input);
        }
    }
}
