//! Device-level virtio-blk tests: the test is the guest driver (real guest
//! memory, real split queue) and the backend is a real temporary file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::test_utils::{
    activate_ctx, guest_memory, test_interrupt, GuestQueue, F_NEXT, F_WRITE, GUEST_MEM_SIZE,
};
use crate::devices::virtio::{Interrupt, VirtioDevice, VirtioError, INT_VRING, VIRTIO_F_VERSION_1};

const QSIZE: u16 = 16;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const STATUS: u64 = 0x30_0000;
/// Image size: 8 sectors.
const SECTORS: u64 = 8;

struct Rig<'a> {
    dev: Block,
    q: GuestQueue<'a>,
    mem: &'a GuestMemoryMmap,
    irq: Arc<Interrupt>,
    file: tempfile::NamedTempFile,
}

fn image() -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    let mut content = Vec::new();
    for s in 0..SECTORS {
        content.extend(std::iter::repeat_n(s as u8 + 0xa0, SECTOR_SIZE as usize));
    }
    f.write_all(&content).unwrap();
    f.flush().unwrap();
    f
}

fn rig_with(mem: &GuestMemoryMmap, read_only: bool, acked: u64) -> Rig<'_> {
    let file = image();
    let mut dev = Block::new(file.path(), read_only, "boxlite-disk-0").unwrap();
    let q = GuestQueue::new(mem, QSIZE, 0x1000);
    let irq = test_interrupt();
    dev.activate(activate_ctx(mem, vec![q.queue()], &irq, acked))
        .unwrap();
    Rig {
        dev,
        q,
        mem,
        irq,
        file,
    }
}

fn rig(mem: &GuestMemoryMmap) -> Rig<'_> {
    rig_with(mem, false, VIRTIO_F_VERSION_1 | features::FLUSH)
}

impl Rig<'_> {
    fn write_header(&self, at: u64, t: u32, sector: u64) {
        let mut h = Vec::new();
        h.extend_from_slice(&t.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Publishes a chain of (addr, len, flags) starting at descriptor
    /// `first`, runs the queue, and returns (used len, status byte).
    fn submit(&mut self, first: u16, descs: &[(u64, u32, u16)]) -> (u32, u8) {
        self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let f = if i + 1 < descs.len() {
                flags | F_NEXT
            } else {
                *flags
            };
            self.q.write_desc(idx, *addr, *len, f, idx + 1);
        }
        self.q.publish(first);
        let before = self.q.used_idx();
        self.dev.process_queue(0).unwrap();
        assert_eq!(self.q.used_idx(), before.wrapping_add(1), "one chain used");
        let (id, len) = self.q.used_elem(before);
        assert_eq!(id, u32::from(first));
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap();
        (len, status)
    }

    /// A standard request: header, one data descriptor, status.
    fn request(&mut self, t: u32, sector: u64, data_len: u32, data_write: bool) -> (u32, u8) {
        self.write_header(HDR, t, sector);
        let df = if data_write { F_WRITE } else { 0 };
        if data_len == 0 {
            self.submit(0, &[(HDR, 16, 0), (STATUS, 1, F_WRITE)])
        } else {
            self.submit(
                0,
                &[(HDR, 16, 0), (DATA, data_len, df), (STATUS, 1, F_WRITE)],
            )
        }
    }

    fn guest_data(&self, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        b
    }

    fn file_bytes(&self) -> Vec<u8> {
        let mut f = std::fs::File::open(self.file.path()).unwrap();
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    fn metric(&self, f: impl Fn(&BlockMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
        BlockMetrics::get(f(&self.dev.metrics))
    }
}

#[test]
fn features_config_space_and_queue() {
    let f = image();
    let dev = Block::new(f.path(), false, "x").unwrap();
    assert_eq!(dev.device_type(), 2);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE]);
    let want = VIRTIO_F_VERSION_1
        | features::FLUSH
        | features::SEG_MAX
        | features::SIZE_MAX
        | features::BLK_SIZE;
    assert_eq!(dev.avail_features(), want);
    let ro = Block::new(f.path(), true, "x").unwrap();
    assert_eq!(ro.avail_features(), want | features::RO);

    let mut cfg = [0xffu8; 32];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg[0..8].try_into().unwrap()), SECTORS);
    assert_eq!(u32::from_le_bytes(cfg[8..12].try_into().unwrap()), SIZE_MAX);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), SEG_MAX);
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    assert_eq!(&cfg[24..], &[0u8; 8], "past the end reads 0");
    let mut b = [0xffu8; 4];
    dev.read_config(u64::MAX - 1, &mut b);
    assert_eq!(b, [0; 4]);
    let mut dev = dev;
    assert!(matches!(
        dev.write_config(0, &[1]),
        Err(VirtioError::ReadOnlyConfig { .. })
    ));
    assert!(matches!(
        dev.process_queue(1),
        Err(VirtioError::BadQueueIndex(1))
    ));
    assert!(!dev.process_requests().unwrap(), "inactive: nothing to do");
}

#[test]
fn construction_errors() {
    let f = image();
    assert!(matches!(
        Block::new(f.path(), false, &"x".repeat(21)),
        Err(BlockError::IdTooLong(_))
    ));
    Block::new(f.path(), false, &"x".repeat(20)).unwrap();
    assert!(matches!(
        Block::new(std::path::Path::new("/nonexistent/disk.img"), true, ""),
        Err(BlockError::Open(..))
    ));
}

#[test]
fn read_sectors() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    let (len, status) = r.request(req_type::IN, 2, 1024, true);
    assert_eq!((len, status), (1025, blk_status::OK));
    let d = r.guest_data(1024);
    assert!(d[..512].iter().all(|b| *b == 0xa2));
    assert!(d[512..].iter().all(|b| *b == 0xa3));
    assert_ne!(r.irq.status() & INT_VRING, 0);
    assert_eq!(r.metric(|m| &m.reads), 1);
    assert_eq!(r.metric(|m| &m.read_bytes), 1024);
}

#[test]
fn read_scattered_segments() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    r.write_header(HDR, req_type::IN, 0);
    let (len, status) = r.submit(
        3,
        &[
            (HDR, 16, 0),
            (DATA, 512, F_WRITE),
            (DATA + 0x1_0000, 1024, F_WRITE),
            (STATUS, 1, F_WRITE),
        ],
    );
    assert_eq!((len, status), (1537, blk_status::OK));
    let mut b = vec![0u8; 1024];
    mem.read_slice(&mut b, GuestAddress(DATA + 0x1_0000))
        .unwrap();
    assert!(b[..512].iter().all(|x| *x == 0xa1));
    assert!(b[512..].iter().all(|x| *x == 0xa2));
}

#[test]
fn write_then_read_back_and_flush() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    let pattern: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
    mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
    let (len, status) = r.request(req_type::OUT, 5, 1024, false);
    assert_eq!((len, status), (1, blk_status::OK));
    let file = r.file_bytes();
    assert_eq!(&file[5 * 512..7 * 512], &pattern[..]);
    assert!(
        file[4 * 512..5 * 512].iter().all(|b| *b == 0xa4),
        "neighbour untouched"
    );
    assert!(file[7 * 512..].iter().all(|b| *b == 0xa7));
    // Read it back through the device.
    mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.request(req_type::IN, 5, 1024, true),
        (1025, blk_status::OK)
    );
    assert_eq!(r.guest_data(1024), pattern);
    assert_eq!(r.request(req_type::FLUSH, 0, 0, false), (1, blk_status::OK));
    assert_eq!(r.metric(|m| &m.writes), 1);
    assert_eq!(r.metric(|m| &m.write_bytes), 1024);
    assert_eq!(r.metric(|m| &m.flushes), 1);
    assert_eq!(r.metric(|m| &m.io_errors), 0);
}

#[test]
fn write_through_without_flush_feature() {
    let mem = guest_memory();
    let mut r = rig_with(&mem, false, VIRTIO_F_VERSION_1);
    mem.write_slice(&[7u8; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(r.request(req_type::OUT, 0, 512, false), (1, blk_status::OK));
    assert!(r.file_bytes()[..512].iter().all(|b| *b == 7));
}

#[test]
fn get_id_returns_the_serial() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    mem.write_slice(&[0xffu8; 32], GuestAddress(DATA)).unwrap();
    let (len, status) = r.request(req_type::GET_ID, 0, 20, true);
    assert_eq!((len, status), (21, blk_status::OK));
    let d = r.guest_data(32);
    assert_eq!(&d[..14], b"boxlite-disk-0");
    assert_eq!(&d[14..20], &[0u8; 6], "NUL padded");
    assert_eq!(&d[20..], &[0xffu8; 12], "nothing past 20 bytes");
    // A shorter buffer gets a prefix.
    let (len, _) = r.request(req_type::GET_ID, 0, 4, true);
    assert_eq!(len, 5);
    assert_eq!(r.metric(|m| &m.get_ids), 2);
}

#[test]
fn read_only_disk_refuses_writes() {
    let mem = guest_memory();
    let mut r = rig_with(
        &mem,
        true,
        VIRTIO_F_VERSION_1 | features::FLUSH | features::RO,
    );
    let before = r.file_bytes();
    mem.write_slice(&[0x55u8; 512], GuestAddress(DATA)).unwrap();
    assert_eq!(
        r.request(req_type::OUT, 0, 512, false),
        (1, blk_status::IOERR)
    );
    assert_eq!(r.file_bytes(), before, "image untouched");
    // Reads, flush and get-id still work.
    assert_eq!(r.request(req_type::IN, 0, 512, true), (513, blk_status::OK));
    assert_eq!(r.request(req_type::FLUSH, 0, 0, false), (1, blk_status::OK));
    assert_eq!(r.metric(|m| &m.io_errors), 1);
}

#[test]
fn out_of_range_and_spanning_requests_do_no_io() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    let before = r.file_bytes();
    mem.write_slice(&[0x33u8; 1024], GuestAddress(DATA))
        .unwrap();
    // Entirely beyond the end.
    assert_eq!(
        r.request(req_type::IN, SECTORS, 512, true),
        (1, blk_status::IOERR)
    );
    assert_eq!(
        r.request(req_type::OUT, SECTORS, 512, false),
        (1, blk_status::IOERR)
    );
    // Spanning the end: last sector + one more.
    assert_eq!(
        r.request(req_type::OUT, SECTORS - 1, 1024, false),
        (1, blk_status::IOERR)
    );
    assert_eq!(
        r.request(req_type::IN, SECTORS - 1, 1024, true),
        (1, blk_status::IOERR)
    );
    assert_eq!(
        r.guest_data(1024),
        vec![0x33u8; 1024],
        "no data read into the guest"
    );
    // Sector arithmetic that overflows.
    assert_eq!(
        r.request(req_type::IN, u64::MAX, 512, true),
        (1, blk_status::IOERR)
    );
    assert_eq!(
        r.request(req_type::OUT, u64::MAX / 512 + 1, 512, false),
        (1, blk_status::IOERR)
    );
    assert_eq!(r.file_bytes(), before, "image untouched");
    // The last sector itself is fine.
    assert_eq!(
        r.request(req_type::IN, SECTORS - 1, 512, true),
        (513, blk_status::OK)
    );
    assert_eq!(r.metric(|m| &m.io_errors), 6);
}

#[test]
fn unsupported_type_and_bad_sizes() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    // DISCARD (11) and a nonsense type.
    assert_eq!(r.request(11, 0, 16, false), (1, blk_status::UNSUPP));
    assert_eq!(r.request(0xdead_beef, 0, 0, false), (1, blk_status::UNSUPP));
    assert_eq!(r.metric(|m| &m.unsupported), 2);
    // Not a multiple of 512.
    assert_eq!(
        r.request(req_type::IN, 0, 100, true),
        (1, blk_status::IOERR)
    );
    // A segment above size_max.
    assert_eq!(
        r.request(req_type::IN, 0, SIZE_MAX + 512, true),
        (1, blk_status::IOERR)
    );
}

#[test]
fn hostile_chains_fail_alone() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    let before = r.file_bytes();
    mem.write_slice(&[0x44u8; 512], GuestAddress(DATA)).unwrap();

    // Data direction wrong: IN with a read-only data buffer, OUT with a
    // write-only one. Status is usable → IOERR, no I/O.
    r.write_header(HDR, req_type::IN, 0);
    assert_eq!(
        r.submit(0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, F_WRITE)]),
        (1, blk_status::IOERR)
    );
    assert_eq!(r.guest_data(512), vec![0x44u8; 512]);
    r.write_header(HDR, req_type::OUT, 0);
    assert_eq!(
        r.submit(
            0,
            &[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)]
        ),
        (1, blk_status::IOERR)
    );
    // Data buffer outside guest memory, and one whose address overflows.
    r.write_header(HDR, req_type::IN, 0);
    assert_eq!(
        r.submit(
            0,
            &[
                (HDR, 16, 0),
                (GUEST_MEM_SIZE - 256, 512, F_WRITE),
                (STATUS, 1, F_WRITE)
            ]
        ),
        (1, blk_status::IOERR)
    );
    assert_eq!(
        r.submit(
            0,
            &[
                (HDR, 16, 0),
                (u64::MAX - 100, 512, F_WRITE),
                (STATUS, 1, F_WRITE)
            ]
        ),
        (1, blk_status::IOERR)
    );
    // Oversized length (nearly 4 GiB).
    assert_eq!(
        r.submit(
            0,
            &[
                (HDR, 16, 0),
                (DATA, u32::MAX - 32, F_WRITE),
                (STATUS, 1, F_WRITE)
            ]
        ),
        (1, blk_status::IOERR)
    );
    // A chain longer than 4 GiB in total: the queue stops iterating it
    // before the status descriptor, so the chain fails alone (length 0).
    assert_eq!(
        r.submit(
            0,
            &[
                (HDR, 16, 0),
                (DATA, u32::MAX, F_WRITE),
                (STATUS, 1, F_WRITE)
            ]
        ),
        (0, 0xee)
    );

    // No usable status byte → used length 0, nothing written.
    // Status descriptor read-only:
    r.write_header(HDR, req_type::OUT, 0);
    assert_eq!(
        r.submit(0, &[(HDR, 16, 0), (DATA, 512, 0), (STATUS, 1, 0)])
            .0,
        0
    );
    // Status missing (the chain ends with the data buffer, read-only):
    assert_eq!(r.submit(0, &[(HDR, 16, 0), (DATA, 512, 0)]).0, 0);
    // Header only:
    assert_eq!(r.submit(0, &[(HDR, 16, 0)]).0, 0);
    // Status of length 0, and outside guest memory:
    assert_eq!(r.submit(0, &[(HDR, 16, 0), (STATUS, 0, F_WRITE)]).0, 0);
    assert_eq!(
        r.submit(0, &[(HDR, 16, 0), (GUEST_MEM_SIZE, 1, F_WRITE)]).0,
        0
    );
    // Header too short, write-only, outside guest memory.
    assert_eq!(r.submit(0, &[(HDR, 8, 0), (STATUS, 1, F_WRITE)]).0, 0);
    assert_eq!(
        r.submit(0, &[(HDR, 16, F_WRITE), (STATUS, 1, F_WRITE)]).0,
        0
    );
    assert_eq!(
        r.submit(0, &[(GUEST_MEM_SIZE - 8, 16, 0), (STATUS, 1, F_WRITE)])
            .0,
        0
    );
    // A looping chain (descriptor 5 → 5): ends at the TTL, no status.
    r.q.write_desc(5, HDR, 16, F_NEXT, 5);
    r.q.publish(5);
    r.dev.process_queue(0).unwrap();
    // Next index beyond the queue size.
    r.q.write_desc(6, HDR, 16, F_NEXT, 200);
    r.q.publish(6);
    r.dev.process_queue(0).unwrap();
    assert_eq!(r.file_bytes(), before, "image untouched");
    assert_eq!(r.metric(|m| &m.bad_chains), 11);
    assert_eq!(r.metric(|m| &m.io_errors), 5);

    // The queue still works.
    assert_eq!(r.request(req_type::IN, 1, 512, true), (513, blk_status::OK));
    assert!(r.guest_data(512).iter().all(|b| *b == 0xa1));
}

#[test]
fn too_many_segments_is_an_error() {
    let mem = guest_memory();
    let q = GuestQueue::new(&mem, 256, 0x1000);
    let file = image();
    let mut dev = Block::new(file.path(), false, "").unwrap();
    let irq = test_interrupt();
    dev.activate(activate_ctx(
        &mem,
        vec![q.queue()],
        &irq,
        VIRTIO_F_VERSION_1,
    ))
    .unwrap();
    let mut q = q;
    let mut h = Vec::new();
    h.extend_from_slice(&req_type::IN.to_le_bytes());
    h.extend_from_slice(&[0u8; 12]);
    mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    // Header + (SEG_MAX + 1) zero-length... no: 512-byte segments + status.
    let n = SEG_MAX as u16 + 1;
    q.write_desc(0, HDR, 16, F_NEXT, 1);
    for i in 1..=n {
        q.write_desc(i, DATA, 512, F_WRITE | F_NEXT, i + 1);
    }
    q.write_desc(n + 1, STATUS, 1, F_WRITE, 0);
    q.publish(0);
    dev.process_queue(0).unwrap();
    let (_, len) = q.used_elem(0);
    assert_eq!(len, 0, "the status is not where we look: chain fails alone");
    assert_eq!(BlockMetrics::get(&dev.metrics.bad_chains), 1);
}

#[test]
fn avail_index_too_far_ahead_is_a_device_error() {
    let mem = guest_memory();
    let r = rig(&mem);
    r.q.set_avail_idx(100);
    let mut dev = r.dev;
    assert!(matches!(dev.process_requests(), Err(VirtioError::Queue(_))));
}

#[test]
fn reset_and_reactivate() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    r.dev.reset();
    assert!(!r.dev.is_activated());
    assert!(!r.dev.process_requests().unwrap());
    let q = GuestQueue::new(&mem, QSIZE, 0x8000);
    r.dev
        .activate(activate_ctx(
            &mem,
            vec![q.queue()],
            &r.irq,
            VIRTIO_F_VERSION_1,
        ))
        .unwrap();
    assert!(r.dev.is_activated());
    let mut unready = q.queue();
    virtio_queue::QueueT::set_ready(&mut unready, false);
    r.dev.reset();
    assert!(matches!(
        r.dev.activate(activate_ctx(
            &mem,
            vec![unready],
            &r.irq,
            VIRTIO_F_VERSION_1
        )),
        Err(VirtioError::Activate(_))
    ));
}
