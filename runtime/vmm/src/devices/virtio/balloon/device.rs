//! The virtio-balloon device: config space, activation and the three
//! queues. Runs on the VMM event loop thread (queues) and on vCPU threads
//! (config space, activation), behind the transport's mutex.

use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};

use super::discard::{self, check_range, Checked, RangeError};
use super::metrics::BalloonMetrics;
use super::{
    features, queue, rate_limited, BalloonError, BALLOON_PAGE_SIZE, CONFIG_ACTUAL_OFFSET,
    CONFIG_SPACE_SIZE, MAX_PFNS_PER_CHAIN, PFN_BYTES, PFN_SHIFT, QUEUE_SIZE, REPORTING_QUEUE_SIZE,
};
use crate::devices::virtio::persist::{
    restored_context, BalloonSnap, DeviceSnap, DeviceStateError,
};
use crate::devices::virtio::{
    device_type, read_config_bytes, ActivateContext, Interrupt, VirtioDevice, VirtioError,
    VIRTIO_F_VERSION_1,
};

/// What an activated balloon holds.
struct Active {
    mem: GuestMemoryMmap,
    inflate: Queue,
    deflate: Queue,
    /// Present when the driver acked free page reporting.
    reporting: Option<Queue>,
    /// Queue 2 when the device offers reporting but the driver did not
    /// ack it: unused, kept for a snapshot (which saves every queue the
    /// transport has).
    unused: Option<Queue>,
    interrupt: Arc<Interrupt>,
}

impl Active {
    /// The driver's queues from `ctx`: inflate and deflate, which must be
    /// ready, and the reporting queue if the driver acked the feature.
    fn new(ctx: ActivateContext) -> Result<Self, VirtioError> {
        let mut queues = ctx.queues.into_iter();
        let mut ready = |index: u16| {
            queues
                .next()
                .filter(|q| q.ready())
                .ok_or_else(|| VirtioError::Activate(format!("queue {index} is not ready")))
        };
        let inflate = ready(queue::INFLATE)?;
        let deflate = ready(queue::DEFLATE)?;
        // Linux sets up the reporting queue only when it acked the feature
        // (queues are numbered densely); without it queue 2 stays unused.
        let (reporting, unused) = if ctx.acked_features & features::FREE_PAGE_REPORTING != 0 {
            (Some(ready(queue::REPORTING)?), None)
        } else {
            (None, queues.next())
        };
        Ok(Active {
            mem: ctx.mem,
            inflate,
            deflate,
            reporting,
            unused,
            interrupt: ctx.interrupt,
        })
    }

    /// Every queue the transport has, in order, for a snapshot.
    fn all_queues(&self) -> impl Iterator<Item = &Queue> {
        [&self.inflate, &self.deflate]
            .into_iter()
            .chain(self.reporting.as_ref().or(self.unused.as_ref()))
    }
}

/// The virtio-balloon device.
pub struct Balloon {
    avail_features: u64,
    queue_sizes: Vec<u16>,
    /// `num_pages`: the host's target, in 4 KiB pages.
    num_pages: u32,
    /// `actual`: what the driver says the balloon holds.
    actual: u32,
    active: Option<Active>,
    /// Restored with a target other than the one the guest last saw: it
    /// is told when it first runs.
    target_changed_at_restore: bool,
    /// Per-device counters.
    pub metrics: Arc<BalloonMetrics>,
}

impl Balloon {
    /// A balloon offering `DEFLATE_ON_OOM` and `FREE_PAGE_REPORTING` as
    /// asked; the reporting queue exists only with the latter. The target
    /// starts at 0 pages.
    pub fn new(deflate_on_oom: bool, free_page_reporting: bool) -> Self {
        let mut avail_features = VIRTIO_F_VERSION_1;
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        if deflate_on_oom {
            avail_features |= features::DEFLATE_ON_OOM;
        }
        if free_page_reporting {
            avail_features |= features::FREE_PAGE_REPORTING;
            queue_sizes.push(REPORTING_QUEUE_SIZE);
        }
        Balloon {
            avail_features,
            queue_sizes,
            num_pages: 0,
            actual: 0,
            active: None,
            target_changed_at_restore: false,
            metrics: Arc::new(BalloonMetrics::default()),
        }
    }

    /// The host's target (`num_pages`), in 4 KiB pages.
    pub fn target_pages(&self) -> u32 {
        self.num_pages
    }

    /// What the driver last wrote to `actual`, in 4 KiB pages.
    pub fn actual_pages(&self) -> u32 {
        self.actual
    }

    /// Sets the host's target and, if a driver runs, tells it with a
    /// configuration-change interrupt.
    pub fn set_target_pages(&mut self, pages: u32) -> Result<(), VirtioError> {
        self.num_pages = pages;
        if let Some(a) = &self.active {
            a.interrupt.signal_config_change()?;
        }
        Ok(())
    }

    fn config_bytes(&self) -> [u8; CONFIG_SPACE_SIZE] {
        let mut c = [0u8; CONFIG_SPACE_SIZE];
        c[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        c[4..].copy_from_slice(&self.actual.to_le_bytes());
        c
    }

    /// Serves the inflate queue: every valid PFN's page is discarded.
    /// True if any chain was returned.
    pub fn process_inflate(&mut self) -> Result<bool, VirtioError> {
        let metrics = self.metrics.clone();
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        let mem = &a.mem;
        serve_queue(
            &mut a.inflate,
            mem,
            &a.interrupt,
            QUEUE_SIZE,
            |chain| match read_pfns(mem, chain, "inflate") {
                Ok(mut pfns) => inflate(mem, &metrics, &mut pfns),
                Err(e) => bad_chain(&metrics, &e),
            },
        )
    }

    /// Serves the deflate queue: nothing to do on the host (a discarded
    /// page faults back in when the guest touches it); counted, returned.
    pub fn process_deflate(&mut self) -> Result<bool, VirtioError> {
        let metrics = self.metrics.clone();
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        let mem = &a.mem;
        serve_queue(
            &mut a.deflate,
            mem,
            &a.interrupt,
            QUEUE_SIZE,
            |chain| match read_pfns(mem, chain, "deflate") {
                Ok(pfns) => {
                    for pfn in pfns {
                        match check_range(mem, u64::from(pfn) << PFN_SHIFT, BALLOON_PAGE_SIZE) {
                            Ok(_) => {
                                BalloonMetrics::add(&metrics.deflated_pages, 1);
                            }
                            Err(e) => bad_range(&metrics, "deflate", &e),
                        }
                    }
                }
                Err(e) => bad_chain(&metrics, &e),
            },
        )
    }

    /// Serves the reporting queue: every valid reported range is
    /// discarded; chains go back with used length 0 (nothing written).
    pub fn process_reporting(&mut self) -> Result<bool, VirtioError> {
        let metrics = self.metrics.clone();
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        let Some(q) = a.reporting.as_mut() else {
            return Ok(false);
        };
        let mem = &a.mem;
        serve_queue(
            q,
            mem,
            &a.interrupt,
            REPORTING_QUEUE_SIZE,
            |chain| match reported_ranges(chain) {
                Ok(ranges) => {
                    for (addr, len) in ranges {
                        match check_range(mem, addr, u64::from(len)) {
                            Ok(range) => {
                                if discard_counted(&metrics, &range, "reporting") {
                                    BalloonMetrics::add(&metrics.reported_bytes, range.bytes());
                                }
                            }
                            Err(e) => bad_range(&metrics, "reporting", &e),
                        }
                    }
                    BalloonMetrics::add(&metrics.reports, 1);
                }
                Err(e) => bad_chain(&metrics, &e),
            },
        )
    }
}

/// Takes every available chain of `q` (at most `max`, a queue's worth: the
/// driver notifies again for more), hands it to `handle` and returns it
/// with used length 0 — the device never writes into balloon buffers.
/// Only an unusable queue (avail index beyond the queue size, used ring
/// not writable) is an error, which fails the device.
fn serve_queue(
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    max: u16,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>),
) -> Result<bool, VirtioError> {
    let mut used_any = false;
    for _ in 0..max {
        let chain = match q.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => return Err(VirtioError::Queue(e)),
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        handle(chain);
        q.add_used(mem, head, 0).map_err(VirtioError::Queue)?;
        used_any = true;
    }
    if used_any {
        interrupt.notify_used(q, mem)?;
    }
    Ok(used_any)
}

/// The PFNs of an inflate or deflate chain: device-readable buffers, each
/// a non-empty multiple of 4 bytes, at most [`MAX_PFNS_PER_CHAIN`] in all,
/// each read in full from guest memory. Anything else refuses the chain.
fn read_pfns(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    queue: &'static str,
) -> Result<Vec<u32>, BalloonError> {
    let head = chain.head_index();
    let mut pfns: Vec<u32> = Vec::new();
    for desc in chain {
        if desc.is_write_only() {
            return Err(BalloonError::PfnWriteOnly { head, queue });
        }
        let len = desc.len();
        if len == 0 || len % PFN_BYTES != 0 {
            return Err(BalloonError::PfnLength { head, queue, len });
        }
        // Checked before anything is allocated: a buffer is at most
        // MAX_PFNS_PER_CHAIN * 4 bytes.
        let n = (len / PFN_BYTES) as usize;
        if pfns.len() + n > MAX_PFNS_PER_CHAIN as usize {
            return Err(BalloonError::TooManyPfns { head, queue });
        }
        let mut buf = vec![0u8; len as usize];
        mem.read_slice(&mut buf, desc.addr())
            .map_err(|_| BalloonError::PfnBuffer {
                head,
                queue,
                addr: desc.addr().0,
                len,
            })?;
        pfns.extend(
            buf.chunks_exact(PFN_BYTES as usize)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Ok(pfns)
}

/// The (address, length) of each buffer of a reporting chain, which must
/// all be device-writable (Linux adds them with `virtqueue_add_inbuf`);
/// one read-only descriptor refuses the chain before anything is
/// discarded. The chain is at most a queue's worth of descriptors
/// (virtio-queue ends longer or looping chains).
fn reported_ranges(
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<Vec<(u64, u32)>, BalloonError> {
    let head = chain.head_index();
    let mut ranges = Vec::new();
    for desc in chain {
        if !desc.is_write_only() {
            return Err(BalloonError::ReportReadOnly { head });
        }
        ranges.push((desc.addr().0, desc.len()));
    }
    Ok(ranges)
}

/// Discards the pages of `pfns`: sorted and deduplicated, each page
/// checked on its own (a bad one is counted and skipped), then adjacent
/// good pages of one region discarded as one range.
fn inflate(mem: &GuestMemoryMmap, metrics: &BalloonMetrics, pfns: &mut Vec<u32>) {
    pfns.sort_unstable();
    pfns.dedup();
    let mut run: Option<Checked<'_>> = None;
    for &pfn in pfns.iter() {
        // A u32 PFN shifted by 12 fits in 44 bits: no overflow.
        let page = match check_range(mem, u64::from(pfn) << PFN_SHIFT, BALLOON_PAGE_SIZE) {
            Ok(p) => p,
            Err(e) => {
                bad_range(metrics, "inflate", &e);
                continue;
            }
        };
        match run.as_mut() {
            Some(r) if r.is_followed_by(&page) => r.extend(&page),
            _ => {
                if let Some(done) = run.replace(page) {
                    discard_inflated(metrics, &done);
                }
            }
        }
    }
    if let Some(done) = run {
        discard_inflated(metrics, &done);
    }
}

fn discard_inflated(metrics: &BalloonMetrics, range: &Checked<'_>) {
    if discard_counted(metrics, range, "inflate") {
        BalloonMetrics::add(&metrics.inflated_pages, range.bytes() / BALLOON_PAGE_SIZE);
    }
}

/// Discards `range`; a refusal by the host kernel is counted and logged
/// (rate-limited). True if the memory went back.
fn discard_counted(metrics: &BalloonMetrics, range: &Checked<'_>, queue: &'static str) -> bool {
    match discard::discard(range) {
        Ok(()) => true,
        Err(e) => {
            let n = BalloonMetrics::add(&metrics.discard_errors, 1);
            if rate_limited(n) {
                tracing::warn!(
                    device = "balloon",
                    queue,
                    addr = format_args!("{:#x}", range.addr()),
                    len = range.bytes(),
                    error = %e,
                    "discarding guest memory failed; the host keeps it"
                );
            }
            false
        }
    }
}

fn bad_chain(metrics: &BalloonMetrics, e: &BalloonError) {
    let n = BalloonMetrics::add(&metrics.bad_chains, 1);
    if rate_limited(n) {
        tracing::warn!(device = "balloon", error = %e, "malformed descriptor chain returned untouched");
    }
}

fn bad_range(metrics: &BalloonMetrics, queue: &'static str, e: &RangeError) {
    let n = BalloonMetrics::add(&metrics.bad_ranges, 1);
    if rate_limited(n) {
        tracing::warn!(device = "balloon", queue, error = %e, "guest-named memory skipped");
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        device_type::BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    /// Only `actual` (bytes 4..8) is the driver's to write; bytes of any
    /// other field, or past the end, are ignored (virtio 1.2 §5.5.4:
    /// `num_pages` is the device's).
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), VirtioError> {
        let mut actual = self.actual.to_le_bytes();
        let mut ignored = 0usize;
        for (i, b) in data.iter().enumerate() {
            let at = offset
                .checked_add(i as u64)
                .and_then(|o| o.checked_sub(CONFIG_ACTUAL_OFFSET))
                .filter(|o| *o < 4);
            match at {
                Some(o) => actual[o as usize] = *b,
                None => ignored += 1,
            }
        }
        if ignored > 0 {
            tracing::debug!(
                device = "balloon",
                offset,
                len = data.len(),
                ignored,
                "config write outside `actual` ignored"
            );
        }
        self.actual = u32::from_le_bytes(actual);
        Ok(())
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        self.active = Some(Active::new(ctx)?);
        Ok(())
    }

    fn save_state(&mut self) -> Result<DeviceSnap, VirtioError> {
        Ok(DeviceSnap {
            balloon: Some(BalloonSnap {
                num_pages: self.num_pages,
                actual: self.actual,
            }),
            ..DeviceSnap::of_queues(self.active.as_ref().map(Active::all_queues))
        })
    }

    /// The queues and `actual` come back as saved; the target stays the
    /// one this VMM was configured with, and a guest that last saw
    /// another is told at its first run ([`Self::wake_after_restore`]).
    fn restore_state(
        &mut self,
        snap: &DeviceSnap,
        ctx: Option<ActivateContext>,
    ) -> Result<(), VirtioError> {
        let saved = snap.balloon.ok_or(DeviceStateError::Missing("balloon"))?;
        self.active = restored_context(snap, ctx)?.map(Active::new).transpose()?;
        self.actual = saved.actual;
        self.target_changed_at_restore = saved.num_pages != self.num_pages;
        Ok(())
    }

    fn wake_after_restore(&mut self) -> Result<(), VirtioError> {
        if let Some(a) = self
            .active
            .as_ref()
            .filter(|_| self.target_changed_at_restore)
        {
            a.interrupt.signal_config_change()?;
        }
        self.target_changed_at_restore = false;
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Drops the queues; the balloon is empty for the next driver (its
    /// pages were never taken from the guest's view: any discarded page
    /// reads as zeros when touched). The host's target stays.
    fn reset(&mut self) {
        self.active = None;
        self.actual = 0;
    }

    fn process_queue(&mut self, index: u16) -> Result<(), VirtioError> {
        match index {
            queue::INFLATE => self.process_inflate().map(|_| ()),
            queue::DEFLATE => self.process_deflate().map(|_| ()),
            // Without reporting negotiated queue 2 is not the driver's:
            // its notifications are ignored (process_reporting does
            // nothing then).
            queue::REPORTING if self.queue_sizes.len() > 2 => self.process_reporting().map(|_| ()),
            other => Err(VirtioError::BadQueueIndex(other)),
        }
    }
}
