//! Device-level virtio-net tests: the test is the guest driver (real guest
//! memory, real split queues) and the backend is a unix datagram socket
//! pair, so they run without root. The same device against a real tap is
//! in `tests/net_tap.rs` (root).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{RxState, BASE_FEATURES};
use super::*;
use crate::devices::virtio::test_utils::{
    activate_ctx, guest_memory, test_interrupt, GuestQueue, F_NEXT, F_WRITE, GUEST_MEM_SIZE,
};
use crate::devices::virtio::{Interrupt, VirtioDevice, VirtioError, INT_VRING, VIRTIO_F_VERSION_1};

const MAC: [u8; 6] = [0x02, 0xb0, 0x0c, 0x00, 0x00, 0x01];
const QSIZE: u16 = 256;
const RX_HDR: u64 = 0x10_0000;
const RX_DATA: u64 = 0x18_0000;
const RX_SLOT: u64 = 0x800;
const TX_BUF: u64 = 0x30_0000;

fn frame(len: usize, seed: u8) -> Vec<u8> {
    // virtio-net header (all zero: no offload) + Ethernet frame.
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x08, 0x06]);
    while f.len() < VNET_HDR_LEN + len {
        f.push(seed.wrapping_add(f.len() as u8));
    }
    f
}

struct Rig<'a> {
    dev: Net,
    mem: &'a GuestMemoryMmap,
    rxq: GuestQueue<'a>,
    txq: GuestQueue<'a>,
    irq: Arc<Interrupt>,
    peer: UnixDatagram,
    rx_seen: u16,
    tx_seen: u16,
}

fn rig_with(mem: &GuestMemoryMmap, acked: u64) -> Rig<'_> {
    let (backend, peer) = UnixDgramBackend::pair().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut dev = Net::new(Box::new(backend), Some(MAC)).unwrap();
    let rxq = GuestQueue::new(mem, QSIZE, 0x1000);
    let txq = GuestQueue::new(mem, QSIZE, 0x8000);
    let irq = test_interrupt();
    dev.activate(activate_ctx(
        mem,
        vec![rxq.queue(), txq.queue()],
        &irq,
        acked,
    ))
    .unwrap();
    Rig {
        dev,
        mem,
        rxq,
        txq,
        irq,
        peer,
        rx_seen: 0,
        tx_seen: 0,
    }
}

fn rig(mem: &GuestMemoryMmap) -> Rig<'_> {
    rig_with(mem, VIRTIO_F_VERSION_1 | features::MAC | features::STATUS)
}

fn write_chain(q: &mut GuestQueue<'_>, first: u16, descs: &[(u64, u32, u16)]) {
    for (i, (addr, len, flags)) in descs.iter().enumerate() {
        let idx = first + i as u16;
        let f = if i + 1 < descs.len() {
            flags | F_NEXT
        } else {
            *flags
        };
        q.write_desc(idx, *addr, *len, f, idx + 1);
    }
    q.publish(first);
}

impl Rig<'_> {
    /// Posts RX chain `k` (descriptors 2k, 2k+1): a 12-byte header buffer
    /// and a `data_len` data buffer, as split buffers.
    fn post_rx(&mut self, k: u16, data_len: u32) {
        let (h, d) = (
            RX_HDR + u64::from(k) * 0x20,
            RX_DATA + u64::from(k) * RX_SLOT,
        );
        write_chain(
            &mut self.rxq,
            2 * k,
            &[(h, VNET_HDR_LEN as u32, F_WRITE), (d, data_len, F_WRITE)],
        );
    }

    /// Used RX elements since last time, as (id, len, header+frame bytes).
    fn take_rx(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rxq.used_idx() {
            let (id, len) = self.rxq.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let k = u64::from(id / 2);
            let mut bytes = vec![0u8; len as usize];
            if len as usize >= VNET_HDR_LEN {
                let (h, d) = (RX_HDR + k * 0x20, RX_DATA + k * RX_SLOT);
                self.mem
                    .read_slice(&mut bytes[..VNET_HDR_LEN], GuestAddress(h))
                    .unwrap();
                self.mem
                    .read_slice(&mut bytes[VNET_HDR_LEN..], GuestAddress(d))
                    .unwrap();
            }
            out.push((id, len, bytes));
        }
        out
    }

    /// Sends `data` from the guest as header + frame in two descriptors
    /// starting at `first`; returns the used length.
    fn send(&mut self, first: u16, data: &[u8]) -> u32 {
        let at = TX_BUF + u64::from(first) * 0x1_0000 % 0xf_0000;
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
        let split = data.len().min(VNET_HDR_LEN) as u32;
        write_chain(
            &mut self.txq,
            first,
            &[
                (at, split, 0),
                (at + u64::from(split), data.len() as u32 - split, 0),
            ],
        );
        self.dev.process_queue(TXQ).unwrap();
        self.last_tx_used()
    }

    fn last_tx_used(&mut self) -> u32 {
        assert_ne!(self.tx_seen, self.txq.used_idx(), "TX chain used");
        let mut len = 0;
        while self.tx_seen != self.txq.used_idx() {
            len = self.txq.used_elem(self.tx_seen).1;
            self.tx_seen = self.tx_seen.wrapping_add(1);
        }
        len
    }

    fn peer_recv(&self) -> Vec<u8> {
        let mut b = vec![0u8; MAX_BUFFER_LEN + 16];
        let n = self.peer.recv(&mut b).unwrap();
        b.truncate(n);
        b
    }

    fn metric(&self, f: impl Fn(&NetMetrics) -> &AtomicU64) -> u64 {
        NetMetrics::get(f(&self.dev.metrics))
    }
}

#[test]
fn features_config_space_and_queues() {
    let (b, _peer) = UnixDgramBackend::pair().unwrap();
    let mut dev = Net::new(Box::new(b), Some(MAC)).unwrap();
    assert_eq!(dev.device_type(), 1);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 2]);
    let f = dev.avail_features();
    assert_eq!(f, BASE_FEATURES | features::MAC);
    for bit in [
        VIRTIO_F_VERSION_1,
        features::CSUM,
        features::GUEST_CSUM,
        features::HOST_TSO4,
        features::HOST_TSO6,
        features::GUEST_TSO4,
        features::GUEST_TSO6,
        features::STATUS,
    ] {
        assert_ne!(f & bit, 0, "{bit:#x} offered");
    }
    assert_eq!(f & features::MRG_RXBUF, 0, "no mergeable RX buffers");
    assert_eq!(f & (features::HOST_UFO | features::GUEST_UFO), 0, "no UFO");
    let mut cfg = [0xffu8; 12];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &MAC);
    assert_eq!(u16::from_le_bytes([cfg[6], cfg[7]]), STATUS_LINK_UP);
    assert_eq!(&cfg[8..], &[0; 4]);
    let mut b = [0xffu8; 2];
    dev.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0, 0]);
    assert!(matches!(
        dev.write_config(0, &[1]),
        Err(VirtioError::ReadOnlyConfig { .. })
    ));
    assert!(matches!(
        dev.process_queue(2),
        Err(VirtioError::BadQueueIndex(2))
    ));
    // Inactive: nothing happens, RX reports blocked.
    assert!(!dev.process_tx().unwrap());
    assert_eq!(dev.process_rx().unwrap(), RxState::Blocked);

    let (b, _peer) = UnixDgramBackend::pair().unwrap();
    let dev = Net::new(Box::new(b), None).unwrap();
    assert_eq!(
        dev.avail_features() & features::MAC,
        0,
        "no MAC, no MAC feature"
    );
}

#[test]
fn offload_flags_follow_acked_features() {
    use tun_flags::*;
    assert_eq!(tap_offload_flags(VIRTIO_F_VERSION_1), 0);
    assert_eq!(tap_offload_flags(features::GUEST_CSUM), CSUM);
    // TSO without checksum offload is meaningless: nothing.
    assert_eq!(
        tap_offload_flags(features::GUEST_TSO4 | features::GUEST_TSO6),
        0
    );
    assert_eq!(
        tap_offload_flags(features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_TSO6),
        CSUM | TSO4 | TSO6
    );
    assert_eq!(
        tap_offload_flags(features::GUEST_CSUM | features::GUEST_ECN),
        CSUM,
        "ECN needs TSO"
    );
    assert_eq!(
        tap_offload_flags(features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_ECN),
        CSUM | TSO4 | TSO_ECN
    );
    // Host-side offloads (what the guest sends) need no tap flag.
    assert_eq!(
        tap_offload_flags(features::CSUM | features::HOST_TSO4 | features::HOST_TSO6),
        0
    );

    let mem = guest_memory();
    let acked = BASE_FEATURES | features::MAC;
    let mut r = rig_with(&mem, acked);
    assert_eq!(r.dev.offload(), CSUM | TSO4 | TSO6 | TSO_ECN);
    r.dev.reset();
    assert_eq!(r.dev.offload(), 0, "reset clears offloads");
}

#[test]
fn tx_frame_reaches_the_backend() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    let f = frame(60, 1);
    assert_eq!(r.send(0, &f), 0, "TX chains are returned with length 0");
    assert_eq!(r.peer_recv(), f, "header + frame, byte for byte");
    assert_ne!(r.irq.status() & INT_VRING, 0);
    // A big (GSO-sized) one.
    let big = frame(MAX_FRAME_LEN, 7);
    r.send(2, &big);
    assert_eq!(r.peer_recv(), big);
    assert_eq!(r.metric(|m| &m.tx_frames), 2);
    assert_eq!(r.metric(|m| &m.tx_bytes), (60 + MAX_FRAME_LEN) as u64);
    assert_eq!(r.metric(|m| &m.bad_chains), 0);
}

#[test]
fn rx_frame_reaches_the_guest() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    let f = frame(100, 3);
    r.peer.send(&f).unwrap();
    r.post_rx(0, 1514);
    r.dev.process_queue(RXQ).unwrap();
    let got = r.take_rx();
    assert_eq!(got.len(), 1);
    let (id, len, bytes) = &got[0];
    assert_eq!((*id, *len as usize), (0, f.len()));
    assert_eq!(&bytes[..10], &f[..10], "header from the backend");
    assert_eq!(
        u16::from_le_bytes([bytes[10], bytes[11]]),
        1,
        "num_buffers = 1"
    );
    assert_eq!(&bytes[12..], &f[12..]);
    assert_ne!(r.irq.status() & INT_VRING, 0);
    assert_eq!(r.metric(|m| &m.rx_frames), 1);
    assert_eq!(r.metric(|m| &m.rx_bytes), 100);
    // Nothing more: the next chain stays posted.
    r.post_rx(1, 1514);
    assert_eq!(r.dev.process_rx().unwrap(), RxState::Drained);
    assert!(r.take_rx().is_empty());
}

#[test]
fn frames_that_do_not_fit_are_dropped_not_truncated() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    r.post_rx(0, 100);
    let big = frame(200, 1);
    let small = frame(80, 2);
    r.peer.send(&big).unwrap();
    r.peer.send(&small).unwrap();
    // Oversized beyond any legal frame.
    let huge = vec![0u8; MAX_BUFFER_LEN + 8];
    r.peer.send(&huge).unwrap();
    let small2 = frame(64, 3);
    r.peer.send(&small2).unwrap();
    r.dev.process_queue(RXQ).unwrap();
    let got = r.take_rx();
    assert_eq!(got.len(), 1, "one chain, one frame");
    assert_eq!(
        got[0].1 as usize,
        small.len(),
        "the small frame took the chain"
    );
    assert_eq!(&got[0].2[12..], &small[12..]);
    assert_eq!(r.metric(|m| &m.rx_drops), 1);
    r.post_rx(1, 1514);
    r.dev.process_queue(RXQ).unwrap();
    let got = r.take_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(
        &got[0].2[12..],
        &small2[12..],
        "the oversized frame was dropped"
    );
    assert_eq!(r.metric(|m| &m.rx_drops), 2);
    assert_eq!(r.metric(|m| &m.rx_frames), 2);
}

#[test]
fn hostile_tx_chains_fail_alone() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    let f = frame(60, 9);
    mem.write_slice(&f, GuestAddress(TX_BUF)).unwrap();
    // Write-only descriptor in a TX chain.
    write_chain(
        &mut r.txq,
        0,
        &[(TX_BUF, 12, 0), (TX_BUF + 12, 60, F_WRITE)],
    );
    // Header too short (whole chain below 12 bytes).
    write_chain(&mut r.txq, 2, &[(TX_BUF, 8, 0)]);
    // Oversized length.
    write_chain(
        &mut r.txq,
        4,
        &[(TX_BUF, 12, 0), (TX_BUF, MAX_BUFFER_LEN as u32, 0)],
    );
    write_chain(&mut r.txq, 6, &[(TX_BUF, u32::MAX, 0)]);
    // Out of guest memory, and an overflowing address.
    write_chain(
        &mut r.txq,
        8,
        &[(TX_BUF, 12, 0), (GUEST_MEM_SIZE - 10, 60, 0)],
    );
    write_chain(&mut r.txq, 10, &[(TX_BUF, 12, 0), (u64::MAX - 10, 60, 0)]);
    // A loop (12 → 12) and a next index beyond the queue.
    r.txq.write_desc(12, TX_BUF, 12, F_NEXT, 12);
    r.txq.publish(12);
    r.txq.write_desc(13, TX_BUF, 12, F_NEXT, 999);
    r.txq.publish(13);
    r.dev.process_queue(TXQ).unwrap();
    let mut used = 0;
    while r.tx_seen != r.txq.used_idx() {
        assert_eq!(r.txq.used_elem(r.tx_seen).1, 0);
        r.tx_seen = r.tx_seen.wrapping_add(1);
        used += 1;
    }
    assert_eq!(used, 8, "every chain returned");
    // The looping chain sums 256 × 12 bytes (under the limit): it is a
    // readable chain and goes out as one 3 KiB frame. The bad next index
    // ends its chain after 12 bytes: a header-only frame. Both harmless;
    // everything else is refused.
    assert_eq!(r.metric(|m| &m.bad_chains), 6);
    let mut sent = 0;
    r.peer.set_nonblocking(true).unwrap();
    let mut b = vec![0u8; 8192];
    while r.peer.recv(&mut b).is_ok() {
        sent += 1;
    }
    r.peer.set_nonblocking(false).unwrap();
    assert_eq!(sent, 2);
    // The queue still works.
    let good = frame(60, 4);
    r.send(20, &good);
    assert_eq!(r.peer_recv(), good);
}

#[test]
fn hostile_rx_chains_fail_alone() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    let f = frame(60, 5);
    r.peer.send(&f).unwrap();
    // Read-only descriptor, too short for a header, outside guest memory,
    // overflowing address, looping.
    write_chain(&mut r.rxq, 0, &[(RX_HDR, 12, 0), (RX_DATA, 1514, F_WRITE)]);
    write_chain(&mut r.rxq, 2, &[(RX_HDR, 8, F_WRITE)]);
    write_chain(
        &mut r.rxq,
        4,
        &[(RX_HDR, 12, F_WRITE), (GUEST_MEM_SIZE - 100, 1514, F_WRITE)],
    );
    write_chain(&mut r.rxq, 6, &[(u64::MAX - 4, 1514, F_WRITE)]);
    r.post_rx(4, 1514);
    r.dev.process_queue(RXQ).unwrap();
    let got = r.take_rx();
    assert_eq!(got.len(), 5);
    for g in &got[..4] {
        assert_eq!(g.1, 0, "bad chain returned empty: {:?}", (g.0, g.1));
    }
    assert_eq!(got[4].0, 8);
    assert_eq!(
        &got[4].2[12..],
        &f[12..],
        "the frame survived the bad chains"
    );
    assert_eq!(r.metric(|m| &m.bad_chains), 4);
    assert_eq!(r.metric(|m| &m.rx_drops), 0);
}

#[test]
fn avail_index_too_far_ahead_is_a_device_error() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    r.txq.set_avail_idx(QSIZE + 10);
    assert!(matches!(r.dev.process_tx(), Err(VirtioError::Queue(_))));
    r.rxq.set_avail_idx(QSIZE + 10);
    r.peer.send(&frame(60, 1)).unwrap();
    // From the event loop: a device error is reported, not returned.
    assert_eq!(r.dev.process_backend_rx(), RxState::Blocked);
    assert!(r.irq.needs_reset());
}

#[test]
fn work_per_call_is_bounded() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    // TX: 200 chains, one call handles TX_BUDGET and asks to be woken.
    let _ = r.dev.wake_evt().read(); // the activation's wake
    let f = frame(60, 1);
    mem.write_slice(&f, GuestAddress(TX_BUF)).unwrap();
    for i in 0..200u16 {
        r.txq.write_desc(i, TX_BUF, f.len() as u32, 0, 0);
        r.txq.publish(i);
    }
    r.dev.process_queue(TXQ).unwrap();
    assert_eq!(usize::from(r.txq.used_idx()), TX_BUDGET);
    assert_eq!(r.dev.wake_evt().read().unwrap(), 1, "wake signalled");
    r.dev.process_wake();
    assert_eq!(r.txq.used_idx(), 200);
    assert!(r.dev.wake_evt().read().is_err(), "no more wakes");
    // RX: 100 frames and 100 buffers, one call moves RX_BUDGET.
    for i in 0..100u8 {
        r.peer.send(&frame(60, i)).unwrap();
    }
    for k in 0..100 {
        let d = RX_DATA + u64::from(k) * RX_SLOT;
        r.rxq.write_desc(k, d, 1514, F_WRITE, 0);
        r.rxq.publish(k);
    }
    assert_eq!(r.dev.process_rx().unwrap(), RxState::More);
    assert_eq!(usize::from(r.rxq.used_idx()), RX_BUDGET);
    // The rest; then the buffers are gone, so RX reports blocked.
    assert_eq!(r.dev.process_rx().unwrap(), RxState::Blocked);
    assert_eq!(r.rxq.used_idx(), 100);
    assert_eq!(r.metric(|m| &m.rx_frames), 100);
}

#[test]
fn tx_backend_refusal_drops_the_frame_only() {
    let mem = guest_memory();
    let mut r = rig(&mem);
    // Fill the peer's receive queue until the backend refuses.
    let f = frame(60_000, 1);
    let mut i = 0u16;
    while r.metric(|m| &m.tx_drops) == 0 {
        r.send(2 * (i % 100), &f);
        i += 1;
        assert!(i < 1000, "backend never refused");
    }
    let sent = r.metric(|m| &m.tx_frames);
    // Drain, then the queue still works.
    for _ in 0..sent {
        r.peer_recv();
    }
    let small = frame(60, 2);
    r.send(0, &small);
    assert_eq!(r.peer_recv(), small);
}

#[test]
fn event_loop_stops_polling_without_rx_buffers_and_resumes() {
    let mem = guest_memory();
    let r = rig(&mem);
    let Rig {
        dev, mut rxq, peer, ..
    } = r;
    let dev = Arc::new(Mutex::new(dev));
    let handler = Arc::new(Mutex::new(NetEventHandler::new(dev.clone())));
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().unwrap();
    em.add_subscriber(handler.clone());
    // Activation signalled a wake: handled, nothing else to do.
    em.run_with_timeout(10).unwrap();
    assert!(handler.lock().unwrap().backend_watched());
    // A frame arrives, the guest has no RX buffers: the handler stops
    // watching the backend instead of spinning on it.
    let f = frame(60, 8);
    peer.send(&f).unwrap();
    assert_eq!(em.run_with_timeout(100).unwrap(), 1);
    assert!(!handler.lock().unwrap().backend_watched());
    assert_eq!(em.run_with_timeout(20).unwrap(), 0, "no spinning");
    // The guest posts two buffers and notifies: the frame is delivered at
    // once, and since buffers are left the backend is re-armed through the
    // wake eventfd.
    rxq.write_desc(0, RX_DATA, 1514, F_WRITE, 0);
    rxq.publish(0);
    rxq.write_desc(1, RX_DATA + RX_SLOT, 1514, F_WRITE, 0);
    rxq.publish(1);
    dev.lock().unwrap().process_queue(RXQ).unwrap();
    assert_eq!(rxq.used_idx(), 1);
    em.run_with_timeout(100).unwrap();
    assert!(handler.lock().unwrap().backend_watched());
    // The next frame goes through the loop alone.
    peer.send(&frame(70, 9)).unwrap();
    em.run_with_timeout(100).unwrap();
    assert_eq!(rxq.used_idx(), 2);
    assert_eq!(rxq.used_elem(1).1 as usize, VNET_HDR_LEN + 70);
}

#[test]
fn a_restored_net_device_goes_on_from_its_ring_positions_on_a_new_backend() {
    let mem = guest_memory();
    let acked = BASE_FEATURES | features::MAC;
    let mut r = rig_with(&mem, acked);
    let f = frame(60, 1);
    r.send(0, &f);
    r.peer_recv();
    let snap = r.dev.save_state().unwrap();
    assert_eq!(snap.queues.len(), 2);
    assert_eq!(snap.queues[TXQ as usize].next_avail, 1);

    // Another device on another backend (the restored VMM's tap).
    let (backend, peer) = UnixDgramBackend::pair().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut b = Net::new(Box::new(backend), Some(MAC)).unwrap();
    let irq = test_interrupt();
    let ctx = activate_ctx(&mem, vec![r.rxq.queue(), r.txq.queue()], &irq, acked);
    b.restore_state(&snap, Some(ctx)).unwrap();
    assert!(b.is_activated());
    assert_eq!(
        b.offload(),
        tun_flags::CSUM | tun_flags::TSO4 | tun_flags::TSO6 | tun_flags::TSO_ECN
    );
    assert!(
        b.wake_evt().read().is_err(),
        "the tap is not polled before the guest runs"
    );
    b.wake_after_restore().unwrap();
    assert_eq!(
        b.wake_evt().read().unwrap(),
        1,
        "polling starts at the first run"
    );
    assert_eq!(b.save_state().unwrap(), snap);

    // The guest's next frame goes out on the new backend, from TX slot 1.
    let g = frame(80, 9);
    r.mem.write_slice(&g, GuestAddress(TX_BUF)).unwrap();
    write_chain(&mut r.txq, 2, &[(TX_BUF, g.len() as u32, 0)]);
    b.process_queue(TXQ).unwrap();
    assert_eq!(r.txq.used_idx(), 2);
    assert_eq!(r.txq.used_elem(1), (2, 0));
    let mut got = vec![0u8; 256];
    let n = peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &g[..]);
}
