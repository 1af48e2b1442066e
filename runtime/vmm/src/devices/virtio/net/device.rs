//! The virtio-net device: RX and TX queues over a [`NetBackend`].
//!
//! - TX: each chain (device-readable descriptors only, header + frame,
//!   12 ..= [`MAX_BUFFER_LEN`] bytes, every buffer checked against guest
//!   memory) is copied into one buffer and written to the backend with a
//!   single `write`; the chain is returned with length 0 whatever happens.
//!   A backend refusal drops the frame (counted), never the queue.
//! - RX: an RX chain is taken first; only then is one frame read from the
//!   backend, so frames wait in the tap while the guest has no buffers. A
//!   frame that does not fit the chain is dropped and counted (never
//!   truncated) and the chain is kept for the next frame. The 12-byte
//!   header comes from the tap; `num_buffers` is set to 1.
//! - Work per call is bounded ([`RX_BUDGET`] frames, [`TX_BUDGET`] chains).
//!   When the device stops with work left (TX budget used up) or the RX
//!   side must be re-armed (the guest posted buffers after RX ran dry), it
//!   signals its wake eventfd; [`super::NetEventHandler`] picks that up.

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::NetBackend;
use super::metrics::NetMetrics;
use super::{
    features, rate_limited, tap_offload_flags, NetError, CONFIG_SPACE_SIZE, MAX_BUFFER_LEN,
    MAX_CHAIN_DESCRIPTORS, QUEUE_SIZE, RXQ, RX_BUDGET, STATUS_LINK_UP, TXQ, TX_BUDGET,
    VNET_HDR_LEN,
};
use crate::devices::virtio::persist::{restored_context, DeviceSnap};
use crate::devices::virtio::{
    device_type, read_config_bytes, ready_queues, ActivateContext, Interrupt, VirtioDevice,
    VirtioError, VIRTIO_F_VERSION_1,
};

/// Features offered besides MAC (only with a configured address).
pub const BASE_FEATURES: u64 = VIRTIO_F_VERSION_1
    | features::CSUM
    | features::GUEST_CSUM
    | features::GUEST_TSO4
    | features::GUEST_TSO6
    | features::GUEST_ECN
    | features::HOST_TSO4
    | features::HOST_TSO6
    | features::HOST_ECN
    | features::STATUS;

/// How an RX pass ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxState {
    /// The backend has nothing more.
    Drained,
    /// Budget used up; the backend may have more (level-triggered polling
    /// brings us back).
    More,
    /// No guest buffers (or the device is not running): stop polling the
    /// backend until the device signals its wake eventfd.
    Blocked,
}

struct Active {
    mem: GuestMemoryMmap,
    rxq: Queue,
    txq: Queue,
    interrupt: Arc<Interrupt>,
}

/// The virtio-net device.
pub struct Net {
    backend: Box<dyn NetBackend>,
    mac: Option<[u8; 6]>,
    config: [u8; CONFIG_SPACE_SIZE],
    offload: u32,
    active: Option<Active>,
    wake: EventFd,
    /// RX stopped for lack of buffers; the next RX notification wakes the handler.
    rx_need_wake: bool,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// Per-device counters.
    pub metrics: Arc<NetMetrics>,
}

/// One guest buffer, checked against guest memory.
struct Seg {
    addr: GuestAddress,
    len: u32,
}

impl Net {
    /// A device on `backend` with the given MAC address (None: the guest
    /// picks one; the MAC feature is then not offered).
    pub fn new(backend: Box<dyn NetBackend>, mac: Option<[u8; 6]>) -> Result<Self, NetError> {
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        if let Some(m) = mac {
            config[..6].copy_from_slice(&m);
        }
        config[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        Ok(Net {
            backend,
            mac,
            config,
            offload: 0,
            active: None,
            wake: EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd)?,
            rx_need_wake: false,
            rx_buf: vec![0u8; MAX_BUFFER_LEN + 1],
            tx_buf: Vec::with_capacity(MAX_BUFFER_LEN),
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    /// Takes the driver's RX and TX queues from `ctx` (both must be
    /// ready) and gives the tap the offloads the driver acked.
    fn start(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        let mut ready = ready_queues(ctx.queues);
        let rxq = ready(RXQ)?;
        let txq = ready(TXQ)?;
        let flags = tap_offload_flags(ctx.acked_features);
        self.backend
            .set_offload(flags)
            .map_err(VirtioError::Backend)?;
        self.offload = flags;
        self.active = Some(Active {
            mem: ctx.mem,
            rxq,
            txq,
            interrupt: ctx.interrupt,
        });
        self.rx_need_wake = false;
        Ok(())
    }

    /// The backend fd the event loop polls.
    pub fn backend_fd(&self) -> RawFd {
        self.backend.raw_fd()
    }

    /// The eventfd the device signals when the event loop must come back.
    pub fn wake_evt(&self) -> &EventFd {
        &self.wake
    }

    /// The tap offload flags currently applied.
    pub fn offload(&self) -> u32 {
        self.offload
    }

    fn signal_wake(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::error!(device = "net", error = %e, "failed to signal the wake eventfd");
        }
    }

    /// Moves up to [`TX_BUDGET`] guest frames to the backend.
    pub fn process_tx(&mut self) -> Result<bool, VirtioError> {
        let Some(a) = self.active.as_mut() else {
            return Ok(false);
        };
        let mut used_any = false;
        let mut budget_left = true;
        for i in 0..=TX_BUDGET {
            let chain = match a.txq.iter(&a.mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(VirtioError::Queue(e)),
            };
            let Some(chain) = chain else { break };
            if i == TX_BUDGET {
                // More than a budget's worth: come back after the others had a turn.
                a.txq.go_to_previous_position();
                budget_left = false;
                break;
            }
            let head = chain.head_index();
            match gather_tx(&a.mem, head, chain, &mut self.tx_buf) {
                Ok(()) => match self.backend.send(&self.tx_buf) {
                    Ok(_) => {
                        NetMetrics::add(&self.metrics.tx_frames, 1);
                        NetMetrics::add(
                            &self.metrics.tx_bytes,
                            (self.tx_buf.len() - VNET_HDR_LEN) as u64,
                        );
                    }
                    Err(e) => {
                        let n = NetMetrics::add(&self.metrics.tx_drops, 1);
                        if rate_limited(n) {
                            tracing::warn!(device = "net", error = %e, "backend refused a guest frame; dropped");
                        }
                    }
                },
                Err(e) => bad_chain(&self.metrics, TXQ, &e),
            }
            a.txq
                .add_used(&a.mem, head, 0)
                .map_err(VirtioError::Queue)?;
            used_any = true;
        }
        if used_any {
            a.interrupt.notify_used(&mut a.txq, &a.mem)?;
        }
        if !budget_left {
            self.signal_wake();
        }
        Ok(used_any)
    }

    /// Moves up to [`RX_BUDGET`] backend frames into guest RX buffers.
    pub fn process_rx(&mut self) -> Result<RxState, VirtioError> {
        let Some(a) = self.active.as_mut() else {
            self.rx_need_wake = true;
            return Ok(RxState::Blocked);
        };
        if a.interrupt.needs_reset() {
            self.rx_need_wake = true;
            return Ok(RxState::Blocked);
        }
        let mut used_any = false;
        let mut state = RxState::More;
        let mut frames = 0;
        while frames < RX_BUDGET {
            let chain = match a.rxq.iter(&a.mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(VirtioError::Queue(e)),
            };
            let Some(chain) = chain else {
                self.rx_need_wake = true;
                state = RxState::Blocked;
                break;
            };
            let head = chain.head_index();
            let (segs, capacity) = match rx_segments(&a.mem, head, chain) {
                Ok(s) => s,
                Err(e) => {
                    bad_chain(&self.metrics, RXQ, &e);
                    a.rxq
                        .add_used(&a.mem, head, 0)
                        .map_err(VirtioError::Queue)?;
                    used_any = true;
                    continue;
                }
            };
            let n = match self.backend.recv(&mut self.rx_buf) {
                Ok(n) => n,
                Err(e) => {
                    a.rxq.go_to_previous_position();
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        let c = NetMetrics::add(&self.metrics.backend_errors, 1);
                        if rate_limited(c) {
                            tracing::warn!(device = "net", error = %e, "backend read failed");
                        }
                    }
                    state = RxState::Drained;
                    break;
                }
            };
            frames += 1;
            if !(VNET_HDR_LEN..=MAX_BUFFER_LEN).contains(&n) || n as u64 > capacity {
                // Runt, oversized, or larger than this guest buffer: drop
                // the frame, keep the chain for the next one.
                a.rxq.go_to_previous_position();
                let c = NetMetrics::add(&self.metrics.rx_drops, 1);
                if rate_limited(c) {
                    tracing::warn!(
                        device = "net",
                        len = n,
                        capacity,
                        "frame does not fit the guest's RX buffer; dropped"
                    );
                }
                continue;
            }
            // num_buffers (le16 at offset 10): one chain per frame.
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let len = match scatter(&a.mem, &segs, &self.rx_buf[..n]) {
                Ok(()) => {
                    NetMetrics::add(&self.metrics.rx_frames, 1);
                    NetMetrics::add(&self.metrics.rx_bytes, (n - VNET_HDR_LEN) as u64);
                    n as u32
                }
                Err(e) => {
                    NetMetrics::add(&self.metrics.rx_drops, 1);
                    bad_chain(&self.metrics, RXQ, &e);
                    0
                }
            };
            a.rxq
                .add_used(&a.mem, head, len)
                .map_err(VirtioError::Queue)?;
            used_any = true;
        }
        if used_any {
            a.interrupt.notify_used(&mut a.rxq, &a.mem)?;
        }
        Ok(state)
    }

    /// The backend fd is readable (or the handler re-armed it): move frames
    /// in. A queue failure asks the driver for a reset and blocks RX.
    pub fn process_backend_rx(&mut self) -> RxState {
        match self.process_rx() {
            Ok(s) => s,
            Err(e) => {
                self.device_failed(&e);
                self.rx_need_wake = true;
                RxState::Blocked
            }
        }
    }

    /// The wake eventfd fired: finish TX left over from a previous call.
    pub fn process_wake(&mut self) {
        if let Err(e) = self.process_tx() {
            self.device_failed(&e);
        }
    }

    fn device_failed(&self, e: &VirtioError) {
        if let Some(a) = self.active.as_ref() {
            tracing::warn!(device = "net", error = %e, "virtio device failed; the driver must reset it");
            let _ = a.interrupt.signal_needs_reset();
        }
    }
}

fn bad_chain(metrics: &NetMetrics, queue: u16, e: &NetError) {
    let n = NetMetrics::add(&metrics.bad_chains, 1);
    if rate_limited(n) {
        tracing::warn!(device = "net", queue, error = %e, "malformed descriptor chain returned with length 0");
    }
}

/// Collects a TX chain into `buf`: readable descriptors only, every buffer
/// inside guest memory, VNET_HDR_LEN ..= MAX_BUFFER_LEN bytes in all.
fn gather_tx<I>(
    mem: &GuestMemoryMmap,
    head: u16,
    chain: I,
    buf: &mut Vec<u8>,
) -> Result<(), NetError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    buf.clear();
    let mut total: u64 = 0;
    for (i, d) in chain.enumerate() {
        if i >= MAX_CHAIN_DESCRIPTORS {
            return Err(NetError::TooManyDescriptors { head });
        }
        if d.is_write_only() {
            return Err(NetError::WrongDirection { head, what: "TX" });
        }
        total = total
            .checked_add(u64::from(d.len()))
            .filter(|t| *t <= MAX_BUFFER_LEN as u64)
            .ok_or(NetError::TooLong {
                head,
                got: total.saturating_add(u64::from(d.len())),
            })?;
        if d.len() == 0 {
            continue;
        }
        let bad = || NetError::BadBuffer {
            head,
            addr: d.addr().0,
            len: d.len(),
        };
        if mem.get_slice(d.addr(), d.len() as usize).is_err() {
            return Err(bad());
        }
        let start = buf.len();
        buf.resize(start + d.len() as usize, 0);
        mem.read_slice(&mut buf[start..], d.addr())
            .map_err(|_| bad())?;
    }
    if total < VNET_HDR_LEN as u64 {
        return Err(NetError::TooShort { head, got: total });
    }
    Ok(())
}

/// Checks an RX chain: writable descriptors only, inside guest memory,
/// room for at least the header. Returns the buffers and their capacity.
fn rx_segments<I>(mem: &GuestMemoryMmap, head: u16, chain: I) -> Result<(Vec<Seg>, u64), NetError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let mut segs = Vec::new();
    let mut total: u64 = 0;
    for (i, d) in chain.enumerate() {
        if i >= MAX_CHAIN_DESCRIPTORS {
            return Err(NetError::TooManyDescriptors { head });
        }
        if !d.is_write_only() {
            return Err(NetError::WrongDirection { head, what: "RX" });
        }
        if d.len() == 0 {
            continue;
        }
        if mem.get_slice(d.addr(), d.len() as usize).is_err() {
            return Err(NetError::BadBuffer {
                head,
                addr: d.addr().0,
                len: d.len(),
            });
        }
        // Bounded: at most MAX_CHAIN_DESCRIPTORS * u32::MAX, far below u64::MAX.
        total = total.saturating_add(u64::from(d.len()));
        segs.push(Seg {
            addr: d.addr(),
            len: d.len(),
        });
    }
    if total < VNET_HDR_LEN as u64 {
        return Err(NetError::TooShort { head, got: total });
    }
    Ok((segs, total))
}

/// Writes `frame` across `segs` (which together hold at least its length).
fn scatter(mem: &GuestMemoryMmap, segs: &[Seg], mut frame: &[u8]) -> Result<(), NetError> {
    for s in segs {
        if frame.is_empty() {
            break;
        }
        let n = frame.len().min(s.len as usize);
        mem.write_slice(&frame[..n], s.addr)
            .map_err(NetError::GuestMemory)?;
        frame = &frame[n..];
    }
    Ok(())
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn avail_features(&self) -> u64 {
        if self.mac.is_some() {
            BASE_FEATURES | features::MAC
        } else {
            BASE_FEATURES
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), VirtioError> {
        self.start(ctx)?;
        // Re-arm backend polling (it stopped while the device was down).
        self.signal_wake();
        Ok(())
    }

    fn save_state(&mut self) -> Result<DeviceSnap, VirtioError> {
        Ok(DeviceSnap::of_queues(
            self.active.as_ref().map(|a| [&a.rxq, &a.txq]),
        ))
    }

    /// The queues come back as saved, on this VMM's tap with the offloads
    /// the driver acked; polling the tap starts when the guest first runs
    /// ([`Self::wake_after_restore`]), so no frame reaches it before.
    fn restore_state(
        &mut self,
        snap: &DeviceSnap,
        ctx: Option<ActivateContext>,
    ) -> Result<(), VirtioError> {
        match restored_context(snap, ctx)? {
            Some(ctx) => self.start(ctx),
            None => Ok(()),
        }
    }

    fn wake_after_restore(&mut self) -> Result<(), VirtioError> {
        if self.active.is_some() {
            self.signal_wake();
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        if self.offload != 0 {
            match self.backend.set_offload(0) {
                Ok(()) => self.offload = 0,
                Err(e) => {
                    tracing::warn!(device = "net", error = %e, "failed to clear tap offloads on reset")
                }
            }
        }
    }

    fn process_queue(&mut self, index: u16) -> Result<(), VirtioError> {
        match index {
            RXQ => {
                // New buffers: fill them now, and re-arm backend polling if
                // it stopped for lack of buffers.
                let state = self.process_rx()?;
                if self.rx_need_wake && state != RxState::Blocked {
                    self.rx_need_wake = false;
                    self.signal_wake();
                }
                Ok(())
            }
            TXQ => self.process_tx().map(|_| ()),
            _ => Err(VirtioError::BadQueueIndex(index)),
        }
    }
}
