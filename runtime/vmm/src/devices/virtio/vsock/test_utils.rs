//! A guest vsock driver for device tests: real guest memory, real split
//! queues written the way the Linux driver writes them, and a real muxer
//! listening on a unix socket in a temporary directory.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::packet::{op, Header, HEADER_SIZE, TYPE_STREAM};
use super::{Vsock, HOST_CID, RXQ, TXQ};
use crate::devices::virtio::test_utils::{
    activate_ctx, test_interrupt, GuestQueue, F_NEXT, F_WRITE,
};
use crate::devices::virtio::{Interrupt, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1};

pub const GUEST_CID: u64 = 3;
/// The guest's receive buffer per connection in these tests (Linux: 256 KiB).
pub const GUEST_BUF_ALLOC: u32 = 64 * 1024;
/// Data buffer of each RX chain (the Linux driver posts 4 KiB).
pub const RX_BUF: u32 = 4096;
const RX_QSIZE: u16 = 64;
const TX_QSIZE: u16 = 16;
const RX_HDR_BASE: u64 = 0x10_0000;
const RX_DATA_BASE: u64 = 0x20_0000;
const TX_HDR_BASE: u64 = 0x30_0000;
const TX_DATA_BASE: u64 = 0x31_0000;
const TX_DATA_SLOT: u64 = 0x1_0000;

/// One packet as the guest saw it (`None` header: returned with length 0).
#[derive(Debug, Clone)]
pub struct Received {
    pub hdr: Header,
    pub data: Vec<u8>,
    pub used_len: u32,
}

/// A private directory for the sockets of one rig, removed on drop (no
/// `tempfile`: this module also builds under `cfg(fuzzing)`).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("boxlite-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the guest driver talks to: the MMIO device run in the test's
/// thread, or the vhost-user backend on its own worker thread.
pub trait DeviceUnderTest {
    /// The driver published buffers on `queue` (the MMIO device's
    /// ioeventfd handler, or a vring kick).
    fn notify(&mut self, queue: u16);
    /// What the event loop does when the muxer's fd is readable (nothing
    /// for the vhost-user backend: its worker watches that fd itself).
    fn poll(&mut self);
}

impl DeviceUnderTest for Vsock {
    fn notify(&mut self, queue: u16) {
        self.process_queue(queue).unwrap();
    }

    fn poll(&mut self) {
        self.process_backend();
    }
}

pub struct Rig<'a, D: DeviceUnderTest = Vsock> {
    pub dev: D,
    pub mem: &'a GuestMemoryMmap,
    pub rxq: GuestQueue<'a>,
    pub txq: GuestQueue<'a>,
    pub irq: Arc<Interrupt>,
    pub dir: TempDir,
    pub uds: PathBuf,
    rx_free: Vec<u16>,
    rx_seen: u16,
    tx_free: Vec<u16>,
    tx_seen: u16,
    /// Re-post RX chains as soon as they are read back.
    pub auto_rx: bool,
    /// Packets received but not yet taken by the test.
    pub inbox: Vec<Received>,
}

/// The driver's RX and TX queues (and an event queue nobody uses) in
/// guest memory.
pub fn guest_queues(mem: &GuestMemoryMmap) -> [GuestQueue<'_>; 3] {
    guest_queues_sized(mem, RX_QSIZE, TX_QSIZE)
}

/// [`guest_queues`] with RX and TX queues of the given sizes.
pub fn guest_queues_sized(mem: &GuestMemoryMmap, rx: u16, tx: u16) -> [GuestQueue<'_>; 3] {
    [
        GuestQueue::new(mem, rx, 0x1000),
        GuestQueue::new(mem, tx, 0x3000),
        GuestQueue::new(mem, 4, 0x5000),
    ]
}

/// Activates `dev` on `queues` (RX, TX, event) with `VERSION_1`, as a
/// guest driver does at start and after a reset.
pub fn activate_on(
    dev: &mut Vsock,
    mem: &GuestMemoryMmap,
    queues: &[GuestQueue<'_>; 3],
    irq: &Arc<Interrupt>,
) -> Result<(), VirtioError> {
    dev.activate(activate_ctx(
        mem,
        queues.iter().map(GuestQueue::queue).collect(),
        irq,
        VIRTIO_F_VERSION_1,
    ))
}

impl<'a> Rig<'a, Vsock> {
    /// An activated MMIO device with `initial_rx` RX chains posted.
    pub fn new(mem: &'a GuestMemoryMmap, initial_rx: usize) -> Self {
        let dir = TempDir::new();
        let uds = dir.path().join("vsock.sock");
        let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();
        let queues = guest_queues(mem);
        let irq = test_interrupt();
        activate_on(&mut dev, mem, &queues, &irq).unwrap();
        let [rxq, txq, _evq] = queues;
        Rig::with_device(dev, mem, [rxq, txq], irq, dir, uds, initial_rx)
    }
}

impl<'a, D: DeviceUnderTest> Rig<'a, D> {
    /// A rig around a started device.
    pub fn with_device(
        dev: D,
        mem: &'a GuestMemoryMmap,
        [rxq, txq]: [GuestQueue<'a>; 2],
        irq: Arc<Interrupt>,
        dir: TempDir,
        uds: PathBuf,
        initial_rx: usize,
    ) -> Self {
        let mut rig = Rig {
            dev,
            mem,
            rxq,
            txq,
            irq,
            dir,
            uds,
            rx_free: (0..RX_QSIZE / 2).rev().map(|k| k * 2).collect(),
            rx_seen: 0,
            // Descriptors 14 and 15 are kept for `send_raw`.
            tx_free: (0..TX_QSIZE / 2 - 1).rev().map(|k| k * 2).collect(),
            tx_seen: 0,
            auto_rx: true,
            inbox: Vec::new(),
        };
        rig.post_rx(initial_rx);
        rig
    }

    fn rx_addrs(head: u16) -> (u64, u64) {
        let k = u64::from(head / 2);
        (
            RX_HDR_BASE + k * 0x100,
            RX_DATA_BASE + k * u64::from(RX_BUF),
        )
    }

    /// Posts `n` RX chains (header + 4 KiB data) and notifies the device.
    pub fn post_rx(&mut self, n: usize) {
        self.post_rx_quiet(n);
        self.dev.notify(RXQ);
    }

    fn post_rx_quiet(&mut self, n: usize) {
        for _ in 0..n {
            let head = self.rx_free.pop().expect("free RX chain");
            let (h, d) = Self::rx_addrs(head);
            self.rxq
                .write_desc(head, h, HEADER_SIZE as u32, F_WRITE | F_NEXT, head + 1);
            self.rxq.write_desc(head + 1, d, RX_BUF, F_WRITE, 0);
            self.rxq.publish(head);
        }
    }

    /// RX chains currently posted.
    pub fn rx_posted(&self) -> usize {
        usize::from(RX_QSIZE / 2) - self.rx_free.len()
    }

    /// Reads every RX chain the device returned since last time into `inbox`.
    pub fn collect(&mut self) {
        let mut reposted = 0;
        while self.rx_seen != self.rxq.used_idx() {
            let (id, len) = self.rxq.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let head = u16::try_from(id).unwrap();
            let (h, d) = Self::rx_addrs(head);
            let mut raw = [0u8; HEADER_SIZE];
            let mut data = Vec::new();
            if len as usize >= HEADER_SIZE {
                self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
                data = vec![0u8; len as usize - HEADER_SIZE];
                self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
            }
            self.inbox.push(Received {
                hdr: Header::from_bytes(&raw),
                data,
                used_len: len,
            });
            if head % 2 == 0 && head < RX_QSIZE {
                self.rx_free.push(head);
                reposted += 1;
            }
        }
        if self.auto_rx && reposted > 0 {
            self.post_rx(reposted);
        }
    }

    /// Runs the backend (as the event loop would) and collects packets.
    pub fn pump(&mut self) {
        self.dev.poll();
        self.collect();
    }

    /// Pumps until `n` packets are in the inbox (or 2 s pass); takes them.
    pub fn expect(&mut self, n: usize) -> Vec<Received> {
        let end = Instant::now() + Duration::from_secs(2);
        loop {
            self.pump();
            if self.inbox.len() >= n || Instant::now() > end {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            self.inbox.len() >= n,
            "expected {n} packets, got {:?}",
            self.inbox
        );
        self.inbox.drain(..n).collect()
    }

    /// Pumps a few times and asserts that the guest got nothing.
    pub fn expect_nothing(&mut self) {
        for _ in 0..5 {
            self.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(self.inbox.is_empty(), "unexpected packets {:?}", self.inbox);
    }

    /// A guest header from guest port `src_port` to host port `dst_port`.
    pub fn hdr(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: 0,
        }
    }

    fn take_tx_head(&mut self) -> u16 {
        // A device on another thread returns TX chains a little later.
        let end = Instant::now() + Duration::from_secs(2);
        self.reclaim_tx();
        while self.tx_free.is_empty() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(1));
            self.reclaim_tx();
        }
        self.tx_free.pop().expect("free TX chain")
    }

    fn reclaim_tx(&mut self) {
        while self.tx_seen != self.txq.used_idx() {
            let (id, len) = self.txq.used_elem(self.tx_seen);
            assert_eq!(len, 0, "TX chains are returned with length 0");
            self.tx_seen = self.tx_seen.wrapping_add(1);
            let head = u16::try_from(id).unwrap();
            if head % 2 == 0 && head < TX_QSIZE {
                self.tx_free.push(head);
            }
        }
    }

    /// Sends one packet (header descriptor + data descriptor when there is
    /// data); `hdr.len` is set from `data` unless `keep_len`.
    pub fn send_with(&mut self, mut hdr: Header, data: &[u8], keep_len: bool) {
        assert!(data.len() <= TX_DATA_SLOT as usize);
        if !keep_len {
            hdr.len = data.len() as u32;
        }
        let head = self.take_tx_head();
        let k = u64::from(head / 2);
        let (h, d) = (TX_HDR_BASE + k * 0x100, TX_DATA_BASE + k * TX_DATA_SLOT);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if data.is_empty() {
            self.txq.write_desc(head, h, HEADER_SIZE as u32, 0, 0);
        } else {
            self.mem.write_slice(data, GuestAddress(d)).unwrap();
            self.txq
                .write_desc(head, h, HEADER_SIZE as u32, F_NEXT, head + 1);
            self.txq.write_desc(head + 1, d, data.len() as u32, 0, 0);
        }
        self.txq.publish(head);
        self.dev.notify(TXQ);
        self.reclaim_tx();
        self.collect();
    }

    pub fn send(&mut self, hdr: Header, data: &[u8]) {
        self.send_with(hdr, data, false);
    }

    /// Publishes a hand-made TX chain (hostile tests): `descs` are
    /// (addr, len, flags) using descriptors 14 and 15, linked in order.
    pub fn send_raw(&mut self, descs: &[(u64, u32, u16)]) {
        assert!(!descs.is_empty() && descs.len() <= 2);
        let first = 16 - descs.len() as u16;
        for (i, (addr, len, flags)) in descs.iter().enumerate() {
            let idx = first + i as u16;
            let more = i + 1 < descs.len();
            let f = if more { flags | F_NEXT } else { *flags };
            self.txq.write_desc(idx, *addr, *len, f, idx + 1);
        }
        self.txq.publish(first);
        self.dev.notify(TXQ);
        // Hand-made chains use descriptors outside the free list.
        while self.tx_seen != self.txq.used_idx() {
            let (id, len) = self.txq.used_elem(self.tx_seen);
            assert_eq!(len, 0);
            self.tx_seen = self.tx_seen.wrapping_add(1);
            if id % 2 == 0 && id < u32::from(TX_QSIZE) && id < u32::from(first) {
                self.tx_free.push(id as u16);
            }
        }
        self.collect();
    }

    /// The path a guest connection to host port `port` goes to.
    pub fn port_path(&self, port: u32) -> PathBuf {
        PathBuf::from(format!("{}_{port}", self.uds.display()))
    }

    /// Host side opens a stream to guest port `port`: CONNECT, the device's
    /// REQUEST, the guest's RESPONSE, `OK <local_port>`. Returns the host
    /// stream and the local port.
    pub fn host_connect(&mut self, guest_port: u32) -> (UnixStream, u32) {
        let mut s = UnixStream::connect(&self.uds).unwrap();
        s.write_all(format!("CONNECT {guest_port}\n").as_bytes())
            .unwrap();
        let p = self.expect(1).remove(0);
        assert_eq!(p.hdr.op, op::REQUEST, "{p:?}");
        assert_eq!(p.hdr.dst_port, guest_port);
        let local = p.hdr.src_port;
        let resp = self.hdr(op::RESPONSE, guest_port, local);
        self.send(resp, &[]);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while !line.ends_with(b"\n") {
            assert_eq!(s.read(&mut b).unwrap(), 1, "OK line: {line:?}");
            line.push(b[0]);
        }
        assert_eq!(line, format!("OK {local}\n").into_bytes());
        (s, local)
    }

    /// The guest opens a stream from `guest_port` to host port `host_port`
    /// where `listener` listens. Returns the accepted host stream.
    pub fn guest_connect(
        &mut self,
        listener: &UnixListener,
        guest_port: u32,
        host_port: u32,
    ) -> UnixStream {
        let req = self.hdr(op::REQUEST, guest_port, host_port);
        self.send(req, &[]);
        let p = self.expect(1).remove(0);
        assert_eq!(p.hdr.op, op::RESPONSE, "{p:?}");
        assert_eq!(
            (p.hdr.src_port, p.hdr.dst_port, p.hdr.dst_cid),
            (host_port, guest_port, GUEST_CID)
        );
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }
}
