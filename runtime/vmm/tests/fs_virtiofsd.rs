//! virtio-fs against a real virtiofsd: the test is the guest driver. It
//! drives the virtio-mmio transport (handshake, hiprio + request queues in
//! memfd-backed guest memory), then sends FUSE requests through the request
//! queue and reads virtiofsd's replies from guest memory: FUSE_INIT,
//! FUSE_LOOKUP, FUSE_OPEN, FUSE_READ of a host file, FUSE_FORGET on hiprio.
//! Also: no virtiofsd (bounded activation failure) and virtiofsd killed
//! while the device is in use (DEVICE_NEEDS_RESET, no panic).
//!
//! Needs a virtiofsd binary (`$VIRTIOFSD`, `PATH`, `~/.cargo/bin`); it runs
//! with `--sandbox=none`, which needs no privileges. Without virtiofsd the
//! tests say so and pass.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use boxlite_vmm::device_manager::bus::BusDevice;
use boxlite_vmm::devices::virtio::fs::{Fs, FsEventHandler};
use boxlite_vmm::devices::virtio::mmio::{reg, MmioTransport};
use boxlite_vmm::devices::virtio::{status, Interrupt, VirtioDevice, INT_CONFIG, INT_VRING};
use boxlite_vmm::vstate::memory::create_guest_memory;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const FILE_NAME: &str = "hello.txt";
const FILE_CONTENT: &[u8] = b"hello from the host through virtio-fs\n";
const QSIZE: u16 = 16;
const IN_BUF: u64 = 0x10_0000;
const OUT_BUF: u64 = 0x20_0000;
const OUT_LEN: u32 = 0x2000;
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

// ---- FUSE kernel ABI (7.31+), little endian ----

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_INIT: u32 = 26;
const FUSE_ROOT_ID: u64 = 1;

/// `struct fuse_in_header` (40 bytes).
struct FuseInHeader {
    len: u32,
    opcode: u32,
    unique: u64,
    nodeid: u64,
    uid: u32,
    gid: u32,
    pid: u32,
}

impl FuseInHeader {
    const SIZE: usize = 40;
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.opcode.to_le_bytes());
        out.extend_from_slice(&self.unique.to_le_bytes());
        out.extend_from_slice(&self.nodeid.to_le_bytes());
        out.extend_from_slice(&self.uid.to_le_bytes());
        out.extend_from_slice(&self.gid.to_le_bytes());
        out.extend_from_slice(&self.pid.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes()); // total_extlen
        out.extend_from_slice(&0u16.to_le_bytes()); // padding
    }
}

/// `struct fuse_out_header` (16 bytes).
#[derive(Debug)]
struct FuseOutHeader {
    len: u32,
    error: i32,
    unique: u64,
}

impl FuseOutHeader {
    const SIZE: usize = 16;
    fn decode(b: &[u8]) -> Self {
        FuseOutHeader {
            len: le32(b, 0),
            error: le32(b, 4) as i32,
            unique: le64(b, 8),
        }
    }
}

/// `struct fuse_init_in`, the 7.31 layout (16 bytes; no INIT_EXT).
struct FuseInitIn {
    major: u32,
    minor: u32,
    max_readahead: u32,
    flags: u32,
}

impl FuseInitIn {
    fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.major, self.minor, self.max_readahead, self.flags] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// The start of `struct fuse_init_out` (64 bytes for minor ≥ 23).
#[derive(Debug)]
struct FuseInitOut {
    major: u32,
    minor: u32,
    max_write: u32,
}

impl FuseInitOut {
    const SIZE: usize = 64;
    fn decode(b: &[u8]) -> Self {
        FuseInitOut {
            major: le32(b, 0),
            minor: le32(b, 4),
            max_write: le32(b, 20),
        }
    }
}

/// `struct fuse_entry_out` (40 bytes) + `struct fuse_attr` (88 bytes); the fields we check.
#[derive(Debug)]
struct FuseEntryOut {
    nodeid: u64,
    attr_ino: u64,
    attr_size: u64,
    attr_mode: u32,
}

impl FuseEntryOut {
    const SIZE: usize = 40 + 88;
    fn decode(b: &[u8]) -> Self {
        assert!(b.len() >= Self::SIZE, "fuse_entry_out is {} bytes", b.len());
        FuseEntryOut {
            nodeid: le64(b, 0),
            attr_ino: le64(b, 40),
            attr_size: le64(b, 48),
            // ino, size, blocks, atime, mtime, ctime (6 × u64), 3 × nsec u32, then mode.
            attr_mode: le32(b, 40 + 48 + 12),
        }
    }
}

/// `struct fuse_open_in` (8 bytes).
struct FuseOpenIn {
    flags: u32,
    open_flags: u32,
}

impl FuseOpenIn {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.open_flags.to_le_bytes());
    }
}

/// `struct fuse_open_out` (16 bytes): the file handle.
const FUSE_OPEN_OUT_SIZE: usize = 16;

/// `struct fuse_read_in` (40 bytes).
struct FuseReadIn {
    fh: u64,
    offset: u64,
    size: u32,
}

impl FuseReadIn {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.fh.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes()); // read_flags
        out.extend_from_slice(&0u64.to_le_bytes()); // lock_owner
        out.extend_from_slice(&0u32.to_le_bytes()); // flags
        out.extend_from_slice(&0u32.to_le_bytes()); // padding
    }
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

// ---- virtiofsd ----

fn virtiofsd_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VIRTIOFSD") {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.push("/usr/libexec".into());
    dirs.into_iter()
        .map(|d| d.join("virtiofsd"))
        .find(|p| p.is_file())
}

struct Virtiofsd {
    child: Child,
    log: PathBuf,
}

impl Virtiofsd {
    fn spawn(bin: &Path, sock: &Path, shared: &Path, log: PathBuf) -> Self {
        let err = std::fs::File::create(&log).expect("virtiofsd log");
        let child = Command::new(bin)
            .arg("--socket-path")
            .arg(sock)
            .arg("--shared-dir")
            .arg(shared)
            .arg("--sandbox=none")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .expect("spawn virtiofsd");
        Virtiofsd { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The virtiofsd to test against. These tests are `#[ignore]`d (plain
/// `cargo test` needs no helper daemons); when run, a missing virtiofsd is a
/// broken test host, so it fails rather than passing silently.
fn require_virtiofsd() -> PathBuf {
    virtiofsd_bin().expect(
        "no virtiofsd binary ($VIRTIOFSD, PATH, ~/.cargo/bin): cargo install --locked virtiofsd (scripts/test.sh does)",
    )
}

// ---- the guest driver ----

/// A split virtqueue as the guest driver lays it out.
struct GuestQueue {
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    last_used: u16,
}

impl GuestQueue {
    fn new(mem: &GuestMemoryMmap, base: u64) -> Self {
        let n = u64::from(QSIZE);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 3) & !3;
        mem.write_slice(&vec![0u8; 0x1000], GuestAddress(base))
            .expect("clear queue");
        GuestQueue {
            desc,
            avail,
            used,
            avail_idx: 0,
            last_used: 0,
        }
    }

    fn write_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let a = self.desc + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(a)).expect("desc");
        mem.write_obj(len, GuestAddress(a + 8)).expect("desc");
        mem.write_obj(flags, GuestAddress(a + 12)).expect("desc");
        mem.write_obj(next, GuestAddress(a + 14)).expect("desc");
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .expect("avail idx");
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).expect("used idx")
    }

    /// The next used element as (id, len).
    fn pop_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
        if self.used_idx(mem) == self.last_used {
            return None;
        }
        let a = self.used + 4 + 8 * u64::from(self.last_used % QSIZE);
        self.last_used = self.last_used.wrapping_add(1);
        Some((
            mem.read_obj(GuestAddress(a)).expect("used id"),
            mem.read_obj(GuestAddress(a + 4)).expect("used len"),
        ))
    }
}

struct Driver {
    t: MmioTransport,
    dev: Arc<Mutex<Fs>>,
    mem: GuestMemoryMmap,
    irq: Arc<Interrupt>,
    queues: Vec<GuestQueue>,
    unique: u64,
}

impl Driver {
    /// Guest memory as the VMM makes it (memfd, MAP_SHARED), the transport,
    /// and the queue eventfds handed to the device as the device manager does.
    fn new(fs: Fs) -> Self {
        let mem = create_guest_memory(64 << 20).expect("guest memory").mem;
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).expect("irq")));
        let dev = Arc::new(Mutex::new(fs));
        let t = MmioTransport::new(dev.clone(), mem.clone(), irq.clone()).expect("transport");
        {
            let mut d = dev.lock().expect("dev");
            assert!(d.has_external_backend());
            d.set_queue_evts(
                t.queue_evts()
                    .iter()
                    .map(|e| e.try_clone().expect("clone"))
                    .collect(),
            );
        }
        Driver {
            t,
            dev,
            mem,
            irq,
            queues: Vec::new(),
            unique: 0,
        }
    }

    fn r(&mut self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(&mut self, off: u64, v: u32) {
        self.t.write(off, &v.to_le_bytes());
    }

    fn tag(&mut self) -> String {
        let mut tag = Vec::new();
        for off in (0..36).step_by(4) {
            tag.extend_from_slice(&self.r(reg::CONFIG + off).to_le_bytes());
        }
        let end = tag.iter().position(|b| *b == 0).unwrap_or(tag.len());
        String::from_utf8(tag[..end].to_vec()).expect("utf-8 tag")
    }

    /// The Linux driver's steps up to DRIVER_OK; returns the status after it.
    fn bring_up(&mut self) -> u32 {
        use status::*;
        self.w(reg::STATUS, 0);
        assert_eq!(self.r(reg::MAGIC), 0x7472_6976);
        assert_eq!(self.r(reg::DEVICE_ID), 26);
        self.w(reg::STATUS, ACKNOWLEDGE);
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER);
        self.w(reg::DEVICE_FEATURES_SEL, 1);
        assert_ne!(self.r(reg::DEVICE_FEATURES) & 1, 0, "VERSION_1 offered");
        self.w(reg::DRIVER_FEATURES_SEL, 0);
        self.w(reg::DRIVER_FEATURES, 0);
        self.w(reg::DRIVER_FEATURES_SEL, 1);
        self.w(reg::DRIVER_FEATURES, 1); // VERSION_1
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_ne!(self.r(reg::STATUS) & FEATURES_OK, 0);
        assert_eq!(self.tag(), "share0");
        assert_eq!(self.r(reg::CONFIG + 36), 1, "num_request_queues");
        self.queues.clear();
        for q in 0..2u32 {
            let gq = GuestQueue::new(&self.mem, 0x1_0000 * (1 + u64::from(q)));
            self.w(reg::QUEUE_SEL, q);
            assert_eq!(self.r(reg::QUEUE_NUM_MAX), 1024);
            self.w(reg::QUEUE_NUM, u32::from(QSIZE));
            for (lo, addr) in [
                (reg::QUEUE_DESC_LOW, gq.desc),
                (reg::QUEUE_AVAIL_LOW, gq.avail),
                (reg::QUEUE_USED_LOW, gq.used),
            ] {
                self.w(lo, addr as u32);
                self.w(lo + 4, (addr >> 32) as u32);
            }
            self.w(reg::QUEUE_READY, 1);
            self.queues.push(gq);
        }
        self.w(reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        self.r(reg::STATUS)
    }

    /// Waits for the irqfd (virtiofsd writes it directly), then for a used
    /// element on queue `q`.
    fn wait_used(&mut self, q: usize) -> (u32, u32) {
        let deadline = Instant::now() + REPLY_TIMEOUT;
        loop {
            if let Some(u) = self.queues[q].pop_used(&self.mem) {
                // Linux reads InterruptStatus: VRING must be set.
                assert_ne!(self.r(reg::INTERRUPT_STATUS) & INT_VRING, 0);
                self.w(reg::INTERRUPT_ACK, INT_VRING);
                return u;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no used buffer on queue {q}");
            let mut pfd = libc::pollfd {
                fd: self.irq.eventfd().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(100) as i32) };
            let _ = self.irq.eventfd().read();
        }
    }

    /// One FUSE request on queue `q`: a readable buffer (header + body)
    /// then, if `reply_len` is set, a writable one of that size for the
    /// reply. Returns the reply bytes, or None for requests without reply.
    ///
    /// Like the Linux driver, READ gets a reply buffer of exactly header +
    /// size: virtiofsd 1.14 fails a READ with EIO when the buffer is larger
    /// and the file has more data than was asked for.
    fn fuse(
        &mut self,
        q: usize,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        reply_len: Option<u32>,
    ) -> Option<Vec<u8>> {
        self.unique += 1;
        let mut req = Vec::new();
        FuseInHeader {
            len: (FuseInHeader::SIZE + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            // SAFETY: getuid/getgid/getpid cannot fail.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            pid: std::process::id(),
        }
        .encode(&mut req);
        req.extend_from_slice(body);
        self.mem
            .write_slice(&req, GuestAddress(IN_BUF))
            .expect("request");
        self.mem
            .write_slice(&vec![0u8; OUT_LEN as usize], GuestAddress(OUT_BUF))
            .expect("reply buffer");
        let gq = &mut self.queues[q];
        if let Some(out_len) = reply_len {
            assert!(out_len <= OUT_LEN);
            gq.write_desc(&self.mem, 0, IN_BUF, req.len() as u32, 1, 1);
            gq.write_desc(&self.mem, 1, OUT_BUF, out_len, 2, 0);
        } else {
            gq.write_desc(&self.mem, 0, IN_BUF, req.len() as u32, 0, 0);
        }
        gq.publish(&self.mem, 0);
        self.w(reg::QUEUE_NOTIFY, q as u32);
        let (id, len) = self.wait_used(q);
        assert_eq!(id, 0);
        reply_len?;
        let mut out = vec![0u8; len as usize];
        self.mem
            .read_slice(&mut out, GuestAddress(OUT_BUF))
            .expect("reply");
        let h = FuseOutHeader::decode(&out);
        assert_eq!(h.unique, self.unique, "{h:?}");
        assert_eq!(h.len, len, "{h:?}");
        Some(out)
    }

    fn fuse_ok(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Vec<u8> {
        let reply_len = if opcode == FUSE_READ {
            // fuse_read_in.size sits at offset 16 of the body.
            FuseOutHeader::SIZE as u32 + le32(body, 16)
        } else {
            OUT_LEN
        };
        let out = self
            .fuse(1, opcode, nodeid, body, Some(reply_len))
            .expect("reply");
        let h = FuseOutHeader::decode(&out);
        assert_eq!(h.error, 0, "opcode {opcode}: {h:?}");
        out[FuseOutHeader::SIZE..].to_vec()
    }

    fn init(&mut self) {
        let mut body = Vec::new();
        FuseInitIn {
            major: 7,
            minor: 31,
            max_readahead: 0x2_0000,
            flags: 0,
        }
        .encode(&mut body);
        let out = self.fuse_ok(FUSE_INIT, 0, &body);
        assert!(
            out.len() >= FuseInitOut::SIZE,
            "init_out is {} bytes",
            out.len()
        );
        let init = FuseInitOut::decode(&out);
        assert_eq!(init.major, 7, "{init:?}");
        assert!(init.minor >= 31, "{init:?}");
        assert!(init.max_write > 0, "{init:?}");
    }
}

fn setup(dir: &Path) -> (PathBuf, PathBuf) {
    let shared = dir.join("shared");
    std::fs::create_dir(&shared).expect("shared dir");
    std::fs::write(shared.join(FILE_NAME), FILE_CONTENT).expect("file");
    (shared, dir.join("fs.sock"))
}

#[test]
#[ignore = "needs virtiofsd (scripts/test.sh installs it and runs --ignored)"]
fn fuse_init_lookup_open_read_through_virtiofsd() {
    let bin = require_virtiofsd();
    let dir = tempfile::tempdir().expect("tempdir");
    let (shared, sock) = setup(dir.path());
    let vfsd = Virtiofsd::spawn(&bin, &sock, &shared, dir.path().join("virtiofsd.log"));

    // Activation connects (retrying while virtiofsd starts up).
    let mut d = Driver::new(Fs::new("share0", &sock).expect("fs"));
    let st = d.bring_up();
    assert_eq!(
        st & status::DEVICE_NEEDS_RESET,
        0,
        "virtiofsd log:\n{}",
        vfsd.log()
    );
    assert_eq!(st & 0xf, 0xf);
    assert!(d.dev.lock().expect("dev").is_activated());

    d.init();

    // LOOKUP of the file in the root.
    let mut name = FILE_NAME.as_bytes().to_vec();
    name.push(0);
    let entry = FuseEntryOut::decode(&d.fuse_ok(FUSE_LOOKUP, FUSE_ROOT_ID, &name));
    assert_ne!(entry.nodeid, 0, "{entry:?}");
    assert_ne!(entry.attr_ino, 0, "{entry:?}");
    assert_eq!(entry.attr_size, FILE_CONTENT.len() as u64, "{entry:?}");
    assert_eq!(entry.attr_mode & libc::S_IFMT, libc::S_IFREG, "{entry:?}");

    // A name that does not exist: -ENOENT, the queue keeps working.
    let out = d
        .fuse(
            1,
            FUSE_LOOKUP,
            FUSE_ROOT_ID,
            b"missing.txt\0",
            Some(OUT_LEN),
        )
        .expect("reply");
    assert_eq!(FuseOutHeader::decode(&out).error, -libc::ENOENT);

    // OPEN read-only, then READ the whole file.
    let mut body = Vec::new();
    FuseOpenIn {
        flags: libc::O_RDONLY as u32,
        open_flags: 0,
    }
    .encode(&mut body);
    let open = d.fuse_ok(FUSE_OPEN, entry.nodeid, &body);
    assert!(open.len() >= FUSE_OPEN_OUT_SIZE);
    let fh = le64(&open, 0);

    let mut body = Vec::new();
    FuseReadIn {
        fh,
        offset: 0,
        size: 4096,
    }
    .encode(&mut body);
    let data = d.fuse_ok(FUSE_READ, entry.nodeid, &body);
    assert_eq!(data, FILE_CONTENT);

    // A read from the middle.
    let mut body = Vec::new();
    FuseReadIn {
        fh,
        offset: 6,
        size: 4,
    }
    .encode(&mut body);
    assert_eq!(d.fuse_ok(FUSE_READ, entry.nodeid, &body), b"from");

    // FORGET on the hiprio queue: no reply, but the buffer comes back.
    d.fuse(0, FUSE_FORGET, entry.nodeid, &1u64.to_le_bytes(), None);

    // Driver reset: vrings stopped, virtiofsd stays up for the next driver.
    d.w(reg::STATUS, 0);
    assert!(!d.dev.lock().expect("dev").is_activated());
    assert!(d.dev.lock().expect("dev").is_connected());
    let st = d.bring_up();
    assert_eq!(
        st & status::DEVICE_NEEDS_RESET,
        0,
        "virtiofsd log:\n{}",
        vfsd.log()
    );
    d.init();
    let again = FuseEntryOut::decode(&d.fuse_ok(FUSE_LOOKUP, FUSE_ROOT_ID, &name));
    assert_eq!(again.attr_size, FILE_CONTENT.len() as u64);
    assert_eq!(
        d.dev
            .lock()
            .expect("dev")
            .metrics
            .activations
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn missing_virtiofsd_fails_activation_within_a_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("nobody-listens.sock");
    let fs = Fs::new("share0", &sock)
        .expect("fs")
        .with_connect_timeout(Duration::from_millis(500));
    let mut d = Driver::new(fs);
    let t = Instant::now();
    let st = d.bring_up();
    let took = t.elapsed();
    assert_ne!(st & status::DEVICE_NEEDS_RESET, 0);
    assert_ne!(d.r(reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    assert!(took < Duration::from_secs(3), "{took:?}");
    let dev = d.dev.lock().expect("dev");
    assert!(!dev.is_activated());
    assert_eq!(
        dev.metrics
            .activation_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
#[ignore = "needs virtiofsd (scripts/test.sh installs it and runs --ignored)"]
fn virtiofsd_killed_mid_way_sets_needs_reset() {
    let bin = require_virtiofsd();
    let dir = tempfile::tempdir().expect("tempdir");
    let (shared, sock) = setup(dir.path());
    let mut vfsd = Virtiofsd::spawn(&bin, &sock, &shared, dir.path().join("virtiofsd.log"));
    let fs = Fs::new("share0", &sock)
        .expect("fs")
        .with_connect_timeout(Duration::from_millis(500));
    let mut d = Driver::new(fs);
    // The VMM event loop with the device's backend watch, as the builder wires it.
    type Sub = Arc<Mutex<dyn MutEventSubscriber + Send>>;
    let mut em: EventManager<Sub> = EventManager::new().expect("event manager");
    em.add_subscriber(Arc::new(Mutex::new(FsEventHandler::new(d.dev.clone()))));

    assert_eq!(
        d.bring_up() & status::DEVICE_NEEDS_RESET,
        0,
        "{}",
        vfsd.log()
    );
    d.init();
    em.run_with_timeout(0).expect("idle loop");
    assert_eq!(d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);

    vfsd.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while d.r(reg::STATUS) & status::DEVICE_NEEDS_RESET == 0 {
        assert!(Instant::now() < deadline, "virtiofsd's death not noticed");
        em.run_with_timeout(100).expect("event loop");
    }
    assert_ne!(d.r(reg::INTERRUPT_STATUS) & INT_CONFIG, 0);
    {
        let dev = d.dev.lock().expect("dev");
        assert!(!dev.is_activated() && !dev.is_connected());
        assert_eq!(
            dev.metrics
                .backend_lost
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
    // The driver resets and tries again: a clean, bounded failure.
    d.w(reg::STATUS, 0);
    assert_eq!(d.r(reg::STATUS), 0);
    let t = Instant::now();
    assert_ne!(d.bring_up() & status::DEVICE_NEEDS_RESET, 0);
    assert!(t.elapsed() < Duration::from_secs(3));
}
