//! Fuzzing entry point for virtio-blk request execution (cargo-fuzz target
//! `block`, and the stable smoke test in `test_utils`).
//!
//! The `virtqueue` target only parses chains; this one runs them against a
//! real backing file of a few sectors, one request at a time, and checks
//! every request against a model of what a correct device may do:
//!
//! - the chain the device sees is read with the same queue code from the
//!   same guest memory (so indirect tables, loops and truncation need no
//!   model of their own);
//! - a chain returned with used length 0 changed nothing, neither guest
//!   memory nor the disk;
//! - otherwise the status byte (at the last descriptor) is OK, IOERR or
//!   UNSUPP; OK only for a request that was valid (direction, alignment,
//!   range, not a write to a read-only disk); an IN that succeeded put the
//!   disk's bytes into its segments in order, a GET_ID the serial, an OUT
//!   the segments' bytes on the disk; nothing else in the watched guest
//!   memory changed (the guest regions' edges and the area straddling the
//!   A|B boundary, where descriptors point);
//! - the file keeps its length (the device never extends an image) and
//!   equals the model disk after every request: a read-only device never
//!   changes it, and the bytes of a last partial sector are never touched;
//! - the canaries around the guest regions are intact after each input.

use std::cell::OnceCell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::request::RequestHeader;
use super::{blk_status, features, req_type, Block, ID_BYTES, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX};
use crate::devices::virtio::test_utils::{
    activate_ctx, test_interrupt, FuzzInput, GuardedMemory, GuestQueue, F_NEXT, F_WRITE, REGIONS,
};
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

/// Where the request queue lives (descriptor table, avail and used ring).
const QUEUE_BASE: u64 = 0x1000;
/// End of the queue's memory for [`QUEUE_SIZE`] entries (rounded up).
const QUEUE_END: u64 = 0x3000;
/// `VIRTQ_DESC_F_INDIRECT`.
const F_INDIRECT: u16 = 4;
/// Descriptors the device reads per chain (header, `SEG_MAX` data, status,
/// and one more to see that there are too many), as `request::parse` does.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 3;
/// Request types the device does not implement but Linux may send.
const DISCARD: u32 = 11;
const WRITE_ZEROES: u32 = 13;
/// Image sizes an input can pick: empty, whole sectors, and sizes with a
/// last partial sector the guest must never see or change.
const DISK_SIZES: [u64; 5] = [0, 512, 2048, 2048 + 200, 4096 - 1];

/// The guest-physical ranges whose every byte is checked after each
/// request. Descriptors mostly point into them.
fn watched() -> [(u64, u64); 3] {
    let a_end = REGIONS[0].0 + REGIONS[0].1 as u64;
    let b_end = REGIONS[1].0 + REGIONS[1].1 as u64;
    let c_end = REGIONS[2].0 + REGIONS[2].1 as u64;
    [
        // Straddles the A|B boundary: adjacent guest-physical addresses
        // whose host mappings are not adjacent.
        (a_end - 0x8000, 0x1_0000),
        // The end of B, followed by a hole in guest-physical space.
        (b_end - 0x2000, 0x2000),
        // The end of guest RAM.
        (c_end - 0x2000, 0x2000),
    ]
}

/// What the watched guest memory should hold.
struct Model {
    areas: Vec<(u64, Vec<u8>)>,
}

impl Model {
    fn snapshot(mem: &GuestMemoryMmap) -> Self {
        let areas = watched()
            .iter()
            .map(|&(start, len)| {
                let mut b = vec![0u8; len as usize];
                mem.read_slice(&mut b, GuestAddress(start))
                    .expect("watched areas lie in guest RAM");
                (start, b)
            })
            .collect();
        Model { areas }
    }

    /// The model of a device write of `bytes` at `addr`.
    fn write(&mut self, addr: u64, bytes: &[u8]) {
        let end = addr.saturating_add(bytes.len() as u64);
        for (start, buf) in &mut self.areas {
            let a_end = *start + buf.len() as u64;
            let lo = addr.max(*start);
            let hi = end.min(a_end);
            if lo < hi {
                let src = &bytes[(lo - addr) as usize..(hi - addr) as usize];
                buf[(lo - *start) as usize..(hi - *start) as usize].copy_from_slice(src);
            }
        }
    }

    /// Panics at the first watched byte the device changed unlike the model.
    fn check(&self, mem: &GuestMemoryMmap, what: &str) {
        for (start, want) in &self.areas {
            let mut got = vec![0u8; want.len()];
            mem.read_slice(&mut got, GuestAddress(*start))
                .expect("watched areas lie in guest RAM");
            // Slice comparison first: a byte loop would cost the fuzzer a
            // coverage callback per byte.
            if got == *want {
                continue;
            }
            if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
                panic!(
                    "{what}: guest byte {:#x} is {:#04x}, the model says {:#04x}",
                    *start + i as u64,
                    got[i],
                    want[i]
                );
            }
        }
    }
}

/// The backing file: a path on tmpfs when there is one (FLUSH and the
/// write-through `fdatasync` then cost nothing), one per thread.
fn disk_path() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.join(format!("boxlite-blk-fuzz-{}-{n}", std::process::id()))
}

struct Disk {
    path: PathBuf,
}

impl Drop for Disk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

thread_local! {
    static FUZZ_MEMORY: OnceCell<GuardedMemory> = const { OnceCell::new() };
    static FUZZ_DISK: Disk = Disk { path: disk_path() };
}

/// Fuzzing entry point. The first byte picks the image size (bits 0–2, of
/// [`DISK_SIZES`]), a read-only device (bit 3), whether the driver acks
/// FLUSH (bit 4) and a short serial (bit 5); the next 4 bytes seed the
/// contents of the disk and of the watched guest memory. Then each request
/// is: a byte whose bits 0–2 pick the type (IN, OUT, FLUSH, GET_ID,
/// DISCARD, WRITE_ZEROES, any 32-bit value, IN), bit 3 a raw 64-bit sector
/// (else one byte: a few sectors past the end at most), bits 4–7 the number
/// of descriptors (15: one byte more gives 100–159, around the segment
/// limit); then per descriptor an address (see `decode_addr`) and a byte
/// of flags and length class (see `decode_desc`). The header is written
/// at the first descriptor's address. Must never panic; see the module
/// docs for what is checked.
pub fn fuzz_block(input: &[u8]) {
    FUZZ_MEMORY.with(|cell| {
        let guard = cell.get_or_init(GuardedMemory::new);
        guard.reset();
        FUZZ_DISK.with(|disk| run_input(guard.mem(), &disk.path, input));
        assert!(
            guard.canaries_intact(),
            "virtio-blk touched host memory outside guest RAM"
        );
    });
}

/// `len` pseudo-random bytes from `seed` (eight per step: filling the
/// watched areas must stay cheap next to the requests themselves).
fn random_bytes(seed: &mut u64, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize + 8);
    while (v.len() as u64) < len {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        v.extend_from_slice(&seed.to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

/// Runs one input; returns how many requests completed with status OK (so
/// tests can show that the checks above ran on real I/O).
fn run_input(mem: &GuestMemoryMmap, path: &std::path::Path, input: &[u8]) -> usize {
    let mut inp = FuzzInput::new(input);
    let flags = inp.u8();
    let mut seed = u64::from(inp.u32()) | 1 << 40;
    let size = DISK_SIZES[usize::from(flags & 7) % DISK_SIZES.len()];
    let read_only = flags & 8 != 0;
    let mut acked = VIRTIO_F_VERSION_1;
    if flags & 16 != 0 {
        acked |= features::FLUSH;
    }
    let id = if flags & 32 != 0 {
        "d"
    } else {
        // Exactly ID_BYTES long: no NUL terminator.
        "boxlite-fuzz-disk-01"
    };

    let mut disk = random_bytes(&mut seed, size);
    std::fs::write(path, &disk).expect("write the fuzz image");
    for (start, len) in watched() {
        mem.write_slice(&random_bytes(&mut seed, len), GuestAddress(start))
            .expect("watched areas lie in guest RAM");
    }

    let mut dev = Block::new(path, read_only, id).expect("open the fuzz image");
    let capacity = dev.capacity();
    let mut gq = GuestQueue::new(mem, QUEUE_SIZE, QUEUE_BASE);
    let irq = test_interrupt();
    dev.activate(activate_ctx(mem, vec![gq.queue()], &irq, acked))
        .expect("activate");
    // The device's view of the queue, replayed on the harness's side.
    let mut shadow = gq.queue();
    let file = File::open(path).expect("reopen the fuzz image");
    let mut idb = [0u8; ID_BYTES];
    idb[..id.len()].copy_from_slice(id.as_bytes());

    let mut requests = 0;
    let mut ok = 0;
    while !inp.is_empty() && requests < 64 {
        requests += 1;
        let Some(status) = one_request(
            mem,
            &mut inp,
            &mut dev,
            &mut gq,
            &mut shadow,
            &mut disk,
            &idb,
            read_only,
            capacity,
        ) else {
            break;
        };
        if status == Some(blk_status::OK) {
            ok += 1;
        }
        let mut now = vec![0u8; disk.len() + 1];
        let n = file.read_at(&mut now, 0).expect("read back the image");
        assert_eq!(n, disk.len(), "the device changed the image's length");
        if now[..n] != disk[..] {
            let i = now.iter().zip(&disk).position(|(a, b)| a != b).unwrap_or(0);
            panic!(
                "image byte {i} is {:#04x}, the model says {:#04x} (read-only: {read_only}, capacity {capacity} sectors, size {size})",
                now[i], disk[i]
            );
        }
    }
    ok
}

/// A descriptor address: mostly somewhere in the area straddling the A|B
/// boundary, sometimes just before the end of B or of guest RAM (so that
/// buffers run past it), sometimes any 64-bit value.
fn decode_addr(inp: &mut FuzzInput<'_>) -> u64 {
    let [ab, b_end, c_end] = watched();
    let sel = inp.u8();
    match sel & 3 {
        0 | 1 => ab.0 + u64::from(inp.u16()) % ab.1,
        2 => {
            let (start, len) = if sel & 4 == 0 { b_end } else { c_end };
            start + len - 1 - u64::from(inp.u8())
        }
        _ => inp.u64(),
    }
}

/// A descriptor's flags (bit 0: device-writable, bit 1: INDIRECT) and
/// length (bits 2–4 pick a class: a sector, a header, a status byte, empty,
/// a few sectors, any 16-bit value, any 32-bit value, a page).
fn decode_desc(inp: &mut FuzzInput<'_>) -> (u16, u32) {
    let b = inp.u8();
    let mut flags = 0;
    if b & 1 != 0 {
        flags |= F_WRITE;
    }
    if b & 2 != 0 {
        flags |= F_INDIRECT;
    }
    let len = match (b >> 2) & 7 {
        0 => 512,
        1 => 16,
        2 => 1,
        3 => 0,
        4 => 512 * u32::from(inp.u8() % 10),
        5 => u32::from(inp.u16()),
        6 => inp.u32(),
        _ => 4096,
    };
    (flags, len)
}

fn overlaps(addr: u64, len: u32, start: u64, end: u64) -> bool {
    addr < end && addr.saturating_add(u64::from(len).max(1)) > start
}

/// Builds, submits and checks one request; returns its status (None: the
/// chain failed), or None if the input cannot be modelled any further (the
/// guest pointed a device-writable buffer at the queue itself, which the
/// device may legitimately scribble over).
#[allow(clippy::too_many_arguments)]
fn one_request(
    mem: &GuestMemoryMmap,
    inp: &mut FuzzInput<'_>,
    dev: &mut Block,
    gq: &mut GuestQueue<'_>,
    shadow: &mut Queue,
    disk: &mut [u8],
    id: &[u8; ID_BYTES],
    read_only: bool,
    capacity: u64,
) -> Option<Option<u8>> {
    let k = inp.u8();
    let t = match k & 7 {
        0 | 7 => req_type::IN,
        1 => req_type::OUT,
        2 => req_type::FLUSH,
        3 => req_type::GET_ID,
        4 => DISCARD,
        5 => WRITE_ZEROES,
        _ => inp.u32(),
    };
    let sector = if k & 8 != 0 {
        inp.u64()
    } else {
        u64::from(inp.u8() % 12)
    };
    let n = match k >> 4 {
        15 => 100 + u16::from(inp.u8() % 60),
        n => u16::from(n),
    };
    let mut descs = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let addr = decode_addr(inp);
        let (flags, len) = decode_desc(inp);
        descs.push((addr, len, flags));
    }
    // The guest writes the header where its first descriptor points
    // (unless that is the queue itself, which would only confuse the
    // harness's own bookkeeping).
    if let Some(&(addr, _, _)) = descs.first() {
        if !overlaps(addr, 16, QUEUE_BASE, QUEUE_END) {
            let hdr = RequestHeader {
                req_type: t.to_le(),
                reserved: 0,
                sector: sector.to_le(),
            };
            let _ = mem.write_obj(hdr, GuestAddress(addr));
        }
    }
    for (i, &(addr, len, flags)) in descs.iter().enumerate() {
        let i = i as u16;
        let last = i + 1 == n;
        let f = if last { flags } else { flags | F_NEXT };
        gq.write_desc(i, addr, len, f, i + 1);
    }
    if n == 0 {
        // An empty chain is not expressible: a lone descriptor with no
        // buffer stands in for it.
        gq.write_desc(0, 0, 0, 0, 0);
    }
    gq.publish(0);

    // The chain exactly as the device will read it.
    let chain: Vec<Descriptor> = shadow
        .pop_descriptor_chain(mem)
        .map(|c| c.take(MAX_DESCRIPTORS).collect())
        .unwrap_or_default();
    let clobbers_queue = chain
        .iter()
        .any(|d| d.is_write_only() && overlaps(d.addr().0, d.len(), QUEUE_BASE, QUEUE_END));
    let mut model = Model::snapshot(mem);
    let header: Option<RequestHeader> = chain
        .first()
        .and_then(|d| mem.read_obj(d.addr()).ok())
        .map(|h: RequestHeader| RequestHeader {
            req_type: u32::from_le(h.req_type),
            reserved: 0,
            sector: u64::from_le(h.sector),
        });
    let middle: &[Descriptor] = if chain.len() >= 2 {
        &chain[1..chain.len() - 1]
    } else {
        &[]
    };
    let data_len: u64 = middle.iter().map(|d| u64::from(d.len())).sum();
    // What an OUT would write, read before the device runs (it reads every
    // segment before it writes anything to guest memory).
    let out_data: Option<Vec<Vec<u8>>> = if data_len <= disk.len() as u64 {
        middle
            .iter()
            .filter(|d| d.len() > 0)
            .map(|d| {
                let mut b = vec![0u8; d.len() as usize];
                mem.read_slice(&mut b, d.addr()).ok().map(|()| b)
            })
            .collect()
    } else {
        None
    };

    let before = gq.used_idx();
    let res = dev.process_queue(0);
    if clobbers_queue {
        return None;
    }
    assert!(res.is_ok(), "queue failed on a well-formed ring: {res:?}");
    assert_eq!(
        gq.used_idx(),
        before.wrapping_add(1),
        "exactly the one published chain is used"
    );
    let (head, used_len) = gq.used_elem(before);
    assert_eq!(head, 0, "used id is the chain's head");
    if used_len == 0 {
        // Failed chain: no status, no I/O.
        model.check(mem, "a chain returned with used length 0");
        return Some(None);
    }
    let (Some(hdr), Some(last)) = (header, chain.last()) else {
        panic!(
            "chain of {} descriptors completed (used {used_len}) without a header",
            chain.len()
        );
    };
    assert!(
        last.is_write_only(),
        "status written to a device-readable descriptor"
    );
    let status: u8 = mem.read_obj(last.addr()).expect("status byte in guest RAM");
    let ctx = format!(
        "type {} sector {} data {data_len} (used {used_len}, status {status}, read-only {read_only}, capacity {capacity})",
        hdr.req_type, hdr.sector
    );
    let in_range = hdr
        .sector
        .checked_mul(SECTOR_SIZE)
        .and_then(|o| o.checked_add(data_len))
        .is_some_and(|end| end <= capacity * SECTOR_SIZE);
    let all_write = middle.iter().all(|d| d.is_write_only());
    let all_read = middle.iter().all(|d| !d.is_write_only());
    match status {
        blk_status::OK => match hdr.req_type {
            req_type::IN => {
                assert!(
                    all_write && in_range && data_len % SECTOR_SIZE == 0,
                    "{ctx}"
                );
                assert_eq!(u64::from(used_len), data_len + 1, "{ctx}");
                let mut off = (hdr.sector * SECTOR_SIZE) as usize;
                for d in middle {
                    let len = d.len() as usize;
                    model.write(d.addr().0, &disk[off..off + len]);
                    off += len;
                }
            }
            req_type::OUT => {
                assert!(
                    !read_only && all_read && in_range && data_len % SECTOR_SIZE == 0,
                    "{ctx}"
                );
                assert_eq!(used_len, 1, "{ctx}");
                let data = out_data.expect("an OUT within the disk has readable segments");
                let mut off = (hdr.sector * SECTOR_SIZE) as usize;
                for seg in data {
                    disk[off..off + seg.len()].copy_from_slice(&seg);
                    off += seg.len();
                }
            }
            req_type::FLUSH => assert_eq!(used_len, 1, "{ctx}"),
            req_type::GET_ID => {
                assert!(all_write, "{ctx}");
                let written = data_len.min(ID_BYTES as u64) as usize;
                assert_eq!(used_len as usize, written + 1, "{ctx}");
                let mut left = &id[..written];
                for d in middle {
                    let n = left.len().min(d.len() as usize);
                    model.write(d.addr().0, &left[..n]);
                    left = &left[n..];
                }
            }
            _ => panic!("OK for a request type the device does not offer: {ctx}"),
        },
        blk_status::IOERR => assert_eq!(used_len, 1, "{ctx}"),
        blk_status::UNSUPP => {
            assert_eq!(used_len, 1, "{ctx}");
            assert!(
                !matches!(
                    hdr.req_type,
                    req_type::IN | req_type::OUT | req_type::FLUSH | req_type::GET_ID
                ),
                "UNSUPP for a supported request: {ctx}"
            );
        }
        _ => panic!("status byte outside the spec: {ctx}"),
    }
    model.write(last.addr().0, &[status]);
    model.check(mem, &ctx);
    Some(Some(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made input: a 4-sector disk, an OUT of sector 1 from the
    /// A|B area, then an IN of it into another buffer. Both complete OK, so
    /// the model (which checks the IN brought back what the OUT wrote) ran
    /// on real I/O; then the same with a read-only disk, where the OUT
    /// must fail.
    #[test]
    fn crafted_write_then_read_is_checked() {
        let chain = |k: u8, data_off: u16, data_flags: u8| {
            let mut v = vec![k, 1];
            // Header: A|B area, readable, 16 bytes.
            v.extend_from_slice(&[0, 0x00, 0x00, 1 << 2]);
            // Data: A|B area, one sector.
            v.push(0);
            v.extend_from_slice(&data_off.to_le_bytes());
            v.push(data_flags);
            // Status: A|B area, writable, 1 byte.
            v.extend_from_slice(&[0, 0x00, 0x10, 1 | (2 << 2)]);
            v
        };
        for (flags, want_ok) in [(0x12u8, 2), (0x12 | 8, 1)] {
            let mut input = vec![flags, 1, 2, 3, 4];
            input.extend(chain(0x31, 0x200, 0));
            input.extend(chain(0x30, 0x2000, 1));
            let guard = GuardedMemory::new();
            let disk = Disk { path: disk_path() };
            assert_eq!(run_input(guard.mem(), &disk.path, &input), want_ok);
            assert!(guard.canaries_intact());
        }
    }
}
