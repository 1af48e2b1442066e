//! Fuzzing entry point for the vsock device and its hybrid muxer (cargo-fuzz
//! target `vsock_muxer`, and the stable smoke test in `test_utils`).
//!
//! `vsock_packet` parses one chain; this target plays whole conversations:
//! the input is a sequence of operations of a hostile guest (TX packets with
//! any header, RX buffers of any shape) and of host processes (connecting
//! with good or bad `CONNECT` lines, writing, reading, half-closing,
//! closing), plus the event loop running and time passing. It runs on the
//! real device, real unix sockets in a temporary directory and guest memory
//! with canaries around it, with no sleeps: every step is synchronous.
//!
//! The harness keeps its own account of both directions and checks after
//! every step:
//! - what a host stream reads (after its `OK <port>` line) is exactly the
//!   run of bytes the guest sent in RW packets on that connection, from
//!   when the connection was made: never more than the guest sent, nothing
//!   reordered or invented. TX chains are parsed again on the harness's
//!   side with the device's own parser, so malformed chains need no model;
//! - what the guest receives in RW packets is exactly what the host wrote
//!   on that stream (after the `CONNECT` line), within the credit the
//!   guest last gave;
//! - the device writes only into device-writable descriptors of RX chains
//!   it returns (the RX buffer area is compared byte for byte around every
//!   device call), never into TX buffers, and uses RX chains in order with
//!   a used length of 0 or header plus payload; every packet it sends is
//!   addressed to the guest's CID with a known operation
//!   (once the guest has used an RX chain whose buffers overlap others',
//!   packet contents are no longer checked: it may have overwritten them);
//! - every TX chain comes back at once with length 0 (the harness only
//!   publishes while the device is not throttled);
//! - the connection table holds no more than there are host streams and
//!   never exceeds the device's connection limit (`MAX_CONNECTIONS`, or as
//!   few as 1 when the input's flags lower it so that the limit is reached
//!   and host and guest connections beyond it are refused); each of its
//!   established connections is one the harness can name;
//! - the guest may reset the device at any step and set it up again:
//!   every connection ends (the host streams see end of file), nothing
//!   posted before survives, and everything above still holds after;
//! - at the end, once the host has read everything, the guest resets or
//!   shuts down every connection it knows of, the host closes its streams
//!   and the queues are drained, no connection is left;
//! - the canaries around guest memory are intact.

use std::cell::OnceCell;
use std::collections::{BTreeSet, HashMap};
use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::csm::ConnState;
use super::muxer::{parse_connect_line, ConnKey};
use super::packet::{op, parse_tx, shutdown, Header, RxPacket, HEADER_SIZE, TYPE_STREAM};
use super::test_utils::{activate_on, guest_queues_sized, TempDir};
use super::{Vsock, HOST_CID, LOCAL_PORT_BASE, MAX_CONNECTIONS, MAX_CONNECT_LINE, RXQ, TXQ};
use crate::devices::virtio::test_utils::{
    test_interrupt, FuzzInput, GuardedMemory, GuestQueue, F_NEXT, F_WRITE, REGIONS,
};
use crate::devices::virtio::VirtioDevice;

const GUEST_CID: u64 = 3;
/// The receive buffer an honest guest advertises on each connection.
const GUEST_BUF_ALLOC: u32 = 64 * 1024;
/// Host ports with a listener (`<uds>_<port>`), and one without.
const LISTEN_PORTS: [u32; 2] = [5000, 5001];
const DEAD_PORT: u32 = 5002;

const RX_QSIZE: u16 = 16;
const TX_QSIZE: u16 = 16;
/// RX chains in flight: descriptors 2k and 2k+1 each.
const SLOTS: usize = RX_QSIZE as usize / 2;
/// RX buffer area: one 1 KiB slot per chain, header at its start, data at
/// +64. Every byte of it is checked around every device call.
const RX_ARENA: u64 = 0x10_0000;
const SLOT_LEN: u64 = 0x400;
const SLOT_DATA: u64 = 64;
/// Large RX data buffers (above `MAX_PKT_BUF_SIZE`), one per slot.
const RX_BIG: u64 = 0x14_0000;
const BIG_LEN: u32 = 0x1_2000;
/// TX header and payload buffers.
const TX_HDR: u64 = 0x8000;
const TX_DATA: u64 = 0x1e_0000;
/// Most host streams per input (well under the listener's backlog, so a
/// connect never blocks), and most operations.
const MAX_STREAMS: usize = 48;
const MAX_OPS: usize = 256;

/// The A|B boundary, the end of B (a hole follows) and a place in no
/// region: where hostile descriptors point.
fn a_b_boundary() -> u64 {
    REGIONS[1].0
}
fn b_end() -> u64 {
    REGIONS[1].0 + REGIONS[1].1 as u64
}
const NOWHERE: u64 = 0x60_0000;

/// Payload byte `j` of the guest's stream on `key`: depends on both, so
/// bytes that reach the wrong stream or the wrong place are noticed.
fn guest_byte(key: ConnKey, j: usize) -> u8 {
    let x = (j as u32)
        .wrapping_mul(0x9e37_79b1)
        .wrapping_add(key.0.wrapping_mul(0x85eb_ca6b))
        ^ key.1.rotate_left(16);
    (x >> 24) as u8 ^ (j >> 8) as u8
}

/// Byte `j` a host process writes on its stream number `s`.
fn host_byte(s: usize, j: usize) -> u8 {
    ((j as u32).wrapping_mul(0x2545_f491) >> 24) as u8 ^ (s as u8).wrapping_mul(29) ^ (j >> 9) as u8
}

enum Init {
    /// The guest connected; the device connected this stream to a listener.
    Guest,
    /// A host process connected to the device's socket and wrote a line.
    Host {
        /// Bytes of the `OK <port>` line read so far; done at its newline.
        ok_line: Vec<u8>,
        ok_done: bool,
    },
}

/// One host process's stream, and what went through it.
struct HostStream {
    stream: Option<UnixStream>,
    init: Init,
    /// Everything written into it (for a host connection, the CONNECT line
    /// too).
    wrote: Vec<u8>,
    /// The connection it belongs to, once known.
    key: Option<ConnKey>,
    /// Where this connection starts in the guest's TX log of `key`.
    j0: usize,
    /// Guest bytes read from it.
    delivered: usize,
    /// Host bytes the guest received from it.
    guest_got: usize,
    /// The credit the device holds for the guest on this connection
    /// (`buf_alloc`, `fwd_cnt`).
    credit: (u32, u32),
}

impl HostStream {
    /// Where the data starts in `wrote`: after the CONNECT line, if the
    /// device can have accepted that line (None: it cannot, so no data
    /// may flow).
    fn data_start(&self) -> Option<usize> {
        match self.init {
            Init::Guest => Some(0),
            Init::Host { .. } => {
                // As the muxer reads: byte by byte, at most
                // MAX_CONNECT_LINE - 1 bytes before the newline.
                let nl = self
                    .wrote
                    .iter()
                    .take(MAX_CONNECT_LINE)
                    .position(|b| *b == b'\n')?;
                parse_connect_line(&self.wrote[..nl]).map(|_| nl + 1)
            }
        }
    }

    /// The guest port a host connection's line asked for.
    fn asked_port(&self) -> Option<u32> {
        let nl = self
            .wrote
            .iter()
            .take(MAX_CONNECT_LINE)
            .position(|b| *b == b'\n')?;
        parse_connect_line(&self.wrote[..nl])
    }
}

/// An RX chain the guest posted.
#[derive(Clone, Copy, Default)]
struct Slot {
    posted: bool,
    /// Its buffers may reach outside the slot or overlap each other: what
    /// the guest reads back from it (or from chains used with it) cannot
    /// be compared byte for byte.
    wild: bool,
}

struct Harness<'m> {
    mem: &'m GuestMemoryMmap,
    dev: Vsock,
    rxq: GuestQueue<'m>,
    txq: GuestQueue<'m>,
    /// The device's queues as the device reads them, replayed here.
    rx_shadow: Queue,
    tx_shadow: Queue,
    rx_seen: u16,
    slots: [Slot; SLOTS],
    listeners: Vec<(u32, UnixListener)>,
    uds: PathBuf,
    streams: Vec<HostStream>,
    /// The stream of each connection key (the latest one made).
    current: HashMap<ConnKey, usize>,
    /// Every RW payload byte the guest sent (and the device accepted from
    /// the chain) per key, `(local_port, peer_port)`.
    tx_log: HashMap<ConnKey, Vec<u8>>,
    /// The credit the guest last sent on each key.
    last_credit: HashMap<ConnKey, (u32, u32)>,
    /// Keys the guest has seen or used, in the order met.
    known: Vec<ConnKey>,
    known_set: BTreeSet<ConnKey>,
    /// The guest used a wild RX chain: what it read back since is not
    /// trustworthy (see `collect`).
    blind: bool,
    rbuf: Vec<u8>,
    /// The device's connection limit for this input.
    limit: usize,
    _dir: TempDir,
}

thread_local! {
    static FUZZ_MEMORY: OnceCell<GuardedMemory> = const { OnceCell::new() };
}

/// Fuzzing entry point. The first byte picks how the guest ends (bit 0:
/// SHUTDOWN of both directions rather than RST) and how many RX chains it
/// posts at the start (bits 1–2: 0, 2, 4, 8). Then each operation is a
/// byte (modulo 10: guest TX ×3, post an RX chain, event loop, host
/// connect, host write, host read, host close or half-close, time passes)
/// followed by its arguments (see the `op_*` methods). Must never panic;
/// see the module docs for what is checked.
pub fn fuzz_muxer(input: &[u8]) {
    ignore_sigpipe();
    FUZZ_MEMORY.with(|cell| {
        let guard = cell.get_or_init(GuardedMemory::new);
        guard.reset();
        run_input(guard.mem(), input);
        assert!(
            guard.canaries_intact(),
            "vsock touched host memory outside guest RAM"
        );
    });
}

/// A write to a stream whose other end is closed must fail with EPIPE, as
/// it does in the VMM: Rust's runtime ignores SIGPIPE before `main`, but a
/// libFuzzer binary has no Rust `main`, so the signal would kill the
/// fuzzer the first time the device (or a host process) writes to a
/// closed stream.
fn ignore_sigpipe() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: SIG_IGN installs no handler code; it only changes what
        // the process does on SIGPIPE, to what the VMM already does.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    });
}

/// Runs one input; returns the number of RW bytes that reached either side
/// (tests use it to show that the checks ran on real traffic).
fn run_input(mem: &GuestMemoryMmap, input: &[u8]) -> usize {
    let mut inp = FuzzInput::new(input);
    let flags = inp.u8();
    // The second byte: bits 0..=2 the connection limit (0: the real one),
    // bit 3 lets the guest reset the device. Both off, an input means what
    // it meant before they existed.
    let extra = inp.u8();
    let limit = match usize::from(extra & 7) {
        0 => MAX_CONNECTIONS,
        n => n,
    };
    let kinds = if extra & 8 != 0 { 11 } else { 10 };
    let Some(mut h) = Harness::new(mem, limit) else {
        return 0;
    };
    let normal = [0, 2, 4, 8][usize::from((flags >> 1) & 3)];
    h.post_normal(normal);
    let mut ops = 0;
    while !inp.is_empty() && ops < MAX_OPS {
        ops += 1;
        match inp.u8() % kinds {
            0..=2 => h.op_guest_tx(&mut inp),
            3 => h.op_post_rx(&mut inp),
            4 => h.device_call(|d| d.process_backend()),
            5 => h.op_host_connect(&mut inp),
            6 => h.op_host_write(&mut inp),
            7 => {
                let sel = inp.u8();
                if sel & 0x80 != 0 {
                    h.read_all_hosts();
                } else if let Some(s) = h.pick_stream(sel) {
                    h.host_read(s);
                }
            }
            8 => h.op_host_close(&mut inp),
            9 => {
                let later = if inp.u8() & 1 == 0 { 3 } else { 6 };
                let t = Instant::now() + Duration::from_secs(later);
                h.device_call(|d| {
                    d.muxer_mut().sweep(t);
                    let _ = d.process_queue(RXQ);
                });
            }
            _ => h.op_reset(normal),
        }
        h.check_table();
    }
    h.teardown(flags & 1 != 0);
    h.streams
        .iter()
        .map(|s| s.delivered + s.guest_got)
        .sum::<usize>()
}

/// Fresh RX, TX and event queues for `dev` (as a guest driver sets them up
/// at start and after a reset), and the device activated on them; returns
/// the RX and TX queues.
fn activate<'m>(
    mem: &'m GuestMemoryMmap,
    dev: &mut Vsock,
) -> Option<(GuestQueue<'m>, GuestQueue<'m>)> {
    let queues = guest_queues_sized(mem, RX_QSIZE, TX_QSIZE);
    activate_on(dev, mem, &queues, &test_interrupt()).ok()?;
    let [rxq, txq, _evq] = queues;
    Some((rxq, txq))
}

impl<'m> Harness<'m> {
    fn new(mem: &'m GuestMemoryMmap, limit: usize) -> Option<Self> {
        let dir = TempDir::new();
        let uds = dir.path().join("v.sock");
        let mut dev = Vsock::new(GUEST_CID, &uds).ok()?;
        dev.muxer_mut().set_max_connections(limit);
        let (rxq, txq) = activate(mem, &mut dev)?;
        let (rx_shadow, tx_shadow) = (rxq.queue(), txq.queue());
        let mut listeners = Vec::new();
        for port in LISTEN_PORTS {
            let l = UnixListener::bind(format!("{}_{port}", uds.display())).ok()?;
            l.set_nonblocking(true).ok()?;
            listeners.push((port, l));
        }
        Some(Harness {
            mem,
            dev,
            rxq,
            txq,
            rx_shadow,
            tx_shadow,
            rx_seen: 0,
            slots: [Slot::default(); SLOTS],
            listeners,
            uds,
            streams: Vec::new(),
            current: HashMap::new(),
            tx_log: HashMap::new(),
            last_credit: HashMap::new(),
            known: Vec::new(),
            known_set: BTreeSet::new(),
            blind: false,
            rbuf: Vec::new(),
            limit,
            _dir: dir,
        })
    }

    /// The guest resets the device and sets it up again, with `normal` RX
    /// chains posted as at the start. What the host streams hold is read
    /// first (it is the guest's, sent before the reset); after it no
    /// connection exists, so none is current and the streams only see end
    /// of file.
    fn op_reset(&mut self, normal: usize) {
        self.read_all_hosts();
        self.dev.reset();
        self.current.clear();
        let (rxq, txq) = activate(self.mem, &mut self.dev).expect("activate after a reset");
        self.rx_shadow = rxq.queue();
        self.tx_shadow = txq.queue();
        self.rxq = rxq;
        self.txq = txq;
        self.rx_seen = 0;
        self.slots = [Slot::default(); SLOTS];
        assert_eq!(
            self.dev.muxer().connection_count(),
            0,
            "a reset ends every connection"
        );
        self.post_normal(normal);
    }

    fn learn(&mut self, key: ConnKey) {
        if self.known_set.insert(key) {
            self.known.push(key);
        }
    }

    fn pick_stream(&self, sel: u8) -> Option<usize> {
        (!self.streams.is_empty()).then(|| usize::from(sel) % self.streams.len())
    }

    fn arena(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOTS * SLOT_LEN as usize];
        self.mem
            .read_slice(&mut b, GuestAddress(RX_ARENA))
            .expect("RX arena in guest RAM");
        b
    }

    /// Runs `f` on the device (as a queue notification or the event loop
    /// would), then takes what it put on the RX queue and checks that it
    /// wrote nothing in the RX area outside the chains it used.
    fn device_call(&mut self, f: impl FnOnce(&mut Vsock)) {
        let before = self.arena();
        f(&mut self.dev);
        let allowed = self.collect();
        let after = self.arena();
        // Slice comparison first: a byte loop would cost the fuzzer a
        // coverage callback per byte.
        if before == after {
            return;
        }
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let addr = RX_ARENA + i as u64;
            if b != a {
                assert!(
                    allowed
                        .iter()
                        .any(|&(s, l)| addr >= s && addr - s < u64::from(l)),
                    "device wrote RX area byte {addr:#x} outside the chains it used"
                );
            }
        }
    }

    /// Reads every RX chain the device used since last time. Returns the
    /// device-writable buffers of those chains.
    fn collect(&mut self) -> Vec<(u64, u32)> {
        let mut used = Vec::new();
        while self.rx_seen != self.rxq.used_idx() {
            let (id, len) = self.rxq.used_elem(self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let chain = self
                .rx_shadow
                .pop_descriptor_chain(self.mem)
                .expect("the device used an RX chain the guest never made available");
            assert_eq!(
                u32::from(chain.head_index()),
                id,
                "RX chains are used in order"
            );
            used.push((chain, len));
        }
        // A wild chain can write over the header or data of any chain used
        // with it (a later chain's buffers over an earlier one's, or a
        // chain's header over its own data), so from the first one on the
        // guest cannot trust what it reads back, and neither can the
        // harness: it stops checking packet contents (what the device
        // writes where is still checked).
        if used
            .iter()
            .any(|(c, _)| self.slots[usize::from(c.head_index() / 2)].wild)
        {
            self.blind = true;
        }
        let mut allowed = Vec::new();
        for (chain, len) in used {
            let slot = usize::from(chain.head_index() / 2);
            self.slots[slot] = Slot::default();
            let descs: Vec<Descriptor> = chain.clone().collect();
            let writable: u64 = descs
                .iter()
                .filter(|d| d.is_write_only())
                .map(|d| u64::from(d.len()))
                .sum();
            allowed.extend(
                descs
                    .iter()
                    .filter(|d| d.is_write_only())
                    .map(|d| (d.addr().0, d.len())),
            );
            assert!(
                u64::from(len) <= writable,
                "used length {len} exceeds the chain's {writable} writable bytes"
            );
            if len == 0 || self.blind {
                continue;
            }
            let mut c = chain;
            let pkt = RxPacket::parse(self.mem, &mut c)
                .expect("the device filled an RX chain it cannot parse");
            let mut raw = [0u8; HEADER_SIZE];
            self.mem
                .read_slice(&mut raw, descs[0].addr())
                .expect("RX header in guest RAM");
            let hdr = Header::from_bytes(&raw);
            assert_eq!(
                len as usize,
                HEADER_SIZE + hdr.len as usize,
                "used length is header plus payload: {hdr:?}"
            );
            assert!(hdr.len as usize <= pkt.data_capacity(), "{hdr:?}");
            let mut data = vec![0u8; hdr.len as usize];
            if hdr.len > 0 {
                pkt.data(hdr.len as usize)
                    .expect("payload buffer")
                    .copy_to(&mut data[..]);
            }
            self.on_rx(&hdr, &data);
        }
        allowed
    }

    /// A packet the guest received.
    fn on_rx(&mut self, hdr: &Header, data: &[u8]) {
        assert_eq!(hdr.dst_cid, GUEST_CID, "packet for another CID: {hdr:?}");
        assert_eq!(hdr.type_, TYPE_STREAM, "{hdr:?}");
        assert!(
            matches!(
                hdr.op,
                op::REQUEST
                    | op::RESPONSE
                    | op::RST
                    | op::SHUTDOWN
                    | op::RW
                    | op::CREDIT_UPDATE
                    | op::CREDIT_REQUEST
            ),
            "unknown operation sent to the guest: {hdr:?}"
        );
        assert!(hdr.op == op::RW || hdr.len == 0, "{hdr:?}");
        if hdr.op == op::SHUTDOWN {
            assert!(
                hdr.flags != 0 && hdr.flags & !shutdown::BOTH == 0,
                "{hdr:?}"
            );
        }
        let key = (hdr.src_port, hdr.dst_port);
        self.learn(key);
        match hdr.op {
            op::REQUEST => {
                assert_eq!(hdr.src_cid, HOST_CID, "{hdr:?}");
                assert!(hdr.src_port >= LOCAL_PORT_BASE, "{hdr:?}");
            }
            op::RW => {
                assert!(!data.is_empty(), "empty RW packet: {hdr:?}");
                let s = *self
                    .current
                    .get(&key)
                    .unwrap_or_else(|| panic!("RW for a connection no host stream has: {hdr:?}"));
                let st = &mut self.streams[s];
                let start = st
                    .data_start()
                    .expect("RW on a host connection whose line the device cannot have accepted");
                let sent = &st.wrote[start..];
                let end = st.guest_got + data.len();
                assert!(
                    end <= sent.len(),
                    "guest received {end} bytes, the host wrote {}: {hdr:?}",
                    sent.len()
                );
                assert!(
                    sent[st.guest_got..end] == *data,
                    "guest received bytes the host did not write there: {hdr:?}"
                );
                st.guest_got = end;
                let (buf_alloc, fwd_cnt) = st.credit;
                let in_flight = (st.guest_got as u32).wrapping_sub(fwd_cnt);
                assert!(
                    in_flight <= buf_alloc,
                    "device sent past the guest's credit ({in_flight} in flight, buf_alloc {buf_alloc}): {hdr:?}"
                );
            }
            _ => {}
        }
    }

    /// Posts `n` well-formed RX chains (as many as there are free slots).
    fn post_normal(&mut self, n: usize) {
        let mut posted = 0;
        for k in 0..SLOTS {
            if posted == n {
                break;
            }
            if !self.slots[k].posted {
                self.write_rx(
                    k,
                    &[
                        (self.slot_hdr(k), 44, F_WRITE),
                        (self.slot_hdr(k) + SLOT_DATA, 960, F_WRITE),
                    ],
                    false,
                );
                posted += 1;
            }
        }
        if posted > 0 {
            self.device_call(|d| {
                let _ = d.process_queue(RXQ);
            });
        }
    }

    fn slot_hdr(&self, k: usize) -> u64 {
        RX_ARENA + k as u64 * SLOT_LEN
    }

    /// Writes slot `k`'s chain (two descriptors at most) and makes it available.
    fn write_rx(&mut self, k: usize, descs: &[(u64, u32, u16)], wild: bool) {
        let head = (k * 2) as u16;
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = head + i as u16;
            let f = if i + 1 < descs.len() {
                flags | F_NEXT
            } else {
                flags
            };
            self.rxq.write_desc(idx, addr, len, f, idx + 1);
        }
        self.rxq.publish(head);
        self.slots[k] = Slot { posted: true, wild };
    }

    /// Post one RX chain: a mode byte (bits 0–2: normal ×2, big data
    /// buffer, one descriptor for header and data, read-only header,
    /// short header, read-only data, hostile; bits 3–5: the data length
    /// class) and, for hostile chains, one more byte.
    fn op_post_rx(&mut self, inp: &mut FuzzInput<'_>) {
        let m = inp.u8();
        let Some(k) = (0..SLOTS).find(|k| !self.slots[*k].posted) else {
            // No free chain: the guest just notifies again.
            self.device_call(|d| {
                let _ = d.process_queue(RXQ);
            });
            return;
        };
        let h = self.slot_hdr(k);
        let d = h + SLOT_DATA;
        let dlen = [960u32, 1, 44, 512, 64, 0, 900, 300][usize::from((m >> 3) & 7)];
        let hdr = (h, HEADER_SIZE as u32, F_WRITE);
        match m & 7 {
            0 | 1 => self.write_rx(k, &[hdr, (d, dlen, F_WRITE)], false),
            2 => {
                let big = RX_BIG + k as u64 * u64::from(BIG_LEN);
                self.write_rx(k, &[hdr, (big, BIG_LEN, F_WRITE)], false)
            }
            3 => self.write_rx(k, &[(h, HEADER_SIZE as u32 + dlen, F_WRITE)], false),
            4 => self.write_rx(k, &[(h, HEADER_SIZE as u32, 0), (d, dlen, F_WRITE)], false),
            5 => self.write_rx(k, &[(h, 20, F_WRITE), (d, dlen, F_WRITE)], false),
            6 => self.write_rx(k, &[hdr, (d, dlen, 0)], false),
            _ => {
                let descs = match inp.u8() % 7 {
                    // Data over the header.
                    0 => [hdr, (h + 8, 200, F_WRITE)],
                    // Data across the A|B boundary, or into the hole after B.
                    1 => [hdr, (a_b_boundary() - 100, 1000, F_WRITE)],
                    2 => [hdr, (b_end() - 100, 1000, F_WRITE)],
                    // Data over the next slots.
                    3 => [hdr, (d, 4096, F_WRITE)],
                    // Header outside guest RAM, or running off the end of B.
                    4 => [(NOWHERE, 44, F_WRITE), (d, dlen, F_WRITE)],
                    5 => [(b_end() - 20, 44, F_WRITE), (d, dlen, F_WRITE)],
                    _ => [hdr, (d, u32::MAX, F_WRITE)],
                };
                self.write_rx(k, &descs, true)
            }
        }
        self.device_call(|d| {
            let _ = d.process_queue(RXQ);
        });
    }

    /// One guest TX packet: an operation byte, a key byte (mostly a key
    /// the guest knows, else a listening, a dead or any port pair), a
    /// hostility byte (bit 0: any src_cid, 1: any dst_cid, 2: any type,
    /// 3: any flags, 4: any buf_alloc, 5: any fwd_cnt — each a raw value
    /// from the input; bits 6–7: chain layout) and the fields it asks for.
    fn op_guest_tx(&mut self, inp: &mut FuzzInput<'_>) {
        let opsel = inp.u8();
        let op = match opsel % 12 {
            0 | 1 | 8 => op::RW,
            2 => op::REQUEST,
            3 => op::RESPONSE,
            4 => op::CREDIT_UPDATE,
            5 => op::CREDIT_REQUEST,
            6 => op::SHUTDOWN,
            7 => op::RST,
            9 => op::INVALID,
            10 => 8 + u16::from(opsel >> 4),
            _ => inp.u16(),
        };
        let keysel = inp.u8();
        let (dst_port, src_port) = if keysel < 0xa0 && !self.known.is_empty() {
            self.known[usize::from(keysel) % self.known.len()]
        } else {
            let guest_port = 1000 + u32::from((keysel >> 2) & 3);
            match keysel & 3 {
                0 => (LISTEN_PORTS[0], guest_port),
                1 => (LISTEN_PORTS[1], guest_port),
                2 => (DEAD_PORT, guest_port),
                _ => (inp.u32(), inp.u32()),
            }
        };
        let key = (dst_port, src_port);
        let hostile = inp.u8();
        let honest_fwd = self
            .current
            .get(&key)
            .map_or(0, |&s| self.streams[s].guest_got as u32);
        let mut hdr = Header {
            src_cid: if hostile & 1 != 0 {
                inp.u64()
            } else {
                GUEST_CID
            },
            dst_cid: if hostile & 2 != 0 {
                inp.u64()
            } else {
                HOST_CID
            },
            src_port,
            dst_port,
            len: 0,
            type_: if hostile & 4 != 0 {
                inp.u16()
            } else {
                TYPE_STREAM
            },
            op,
            flags: if hostile & 8 != 0 {
                inp.u32()
            } else if op == op::SHUTDOWN {
                u32::from(inp.u8() % 4)
            } else {
                0
            },
            buf_alloc: if hostile & 16 != 0 {
                inp.u32()
            } else {
                GUEST_BUF_ALLOC
            },
            fwd_cnt: if hostile & 32 != 0 {
                inp.u32()
            } else {
                honest_fwd
            },
        };
        let layout = hostile >> 6;
        let data_len = if op == op::RW || layout == 2 {
            match inp.u16() {
                0xffff => 64 * 1024 + 1,
                l if l >= 0xf000 => 64 * 1024,
                l => u32::from(l & 0x1fff),
            }
        } else {
            0
        };
        hdr.len = data_len;
        let at = self.tx_log.get(&key).map_or(0, Vec::len);
        let payload: Vec<u8> = (0..data_len as usize)
            .map(|j| guest_byte(key, at + j))
            .collect();
        let mut data_at = TX_DATA;
        let mut hdr_at = TX_HDR;
        let mut descs: Vec<(u64, u32, u16)> = Vec::new();
        match layout {
            0 | 2 => {
                if layout == 2 {
                    let sub = inp.u8();
                    hdr.len = if sub & 1 != 0 {
                        data_len + 1 + u32::from(sub >> 1)
                    } else {
                        data_len / 2
                    };
                }
                descs.push((hdr_at, HEADER_SIZE as u32, 0));
                if data_len > 0 {
                    descs.push((data_at, data_len, 0));
                }
            }
            1 => {
                data_at = TX_HDR + HEADER_SIZE as u64;
                descs.push((hdr_at, HEADER_SIZE as u32 + data_len, 0));
            }
            _ => {
                let sub = inp.u8() % 8;
                let mut h = (hdr_at, HEADER_SIZE as u32, 0);
                let mut d = (data_at, data_len, 0);
                match sub {
                    0 => h.1 = 20,
                    1 => h.2 = F_WRITE,
                    2 => d.2 = F_WRITE,
                    3 => d.0 = a_b_boundary() - 100,
                    4 => d.0 = NOWHERE,
                    5 => h.0 = b_end() - 20,
                    _ => {}
                }
                hdr_at = h.0;
                data_at = d.0;
                descs.push(h);
                match sub {
                    // A header announcing data with no data descriptor.
                    6 => hdr.len = hdr.len.max(1),
                    // The data split over two descriptors.
                    7 if data_len > 1 => {
                        descs.push((data_at, data_len / 2, 0));
                        descs.push((
                            data_at + u64::from(data_len / 2),
                            data_len - data_len / 2,
                            0,
                        ));
                    }
                    _ if data_len > 0 => descs.push(d),
                    _ => {}
                }
            }
        }
        self.send_tx(&hdr, hdr_at, &payload, data_at, &descs);
    }

    /// Publishes one TX chain and checks what the device made of it.
    fn send_tx(
        &mut self,
        hdr: &Header,
        hdr_at: u64,
        payload: &[u8],
        data_at: u64,
        descs: &[(u64, u32, u16)],
    ) {
        // A throttled device leaves TX chains in the queue until the guest
        // takes its RX packets; the harness then drains RX first (and
        // gives up on this packet if that does not help).
        if self.dev.muxer().tx_throttled() {
            self.drain_rx(4);
            if self.dev.muxer().tx_throttled() {
                return;
            }
        }
        let _ = self.mem.write_slice(&hdr.to_bytes(), GuestAddress(hdr_at));
        let _ = self.mem.write_slice(payload, GuestAddress(data_at));
        for (i, &(addr, len, flags)) in descs.iter().enumerate() {
            let idx = i as u16;
            let f = if i + 1 < descs.len() {
                flags | F_NEXT
            } else {
                flags
            };
            self.txq.write_desc(idx, addr, len, f, idx + 1);
        }
        self.txq.publish(0);
        // The packet exactly as the device will see it.
        let parsed = self
            .tx_shadow
            .pop_descriptor_chain(self.mem)
            .and_then(|mut c| parse_tx(self.mem, &mut c).ok())
            .map(|p| {
                let mut data = vec![0u8; p.data.as_ref().map_or(0, |d| d.len())];
                if let Some(d) = p.data {
                    d.copy_to(&mut data[..]);
                }
                (p.hdr, data)
            });
        let before = self.txq.used_idx();
        self.device_call(|d| {
            let _ = d.process_queue(TXQ);
        });
        assert_eq!(
            self.txq.used_idx(),
            before.wrapping_add(1),
            "an unthrottled device takes a TX chain at once"
        );
        assert_eq!(
            self.txq.used_elem(before),
            (0, 0),
            "TX chains come back with length 0"
        );
        // TX buffers are the device's to read only.
        let mut back = vec![0u8; HEADER_SIZE];
        if self.mem.read_slice(&mut back, GuestAddress(hdr_at)).is_ok() {
            assert!(back == hdr.to_bytes(), "device wrote a TX header buffer");
        }
        let mut back = vec![0u8; payload.len()];
        if self
            .mem
            .read_slice(&mut back, GuestAddress(data_at))
            .is_ok()
        {
            assert!(back == payload, "device wrote a TX data buffer");
        }

        let Some((h, data)) = parsed else {
            return;
        };
        if h.src_cid != GUEST_CID || h.dst_cid != HOST_CID || h.type_ != TYPE_STREAM {
            return;
        }
        let key = (h.dst_port, h.src_port);
        self.learn(key);
        if h.op != op::RST {
            self.last_credit.insert(key, (h.buf_alloc, h.fwd_cnt));
            if let Some(&s) = self.current.get(&key) {
                self.streams[s].credit = (h.buf_alloc, h.fwd_cnt);
            }
        }
        if h.op == op::RW && !data.is_empty() {
            self.tx_log.entry(key).or_default().extend_from_slice(&data);
        }
        // A REQUEST to a listening port: the device connected (or not) just now.
        self.accept_all(if h.op == op::REQUEST { Some(&h) } else { None });
        // A RESPONSE to a host connection: its OK line was written just
        // now, before any later packet; read it so data is attributed from
        // here on.
        for s in 0..self.streams.len() {
            if matches!(self.streams[s].init, Init::Host { ok_done: false, .. }) {
                self.host_read(s);
            }
        }
    }

    /// Accepts what the device connected to the listeners: only a REQUEST
    /// (`req`) to that listener's port may have made one.
    fn accept_all(&mut self, req: Option<&Header>) {
        for i in 0..self.listeners.len() {
            let port = self.listeners[i].0;
            match self.listeners[i].1.accept() {
                Ok((stream, _)) => {
                    let req = req.filter(|r| r.dst_port == port).unwrap_or_else(|| {
                        panic!("the device connected to host port {port} unasked")
                    });
                    assert!(
                        self.listeners[i].1.accept().is_err(),
                        "one REQUEST, two connections"
                    );
                    assert!(stream.set_nonblocking(true).is_ok());
                    let key = (req.dst_port, req.src_port);
                    let j0 = self.tx_log.get(&key).map_or(0, Vec::len);
                    self.current.insert(key, self.streams.len());
                    self.streams.push(HostStream {
                        stream: Some(stream),
                        init: Init::Guest,
                        wrote: Vec::new(),
                        key: Some(key),
                        j0,
                        delivered: 0,
                        guest_got: 0,
                        credit: (req.buf_alloc, req.fwd_cnt),
                    });
                }
                Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock, "accept: {e}"),
            }
        }
    }

    /// A host process connects to the device's socket: a port byte and a
    /// line mode byte (good line, good line and data, no newline, CRLF,
    /// nothing, garbage, too long).
    fn op_host_connect(&mut self, inp: &mut FuzzInput<'_>) {
        let sel = inp.u8();
        let mode = inp.u8();
        if self.streams.len() >= MAX_STREAMS {
            return;
        }
        let port = if sel & 3 == 3 {
            inp.u32()
        } else {
            2000 + u32::from((sel >> 2) & 3)
        };
        let line: Vec<u8> = match mode % 8 {
            0 | 1 => format!("CONNECT {port}\n").into_bytes(),
            2 => {
                let mut l = format!("CONNECT {port}\n").into_bytes();
                let n = usize::from(inp.u8());
                let (s, base) = (self.streams.len(), l.len());
                l.extend((0..n).map(|j| host_byte(s, base + j)));
                l
            }
            3 => format!("CONNECT {port}").into_bytes(),
            4 => format!("CONNECT {port}\r\n").into_bytes(),
            5 => Vec::new(),
            6 => {
                let n = usize::from(inp.u8() % 48);
                let mut l = inp.bytes(n).to_vec();
                l.push(b'\n');
                l
            }
            _ => vec![b'A'; 40],
        };
        let Ok(mut stream) = UnixStream::connect(&self.uds) else {
            return;
        };
        assert!(stream.write_all(&line).is_ok());
        assert!(stream.set_nonblocking(true).is_ok());
        self.streams.push(HostStream {
            stream: Some(stream),
            init: Init::Host {
                ok_line: Vec::new(),
                ok_done: false,
            },
            wrote: line,
            key: None,
            j0: 0,
            delivered: 0,
            guest_got: 0,
            credit: (0, 0),
        });
    }

    /// A host process writes: a stream byte and a 16-bit length (up to 16 KiB).
    fn op_host_write(&mut self, inp: &mut FuzzInput<'_>) {
        let sel = inp.u8();
        let n = usize::from(inp.u16() % 0x4000);
        let Some(s) = self.pick_stream(sel) else {
            return;
        };
        let st = &mut self.streams[s];
        let Some(stream) = st.stream.as_mut() else {
            return;
        };
        let at = st.wrote.len();
        let buf: Vec<u8> = (0..n).map(|j| host_byte(s, at + j)).collect();
        // Non-blocking: a full socket takes part or nothing.
        if let Ok(w) = stream.write(&buf) {
            st.wrote.extend_from_slice(&buf[..w]);
        }
    }

    /// A host process shuts down its writing half (bit 0 of the byte) or
    /// closes its stream, after reading what is there.
    fn op_host_close(&mut self, inp: &mut FuzzInput<'_>) {
        let sel = inp.u8();
        let Some(s) = self.pick_stream(sel >> 1) else {
            return;
        };
        self.host_read(s);
        if sel & 1 != 0 {
            if let Some(st) = self.streams[s].stream.as_ref() {
                let _ = st.shutdown(Shutdown::Write);
            }
        } else {
            self.streams[s].stream = None;
        }
    }

    fn read_all_hosts(&mut self) {
        for s in 0..self.streams.len() {
            self.host_read(s);
        }
    }

    /// Reads what stream `s` has and checks it: a host connection's `OK`
    /// line first, then exactly the guest's bytes for that connection.
    fn host_read(&mut self, s: usize) {
        // One buffer for every read: a fresh 64 KiB per call would be most
        // of an input's cost.
        let mut buf = std::mem::take(&mut self.rbuf);
        buf.resize(64 * 1024, 0);
        self.host_read_into(s, &mut buf);
        self.rbuf = buf;
    }

    fn host_read_into(&mut self, s: usize, buf: &mut [u8]) {
        loop {
            let Some(stream) = self.streams[s].stream.as_mut() else {
                return;
            };
            let n = match stream.read(buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // WouldBlock, or a reset by the device's close.
                Err(_) => return,
            };
            let mut bytes = &buf[..n];
            if let Init::Host { ok_line, ok_done } = &mut self.streams[s].init {
                if !*ok_done {
                    let nl = bytes.iter().position(|b| *b == b'\n');
                    let take = nl.map_or(bytes.len(), |i| i + 1);
                    ok_line.extend_from_slice(&bytes[..take]);
                    bytes = &bytes[take..];
                    assert!(ok_line.len() <= 20, "host got a long line {ok_line:?}");
                    if nl.is_none() {
                        continue;
                    }
                    *ok_done = true;
                    let line = std::str::from_utf8(&ok_line[..ok_line.len() - 1])
                        .expect("the OK line is text");
                    let local: u32 = line
                        .strip_prefix("OK ")
                        .and_then(|p| p.parse().ok())
                        .unwrap_or_else(|| panic!("host got {line:?} instead of OK <port>"));
                    let port = self.streams[s]
                        .asked_port()
                        .expect("OK for a CONNECT line the device cannot have accepted");
                    let key = (local, port);
                    let j0 = self.tx_log.get(&key).map_or(0, Vec::len);
                    let credit = self.last_credit.get(&key).copied().unwrap_or((0, 0));
                    let st = &mut self.streams[s];
                    st.key = Some(key);
                    st.j0 = j0;
                    st.credit = credit;
                    self.current.insert(key, s);
                }
            }
            if bytes.is_empty() {
                continue;
            }
            let st = &mut self.streams[s];
            let key = st.key.expect("guest data on a stream of no connection");
            let log = self.tx_log.get(&key).map_or(&[][..], Vec::as_slice);
            let from = st.j0 + st.delivered;
            let to = from + bytes.len();
            assert!(
                to <= log.len(),
                "host stream got {} bytes, the guest sent {} on {key:?}",
                to - st.j0,
                log.len().saturating_sub(st.j0)
            );
            assert!(
                log[from..to] == *bytes,
                "host stream got bytes the guest did not send there ({key:?})"
            );
            st.delivered += bytes.len();
        }
    }

    /// Posts RX chains into every free slot and lets the device fill them,
    /// `rounds` times at most (until it owes the guest nothing).
    fn drain_rx(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.post_normal(SLOTS);
            if !self.dev.muxer().has_pending_rx() {
                break;
            }
        }
    }

    /// The connection table against what the harness knows.
    fn check_table(&self) {
        let m = self.dev.muxer();
        let n = m.connection_count();
        assert!(n <= self.limit, "{n} connections, limit {}", self.limit);
        assert!(
            n <= self.streams.len(),
            "{n} connections but only {} host streams were ever made",
            self.streams.len()
        );
        for key in m.connection_keys() {
            let state = m.connection(key).map(|c| c.state());
            if matches!(
                state,
                Some(ConnState::Established | ConnState::Closing | ConnState::PeerInit)
            ) {
                assert!(
                    self.current.contains_key(&key),
                    "connection {key:?} ({state:?}) has no host stream the harness knows"
                );
            }
        }
    }

    /// The end: the host reads everything, the guest resets (or shuts
    /// down) every connection it knows, the host closes its streams, the
    /// queues are drained: no connection may be left.
    fn teardown(&mut self, by_shutdown: bool) {
        let settle = |h: &mut Self| {
            for _ in 0..4 {
                h.read_all_hosts();
                h.device_call(|d| d.process_backend());
                h.drain_rx(4);
            }
        };
        settle(self);
        if self.blind {
            // A guest that scribbled over its own RX buffers may have lost
            // REQUESTs; it would learn those keys when the host's data or
            // the device's deadlines reach it. Here it is told them, so the
            // check below is still about the device.
            for key in self.dev.muxer().connection_keys() {
                self.learn(key);
            }
        }
        for key in self.known.clone() {
            let honest_fwd = self
                .current
                .get(&key)
                .map_or(0, |&s| self.streams[s].guest_got as u32);
            let hdr = Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: key.1,
                dst_port: key.0,
                len: 0,
                type_: TYPE_STREAM,
                op: if by_shutdown { op::SHUTDOWN } else { op::RST },
                flags: if by_shutdown { shutdown::BOTH } else { 0 },
                buf_alloc: GUEST_BUF_ALLOC,
                fwd_cnt: honest_fwd,
            };
            // Keep RX moving so the device is never throttled for long.
            self.drain_rx(1);
            self.send_tx(
                &hdr,
                TX_HDR,
                &[],
                TX_DATA,
                &[(TX_HDR, HEADER_SIZE as u32, 0)],
            );
        }
        settle(self);
        for st in &mut self.streams {
            st.stream = None;
        }
        settle(self);
        let m = self.dev.muxer();
        let left: Vec<_> = m
            .connection_keys()
            .into_iter()
            .map(|k| (k, m.connection(k).map(|c| c.state())))
            .collect();
        assert_eq!(
            m.connection_count(),
            0,
            "connections left after every one was {} and drained: {left:?}",
            if by_shutdown { "shut down" } else { "reset" }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-made conversation: the guest connects to a listening host
    /// port and sends data, the host reads it and answers, the guest reads
    /// that; then a host process connects to a guest port, the guest
    /// accepts and sends. Traffic must reach both sides (so the checks ran
    /// on it), and the teardown must leave nothing.
    #[test]
    fn crafted_conversation_is_checked() {
        for end in [0u8, 1] {
            let mut input = vec![end | (2 << 1), 0];
            // Guest REQUEST to 5000 from guest port 1000 (key byte 0xa0:
            // listening port 0, guest port 1000), honest.
            input.extend_from_slice(&[0, 2, 0xa0, 0]);
            // Guest RW of 300 bytes on the known key 0.
            input.extend_from_slice(&[0, 0, 0, 0]);
            input.extend_from_slice(&300u16.to_le_bytes());
            // Host reads all streams.
            input.extend_from_slice(&[7, 0x80]);
            // Host writes 100 bytes on stream 0, event loop runs.
            input.extend_from_slice(&[6, 0]);
            input.extend_from_slice(&100u16.to_le_bytes());
            input.push(4);
            // A host process connects to guest port 2000; event loop.
            input.extend_from_slice(&[5, 0, 0, 4]);
            // Guest RESPONSE on the key it learnt from the REQUEST
            // (known key 1), then RW of 50 bytes on it; host reads all.
            input.extend_from_slice(&[0, 3, 1, 0]);
            input.extend_from_slice(&[0, 0, 1, 0]);
            input.extend_from_slice(&50u16.to_le_bytes());
            input.extend_from_slice(&[7, 0x80]);
            let mem = GuardedMemory::new();
            let traffic = run_input(mem.mem(), &input);
            assert!(traffic >= 300 + 100 + 50, "traffic {traffic}");
            assert!(mem.canaries_intact());
        }
    }
    /// With the limit lowered to 2: three host processes connect to a
    /// guest port and the guest then connects to a host listener. The
    /// table never holds more than 2 (the harness checks after every step),
    /// so the third host stream and the guest's REQUEST are refused.
    #[test]
    fn the_connection_limit_holds_for_host_and_guest_connections() {
        let mut input = vec![2 << 1, 2];
        for _ in 0..3 {
            // A host process: CONNECT 2000; the event loop runs.
            input.extend_from_slice(&[5, 0, 0, 4]);
        }
        // Guest REQUEST to listening port 5000 from guest port 1000.
        input.extend_from_slice(&[0, 2, 0xa0, 0]);
        input.extend_from_slice(&[7, 0x80, 4]);
        let mem = GuardedMemory::new();
        run_input(mem.mem(), &input);
        assert!(mem.canaries_intact());
    }

    /// The guest resets the device in the middle of a conversation and then
    /// connects again on the same ports: the reset ends every connection
    /// (checked in `op_reset`), and the new connection carries its own
    /// bytes from its own start.
    #[test]
    fn a_reset_mid_conversation_ends_it_and_the_next_one_works() {
        let mut input = vec![2 << 1, 8];
        // Guest REQUEST to 5000 from guest port 1000, RW of 300 bytes,
        // host reads.
        input.extend_from_slice(&[0, 2, 0xa0, 0]);
        input.extend_from_slice(&[0, 0, 0, 0]);
        input.extend_from_slice(&300u16.to_le_bytes());
        input.extend_from_slice(&[7, 0x80]);
        // Reset, then the same again with 200 bytes.
        input.push(10);
        input.extend_from_slice(&[0, 2, 0xa0, 0]);
        input.extend_from_slice(&[0, 0, 0, 0]);
        input.extend_from_slice(&200u16.to_le_bytes());
        input.extend_from_slice(&[7, 0x80]);
        let mem = GuardedMemory::new();
        let traffic = run_input(mem.mem(), &input);
        assert!(traffic >= 300 + 200, "traffic {traffic}");
        assert!(mem.canaries_intact());
    }

    /// An input the fuzzer found where a wild RX chain (data running over
    /// the next slots) overwrote the header of a chain used before it in
    /// the same batch: the guest reads garbage there, which is its own
    /// doing, not the device's. The harness must not take it for a bug.
    #[test]
    fn a_wild_rx_chain_overwriting_another_is_not_a_device_bug() {
        const INPUT: &[u8] = &[
            0xed, 0x00, 0x0a, 0x4a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x4a, 0x00, 0x06, 0x6a, 0xfd,
            0x98, 0x98, 0x98, 0x98, 0x98, 0x9d, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98,
            0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98,
            0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x02, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x03, 0x00, 0x00, 0x00, 0x7a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x6a, 0x6a,
            0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a,
            0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a,
            0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a, 0x6a,
            0x6a, 0x6a, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x49, 0x3f,
            0x3f, 0x3f, 0x3f, 0x1f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f,
            0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f,
            0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x3f, 0x98,
            0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98,
            0x98, 0x98, 0x98, 0x98, 0x98, 0xad, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0x98, 0xd1,
        ];
        let mem = GuardedMemory::new();
        run_input(mem.mem(), INPUT);
        assert!(mem.canaries_intact());
    }
}
