//! The virtio-blk device: one queue, a raw image file, synchronous I/O.
//!
//! I/O runs on the VMM event loop thread with `pread`/`pwrite` through a
//! bounce buffer of at most [`SIZE_MAX`] bytes (one data segment at a
//! time), and FLUSH is `fdatasync`. A slow disk therefore delays the
//! other devices on the loop; an I/O thread or io_uring can replace
//! [`Block::execute`] later without changing the parsing or the queue code.
//! If the driver did not negotiate FLUSH the device is write-through:
//! every OUT is followed by `fdatasync`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::metrics::BlockMetrics;
use super::request::{checked_offset, parse, Request, Segment};
use super::{
    blk_status, features, rate_limited, req_type, BlockError, CONFIG_SPACE_SIZE, ID_BYTES,
    QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};
use crate::devices::virtio::{
    device_type, read_config_bytes, single_queue_lifecycle, SingleQueue, VirtioDevice, VirtioError,
    VIRTIO_F_VERSION_1,
};

/// The virtio-blk device.
pub struct Block {
    path: PathBuf,
    file: File,
    read_only: bool,
    /// Capacity in 512-byte sectors (the image size rounded down).
    capacity: u64,
    id: [u8; ID_BYTES],
    config: [u8; CONFIG_SPACE_SIZE],
    bounce: Vec<u8>,
    active: Option<SingleQueue>,
    /// Per-device counters.
    pub metrics: Arc<BlockMetrics>,
}

/// What a request did: the status byte and the bytes written to the
/// guest's data buffers (for the used length).
struct Outcome {
    status: u8,
    written: u32,
}

impl Outcome {
    fn status(status: u8) -> Self {
        Outcome { status, written: 0 }
    }
}

impl Block {
    /// Opens `path` (read-only when `read_only`); `id` is the GET_ID serial
    /// (at most 20 bytes, NUL-padded).
    pub fn new(path: &Path, read_only: bool, id: &str) -> Result<Self, BlockError> {
        if id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(id.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| BlockError::Open(path.to_path_buf(), e))?;
        let size = file
            .metadata()
            .map_err(|e| BlockError::Size(path.to_path_buf(), e))?
            .len();
        if size % SECTOR_SIZE != 0 {
            tracing::warn!(device = "block", path = %path.display(), size, "image size is not a multiple of 512; the last partial sector is not visible to the guest");
        }
        let capacity = size >> SECTOR_SHIFT;
        let mut idb = [0u8; ID_BYTES];
        idb[..id.len()].copy_from_slice(id.as_bytes());
        // struct virtio_blk_config: capacity le64 @0, size_max le32 @8,
        // seg_max le32 @12, geometry @16 (unused), blk_size le32 @20.
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        Ok(Block {
            path: path.to_path_buf(),
            file,
            read_only,
            capacity,
            id: idb,
            config,
            bounce: Vec::new(),
            active: None,
            metrics: Arc::new(BlockMetrics::default()),
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves the available chains, at most one queue's worth per call (a
    /// driver adding more meanwhile notifies again); true if any was used.
    pub fn process_requests(&mut self) -> Result<bool, VirtioError> {
        let Some(mut a) = self.active.take() else {
            return Ok(false);
        };
        let r = self.process_active(&mut a);
        self.active = Some(a);
        r
    }

    fn process_active(&mut self, a: &mut SingleQueue) -> Result<bool, VirtioError> {
        let mut used_any = false;
        for _ in 0..QUEUE_SIZE {
            let chain = match a.queue.iter(&a.mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(VirtioError::Queue(e)),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = match parse(&a.mem, head, chain) {
                Ok(parsed) => {
                    let out = match parsed.request {
                        Ok(req) => self.execute(&a.mem, a.acked_features, head, &req),
                        Err(e) => self.fail(&e),
                    };
                    // The status byte goes last, after all data.
                    match a.mem.write_obj(out.status, parsed.status_addr) {
                        Ok(()) => out.written.saturating_add(1),
                        Err(e) => {
                            self.bad_chain(&BlockError::GuestMemory(e));
                            0
                        }
                    }
                }
                Err(e) => {
                    self.bad_chain(&e);
                    0
                }
            };
            a.queue
                .add_used(&a.mem, head, len)
                .map_err(VirtioError::Queue)?;
            used_any = true;
        }
        if used_any {
            a.interrupt.notify_used(&mut a.queue, &a.mem)?;
        }
        Ok(used_any)
    }

    fn bad_chain(&self, e: &BlockError) {
        let n = BlockMetrics::add(&self.metrics.bad_chains, 1);
        if rate_limited(n) {
            tracing::warn!(device = "block", error = %e, "malformed descriptor chain returned with length 0");
        }
    }

    fn fail(&self, e: &BlockError) -> Outcome {
        let n = BlockMetrics::add(&self.metrics.io_errors, 1);
        if rate_limited(n) {
            tracing::warn!(device = "block", error = %e, source = ?std::error::Error::source(e), "request failed with IOERR");
        }
        Outcome::status(blk_status::IOERR)
    }

    /// Runs one validated request.
    fn execute(&mut self, mem: &GuestMemoryMmap, acked: u64, head: u16, req: &Request) -> Outcome {
        let m = self.metrics.clone();
        match req.req_type {
            req_type::IN => {
                let offset = match checked_offset(head, req.sector, req.data_len, self.capacity) {
                    Ok(o) => o,
                    Err(e) => return self.fail(&e),
                };
                match self.read_into_guest(mem, offset, req) {
                    Ok(()) => {
                        BlockMetrics::add(&m.reads, 1);
                        BlockMetrics::add(&m.read_bytes, req.data_len);
                        Outcome {
                            status: blk_status::OK,
                            // data_len <= MAX_REQUEST_BYTES (16 MiB) fits u32.
                            written: u32::try_from(req.data_len).unwrap_or(u32::MAX),
                        }
                    }
                    Err(e) => self.fail(&e),
                }
            }
            req_type::OUT => {
                if self.read_only {
                    return self.fail(&BlockError::ReadOnly { head });
                }
                let offset = match checked_offset(head, req.sector, req.data_len, self.capacity) {
                    Ok(o) => o,
                    Err(e) => return self.fail(&e),
                };
                let mut r = self.write_from_guest(mem, offset, req);
                if r.is_ok() && acked & features::FLUSH == 0 {
                    r = self.file.sync_data().map_err(BlockError::Io);
                }
                match r {
                    Ok(()) => {
                        BlockMetrics::add(&m.writes, 1);
                        BlockMetrics::add(&m.write_bytes, req.data_len);
                        Outcome::status(blk_status::OK)
                    }
                    Err(e) => self.fail(&e),
                }
            }
            req_type::FLUSH => {
                let r = if self.read_only {
                    Ok(())
                } else {
                    self.file.sync_data()
                };
                match r {
                    Ok(()) => {
                        BlockMetrics::add(&m.flushes, 1);
                        Outcome::status(blk_status::OK)
                    }
                    Err(e) => self.fail(&BlockError::Io(e)),
                }
            }
            req_type::GET_ID => {
                let mut written = 0u32;
                let mut left: &[u8] = &self.id;
                for seg in &req.data {
                    if left.is_empty() {
                        break;
                    }
                    let n = left.len().min(seg.len as usize);
                    if let Err(e) = mem.write_slice(&left[..n], seg.addr) {
                        return self.fail(&BlockError::GuestMemory(e));
                    }
                    left = &left[n..];
                    written += n as u32;
                }
                BlockMetrics::add(&m.get_ids, 1);
                Outcome {
                    status: blk_status::OK,
                    written,
                }
            }
            other => {
                let n = BlockMetrics::add(&m.unsupported, 1);
                if rate_limited(n) {
                    tracing::warn!(
                        device = "block",
                        req_type = other,
                        "unsupported request type answered UNSUPP"
                    );
                }
                Outcome::status(blk_status::UNSUPP)
            }
        }
    }

    fn read_into_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        req: &Request,
    ) -> Result<(), BlockError> {
        self.each_segment(offset, req, |file, buf, seg, offset| {
            file.read_exact_at(buf, offset).map_err(BlockError::Io)?;
            mem.write_slice(buf, seg.addr)
                .map_err(BlockError::GuestMemory)
        })
    }

    fn write_from_guest(
        &mut self,
        mem: &GuestMemoryMmap,
        offset: u64,
        req: &Request,
    ) -> Result<(), BlockError> {
        self.each_segment(offset, req, |file, buf, seg, offset| {
            mem.read_slice(buf, seg.addr)
                .map_err(BlockError::GuestMemory)?;
            file.write_all_at(buf, offset).map_err(BlockError::Io)
        })
    }

    /// Walks `req`'s data segments in order, the disk offset starting at
    /// `offset` and advancing by each segment's length: `io` gets the
    /// image file, the bounce buffer cut to the segment's length (grown if
    /// needed; its contents are whatever the last request left), the
    /// segment and its disk offset. The first error stops the walk.
    fn each_segment(
        &mut self,
        mut offset: u64,
        req: &Request,
        mut io: impl FnMut(&File, &mut [u8], &Segment, u64) -> Result<(), BlockError>,
    ) -> Result<(), BlockError> {
        for seg in &req.data {
            let len = seg.len as usize;
            if self.bounce.len() < len {
                self.bounce.resize(len, 0);
            }
            io(&self.file, &mut self.bounce[..len], seg, offset)?;
            offset += u64::from(seg.len);
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1
            | features::FLUSH
            | features::SEG_MAX
            | features::SIZE_MAX
            | features::BLK_SIZE;
        if self.read_only {
            f |= features::RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    single_queue_lifecycle!();
}
