//! virtio-fs device tests against a scripted vhost-user backend (a unix
//! socket speaking raw vhost-user), so refusals and hang-ups can be staged.
//! `tests/fs_virtiofsd.rs` runs the device against a real virtiofsd.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::devices::virtio::test_utils::{activate_ctx, guest_memory, test_interrupt, GuestQueue};
use crate::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VirtioError, INT_VRING};
use crate::vstate::memory::create_guest_memory;

// vhost-user request codes.
const GET_FEATURES: u32 = 1;
const SET_FEATURES: u32 = 2;
const SET_OWNER: u32 = 3;
const SET_MEM_TABLE: u32 = 5;
const SET_VRING_NUM: u32 = 8;
const SET_VRING_ADDR: u32 = 9;
const SET_VRING_BASE: u32 = 10;
const GET_VRING_BASE: u32 = 11;
const SET_VRING_KICK: u32 = 12;
const SET_VRING_CALL: u32 = 13;
const GET_PROTOCOL_FEATURES: u32 = 15;
const SET_PROTOCOL_FEATURES: u32 = 16;
const GET_QUEUE_NUM: u32 = 17;
const SET_VRING_ENABLE: u32 = 18;
const RESET_DEVICE: u32 = 34;

const F_EVENT_IDX: u64 = 1 << 29;
const F_PROTOCOL: u64 = 1 << 30;
const F_VERSION_1: u64 = 1 << 32;
/// MQ | REPLY_ACK | BACKEND_REQ | CONFIG | RESET_DEVICE | CONFIGURE_MEM_SLOTS, as virtiofsd.
const PROTO_VIRTIOFSD: u64 = 1 | (1 << 3) | (1 << 5) | (1 << 9) | (1 << 13) | (1 << 15);

enum Action {
    /// Ack (if asked for) with 0.
    Ok,
    /// Ack (if asked for) with this value; non-zero is a refusal.
    Ack(u64),
    /// A reply carrying this body.
    Reply(Vec<u8>),
    /// Ack, then hang up.
    AckThenClose,
}

type Log = Arc<Mutex<Vec<(u32, Vec<u8>)>>>;

struct Fake {
    log: Log,
    thread: Option<JoinHandle<()>>,
}

impl Fake {
    fn requests(&self) -> Vec<u32> {
        self.log.lock().unwrap().iter().map(|(r, _)| *r).collect()
    }
    fn body(&self, req: u32, nth: usize) -> Vec<u8> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|(r, _)| *r == req)
            .nth(nth)
            .map(|(_, b)| b.clone())
            .unwrap()
    }
    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn u64_body(v: u64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// A backend on `path` that answers with `f(request, body)`.
fn fake_backend<F>(path: &Path, mut f: F) -> Fake
where
    F: FnMut(u32, &[u8]) -> Action + Send + 'static,
{
    let listener = UnixListener::bind(path).unwrap();
    let log: Log = Arc::default();
    let log2 = log.clone();
    let thread = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        loop {
            let mut hdr = [0u8; 12];
            if s.read_exact(&mut hdr).is_err() {
                return;
            }
            let req = u32::from_le_bytes(hdr[0..4].try_into().unwrap());
            let flags = u32::from_le_bytes(hdr[4..8].try_into().unwrap());
            let size = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
            let mut body = vec![0u8; size];
            if s.read_exact(&mut body).is_err() {
                return;
            }
            log2.lock().unwrap().push((req, body.clone()));
            let need_reply = flags & 0x8 != 0;
            let (reply, close) = match f(req, &body) {
                Action::Ok => (need_reply.then(|| u64_body(0)), false),
                Action::Ack(v) => (need_reply.then(|| u64_body(v)), false),
                Action::Reply(b) => (Some(b), false),
                Action::AckThenClose => (need_reply.then(|| u64_body(0)), true),
            };
            if let Some(b) = reply {
                let mut out = Vec::with_capacity(12 + b.len());
                out.extend_from_slice(&req.to_le_bytes());
                out.extend_from_slice(&(0x1u32 | 0x4).to_le_bytes());
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(&b);
                if s.write_all(&out).is_err() {
                    return;
                }
            }
            if close {
                return;
            }
        }
    });
    Fake {
        log,
        thread: Some(thread),
    }
}

/// Answers like virtiofsd with the given features, protocol features and queue count.
fn virtiofsd_like(features: u64, proto: u64, queues: u64) -> impl FnMut(u32, &[u8]) -> Action {
    move |req, body| match req {
        GET_FEATURES => Action::Reply(u64_body(features)),
        GET_PROTOCOL_FEATURES => Action::Reply(u64_body(proto)),
        GET_QUEUE_NUM => Action::Reply(u64_body(queues)),
        GET_VRING_BASE => Action::Reply(body.to_vec()),
        _ => Action::Ok,
    }
}

const BACKEND_FEATURES: u64 = F_VERSION_1 | (1 << 28) | F_EVENT_IDX | F_PROTOCOL;

struct Rig {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    mem: GuestMemoryMmap,
    irq: Arc<Interrupt>,
    fs: Fs,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs.sock");
    let mem = create_guest_memory(8 << 20).unwrap().mem;
    let irq = test_interrupt();
    let mut fs = Fs::new("share0", &sock)
        .unwrap()
        .with_connect_timeout(Duration::from_millis(300));
    fs.set_queue_evts(vec![
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ]);
    Rig {
        _dir: dir,
        sock,
        mem,
        irq,
        fs,
    }
}

fn ctx(mem: &GuestMemoryMmap, irq: &Arc<Interrupt>, acked: u64) -> ActivateContext {
    let hi = GuestQueue::new(mem, 16, 0x1_0000);
    let rq = GuestQueue::new(mem, 16, 0x2_0000);
    activate_ctx(mem, vec![hi.queue(), rq.queue()], irq, acked)
}

fn activate_err(fs: &mut Fs, c: ActivateContext) -> String {
    match fs.activate(c) {
        Err(VirtioError::Activate(msg)) => msg,
        other => panic!("expected an activation error, got {other:?}"),
    }
}

#[test]
fn config_space_and_identity() {
    let fs = Fs::new("share0", Path::new("/nonexistent/fs.sock")).unwrap();
    assert_eq!(fs.device_type(), 26);
    assert_eq!(fs.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_ne!(fs.avail_features() & F_VERSION_1, 0);
    assert!(fs.has_external_backend());
    let mut cfg = [0xffu8; CONFIG_SPACE_SIZE];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], b"share0");
    assert!(cfg[6..TAG_LEN].iter().all(|b| *b == 0));
    assert_eq!(&cfg[TAG_LEN..], &1u32.to_le_bytes());
    // Narrow and out-of-range reads: no panic, zeros past the end.
    let mut b = [0xffu8; 4];
    fs.read_config(TAG_LEN as u64, &mut b);
    assert_eq!(b, [1, 0, 0, 0]);
    fs.read_config(38, &mut b);
    assert_eq!(b, [0; 4]);
    fs.read_config(u64::MAX, &mut b);
    assert_eq!(b, [0; 4]);
    // A full-length tag fills the field without a NUL.
    let full = "t".repeat(TAG_LEN);
    let fs2 = Fs::new(&full, Path::new("/x")).unwrap();
    let mut t = [0u8; TAG_LEN];
    fs2.read_config(0, &mut t);
    assert_eq!(&t[..], full.as_bytes());

    let mut fs = fs;
    assert!(matches!(
        fs.write_config(0, b"evil"),
        Err(VirtioError::ReadOnlyConfig { .. })
    ));
    assert!(fs.process_queue(1).is_ok());
    assert!(matches!(
        Fs::new("", Path::new("/x")),
        Err(FsError::TagLength { got: 0, .. })
    ));
    assert!(matches!(
        Fs::new(&"t".repeat(37), Path::new("/x")),
        Err(FsError::TagLength { got: 37, .. })
    ));
    assert!(matches!(
        Fs::new("a\0b", Path::new("/x")),
        Err(FsError::TagNul(_))
    ));
}

#[test]
fn bad_queues_are_refused_before_the_backend_is_contacted() {
    // No backend listens: any attempt to connect would fail with a Connect
    // error after the timeout. Queue errors come first and at once.
    let mut r = rig();
    let good = ctx(&r.mem, &r.irq, F_VERSION_1);
    type Breaker = Box<dyn Fn(&mut ActivateContext)>;
    let cases: Vec<(&str, Breaker)> = vec![
        (
            "descriptor table",
            Box::new(|c| c.queues[1].set_desc_table_address(Some(0xffff_f000), Some(0xffff))),
        ),
        (
            "used ring",
            Box::new(|c| c.queues[0].set_used_ring_address(Some(0xffff_fff8), Some(u32::MAX))),
        ),
        (
            "available ring",
            // The last bytes of RAM: the ring would run past the end.
            Box::new(|c| {
                let end = 8u64 << 20;
                c.queues[1].set_avail_ring_address(Some((end - 8) as u32), Some(0))
            }),
        ),
        ("not ready", Box::new(|c| c.queues[0].set_ready(false))),
        (
            "missing queue",
            Box::new(|c| {
                c.queues.pop();
            }),
        ),
    ];
    for (what, break_it) in cases {
        let mut c = ctx(&r.mem, &r.irq, F_VERSION_1);
        break_it(&mut c);
        let t = Instant::now();
        let msg = activate_err(&mut r.fs, c);
        assert!(t.elapsed() < Duration::from_millis(200), "{what}: {msg}");
        assert!(msg.starts_with("Queue "), "{what}: {msg}");
        assert!(!r.fs.is_activated());
    }
    drop(good);
    assert!(!r.sock.exists());
    assert_eq!(
        r.fs.metrics
            .activation_failures
            .load(std::sync::atomic::Ordering::Relaxed),
        5
    );
}

#[test]
fn anonymous_guest_memory_is_refused() {
    let mut r = rig();
    let anon = guest_memory();
    let msg = activate_err(&mut r.fs, ctx(&anon, &r.irq, F_VERSION_1));
    assert!(msg.contains("not a shared file mapping"), "{msg}");
}

#[test]
fn missing_socket_is_an_error_naming_it_within_the_timeout() {
    let mut r = rig();
    let t = Instant::now();
    let msg = activate_err(&mut r.fs, ctx(&r.mem, &r.irq, F_VERSION_1));
    let took = t.elapsed();
    assert!(msg.contains(&r.sock.display().to_string()), "{msg}");
    assert!(msg.contains("Failed to connect to virtiofsd"), "{msg}");
    assert!(
        took >= Duration::from_millis(200) && took < Duration::from_secs(2),
        "{took:?}"
    );
    // A stale socket file nobody listens on (virtiofsd killed): refused,
    // retried, then the same bounded error.
    drop(UnixListener::bind(&r.sock).unwrap());
    let t = Instant::now();
    let msg = activate_err(&mut r.fs, ctx(&r.mem, &r.irq, F_VERSION_1));
    assert!(t.elapsed() < Duration::from_secs(2), "{msg}");
    assert!(msg.contains("Connection refused"), "{msg}");
}

#[test]
fn full_sequence_reset_and_reactivation() {
    let mut r = rig();
    let mut fake = fake_backend(
        &r.sock,
        virtiofsd_like(BACKEND_FEATURES, PROTO_VIRTIOFSD, 2),
    );
    let acked = F_VERSION_1 | F_EVENT_IDX;
    let c = ctx(&r.mem, &r.irq, acked);
    let desc1 = c.queues[1].desc_table();
    r.fs.activate(c).unwrap();
    assert!(r.fs.is_activated() && r.fs.is_connected());
    // The driver sees VRING on every interrupt virtiofsd raises.
    assert_eq!(r.irq.status() & INT_VRING, INT_VRING);

    let per_ring = [
        SET_VRING_NUM,
        SET_VRING_ADDR,
        SET_VRING_BASE,
        SET_VRING_CALL,
        SET_VRING_KICK,
    ];
    let mut expected = vec![
        GET_FEATURES,
        GET_PROTOCOL_FEATURES,
        SET_PROTOCOL_FEATURES,
        GET_QUEUE_NUM,
        SET_OWNER,
        SET_FEATURES,
        SET_MEM_TABLE,
    ];
    expected.extend(per_ring);
    expected.extend(per_ring);
    expected.extend([SET_VRING_ENABLE, SET_VRING_ENABLE]);
    assert_eq!(fake.requests(), expected);

    // Protocol features: ours ∩ virtiofsd's = MQ | REPLY_ACK | RESET_DEVICE.
    let proto = u64::from_le_bytes(fake.body(SET_PROTOCOL_FEATURES, 0).try_into().unwrap());
    assert_eq!(proto, 1 | (1 << 3) | (1 << 13));
    let feat = u64::from_le_bytes(fake.body(SET_FEATURES, 0).try_into().unwrap());
    assert_eq!(feat, acked | F_PROTOCOL);
    // SET_MEM_TABLE: one region (8 MiB at 0), with the VMM's mapping address.
    let mt = fake.body(SET_MEM_TABLE, 0);
    assert_eq!(u32::from_le_bytes(mt[0..4].try_into().unwrap()), 1);
    let region = &mt[8..40];
    let gpa = u64::from_le_bytes(region[0..8].try_into().unwrap());
    let size = u64::from_le_bytes(region[8..16].try_into().unwrap());
    let uaddr = u64::from_le_bytes(region[16..24].try_into().unwrap());
    assert_eq!((gpa, size), (0, 8 << 20));
    let host0 = r.mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    assert_eq!(uaddr, host0);
    // SET_VRING_ADDR of queue 1: index, flags, desc/used/avail/log as VMM addresses.
    let va = fake.body(SET_VRING_ADDR, 1);
    assert_eq!(u32::from_le_bytes(va[0..4].try_into().unwrap()), 1);
    let desc_hva = u64::from_le_bytes(va[8..16].try_into().unwrap());
    assert_eq!(desc_hva, host0 + desc1);

    // Reset: vrings stopped, device state reset, the connection stays.
    r.fs.reset();
    assert!(!r.fs.is_activated() && r.fs.is_connected());
    let n = expected.len();
    assert_eq!(
        fake.requests()[n..],
        [
            SET_VRING_ENABLE,
            GET_VRING_BASE,
            SET_VRING_ENABLE,
            GET_VRING_BASE,
            RESET_DEVICE
        ]
    );
    // Reactivation reuses the session: no second SET_OWNER.
    r.fs.activate(ctx(&r.mem, &r.irq, acked)).unwrap();
    let all = fake.requests();
    assert_eq!(all[n + 5], SET_FEATURES);
    assert_eq!(all.iter().filter(|r| **r == SET_OWNER).count(), 1);
    drop(r.fs);
    fake.join();
}

fn refused(backend: impl FnMut(u32, &[u8]) -> Action + Send + 'static, acked: u64) -> String {
    let mut r = rig();
    let mut fake = fake_backend(&r.sock, backend);
    let msg = activate_err(&mut r.fs, ctx(&r.mem, &r.irq, acked));
    assert!(!r.fs.is_activated());
    assert!(!r.fs.is_connected(), "a refused session is dropped: {msg}");
    assert_eq!(r.irq.status(), 0);
    assert!(msg.contains(&r.sock.display().to_string()), "{msg}");
    fake.join();
    msg
}

#[test]
fn backend_without_version_1_is_refused() {
    let msg = refused(virtiofsd_like(F_PROTOCOL, PROTO_VIRTIOFSD, 2), F_VERSION_1);
    assert!(msg.contains("does not offer VIRTIO_F_VERSION_1"), "{msg}");
}

#[test]
fn driver_features_the_backend_lacks_are_refused() {
    let msg = refused(
        virtiofsd_like(F_VERSION_1 | F_PROTOCOL, PROTO_VIRTIOFSD, 2),
        F_VERSION_1 | F_EVENT_IDX,
    );
    assert!(msg.contains("does not offer"), "{msg}");
}

#[test]
fn backend_nack_of_set_features_is_an_error() {
    let mut inner = virtiofsd_like(BACKEND_FEATURES, PROTO_VIRTIOFSD, 2);
    let msg = refused(
        move |req, body| {
            if req == SET_FEATURES {
                Action::Ack(1)
            } else {
                inner(req, body)
            }
        },
        F_VERSION_1,
    );
    assert!(msg.contains("SET_FEATURES"), "{msg}");
}

#[test]
fn too_few_backend_queues_are_refused() {
    let msg = refused(
        virtiofsd_like(BACKEND_FEATURES, PROTO_VIRTIOFSD, 1),
        F_VERSION_1,
    );
    assert!(msg.contains("serves 1 queues"), "{msg}");
}

/// A virtiofsd that answers like the real one and "dies" (closes) right
/// after the last setup message, queue 1 enabled.
fn dies_after_setup() -> impl FnMut(u32, &[u8]) -> Action + Send + 'static {
    let mut inner = virtiofsd_like(BACKEND_FEATURES, PROTO_VIRTIOFSD, 2);
    move |req, body| {
        if req == SET_VRING_ENABLE && body.first() == Some(&1) {
            Action::AckThenClose
        } else {
            inner(req, body)
        }
    }
}

/// Runs the event loop's part until the device has seen the hang-up.
fn wait_for_hang_up(r: &mut Rig) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !r.irq.needs_reset() {
        assert!(Instant::now() < deadline, "hang-up not noticed");
        r.fs.process_backend();
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn backend_hang_up_marks_the_device_for_reset() {
    let mut r = rig();
    let mut fake = fake_backend(&r.sock, dies_after_setup());
    r.fs.activate(ctx(&r.mem, &r.irq, F_VERSION_1)).unwrap();
    fake.join();
    wait_for_hang_up(&mut r);
    assert!(!r.fs.is_activated() && !r.fs.is_connected());
    assert_eq!(
        r.fs.metrics
            .backend_lost
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The driver's reset and a new activation fail cleanly: nobody listens.
    r.fs.reset();
    let msg = activate_err(&mut r.fs, ctx(&r.mem, &r.irq, F_VERSION_1));
    assert!(msg.contains("Failed to connect"), "{msg}");
}

/// The jailed VMM's way: connected and owner before the guest runs
/// (`connect_now`, before the jail), activation then uses that session; once
/// virtiofsd is gone, a new activation fails saying the share is lost
/// instead of connecting (which the jail's seccomp would kill).
#[test]
fn connected_before_the_jail_it_never_connects_again() {
    let mut r = rig();
    let mut fake = fake_backend(&r.sock, dies_after_setup());
    r.fs.connect_now().unwrap();
    assert!(r.fs.is_connected() && !r.fs.is_activated());
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fake.requests().contains(&SET_OWNER) {
        assert!(Instant::now() < deadline, "no handshake before activation");
        std::thread::sleep(Duration::from_millis(10));
    }
    r.fs.activate(ctx(&r.mem, &r.irq, F_VERSION_1)).unwrap();
    assert_eq!(
        fake.requests().iter().filter(|r| **r == SET_OWNER).count(),
        1,
        "activation used the session made before"
    );
    fake.join();
    wait_for_hang_up(&mut r);
    r.fs.reset();
    // A listener is there again: still no new connection.
    let _ = std::fs::remove_file(&r.sock);
    let listener = std::os::unix::net::UnixListener::bind(&r.sock).unwrap();
    listener.set_nonblocking(true).unwrap();
    let msg = activate_err(&mut r.fs, ctx(&r.mem, &r.irq, F_VERSION_1));
    assert!(msg.contains("was lost and is not made again"), "{msg}");
    assert!(listener.accept().is_err(), "the device connected again");
}

#[test]
fn idle_backend_fd_is_quiet() {
    let mut r = rig();
    let mut fake = fake_backend(
        &r.sock,
        virtiofsd_like(BACKEND_FEATURES, PROTO_VIRTIOFSD, 2),
    );
    r.fs.activate(ctx(&r.mem, &r.irq, F_VERSION_1)).unwrap();
    // Nothing to report while virtiofsd is alive.
    r.fs.process_backend();
    assert!(r.fs.is_activated() && !r.irq.needs_reset());
    drop(r.fs);
    fake.join();
}

/// virtiofsd that has read `base` requests from queue 1 (GET_VRING_BASE).
fn virtiofsd_at(base: u32) -> impl FnMut(u32, &[u8]) -> Action {
    let mut like = virtiofsd_like(BACKEND_FEATURES, PROTO_VIRTIOFSD, 2);
    move |req, body| match req {
        GET_VRING_BASE => {
            let index = u32::from_le_bytes(body[0..4].try_into().unwrap());
            let num = if index == 1 { base } else { 0 };
            Action::Reply([index.to_le_bytes(), num.to_le_bytes()].concat())
        }
        _ => like(req, body),
    }
}

/// The `num` of the `nth` SET_VRING_BASE for queue `index`.
fn vring_base_set(fake: &Fake, index: u32, nth: usize) -> u32 {
    let bodies: Vec<Vec<u8>> = (0..)
        .map_while(|i| {
            fake.log
                .lock()
                .unwrap()
                .iter()
                .filter(|(r, _)| *r == SET_VRING_BASE)
                .nth(i)
                .map(|(_, b)| b.clone())
        })
        .filter(|b| u32::from_le_bytes(b[0..4].try_into().unwrap()) == index)
        .collect();
    u32::from_le_bytes(bodies[nth][4..8].try_into().unwrap())
}

#[test]
fn a_snapshot_saves_where_virtiofsd_stopped_and_a_restore_starts_there() {
    use vm_memory::Bytes;
    let mut r = rig();
    let mut fake = fake_backend(&r.sock, virtiofsd_at(3));
    let acked = F_VERSION_1 | F_EVENT_IDX;
    let c = ctx(&r.mem, &r.irq, acked);
    let used1 = GuestAddress(c.queues[1].used_ring() + 2);
    r.fs.activate(c).unwrap();
    let started = fake.requests().len();

    // virtiofsd took three requests from queue 1 and answered them all.
    r.mem.write_obj(3u16.to_le(), used1).unwrap();
    let snap = r.fs.save_state().unwrap();
    assert!(snap.activated);
    assert_eq!(
        (snap.queues[1].next_avail, snap.queues[1].next_used),
        (3, 3)
    );
    assert_eq!(
        (snap.queues[0].next_avail, snap.queues[0].next_used),
        (0, 0)
    );
    // Stopped without a device reset, and started again from there.
    let after = fake.requests()[started..].to_vec();
    assert_eq!(
        after[..4],
        [
            SET_VRING_ENABLE,
            GET_VRING_BASE,
            SET_VRING_ENABLE,
            GET_VRING_BASE
        ]
    );
    assert!(!after.contains(&RESET_DEVICE), "{after:?}");
    assert_eq!(after[4], SET_FEATURES);
    assert_eq!(vring_base_set(&fake, 1, 1), 3, "restarted where it stopped");
    assert!(r.fs.is_activated());

    // Only two answered: one request is in flight, which cannot be saved.
    r.mem.write_obj(2u16.to_le(), used1).unwrap();
    let err = r.fs.save_state().unwrap_err().to_string();
    assert!(
        err.contains(
            "virtio-fs share0: queue 1 has requests in flight (virtiofsd took up to 3, \
             answered up to 2); retry when the share is idle"
        ),
        "{err}"
    );
    assert!(r.fs.is_activated(), "still running after the refusal");

    // A device restored from the snapshot, on its own virtiofsd.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fs2.sock");
    let mut fake2 = fake_backend(&sock, virtiofsd_at(3));
    let mut b = Fs::new("share0", &sock)
        .unwrap()
        .with_connect_timeout(Duration::from_millis(300));
    b.set_queue_evts(vec![
        EventFd::new(EFD_NONBLOCK).unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
    ]);
    let irq = test_interrupt();
    b.restore_state(&snap, Some(ctx(&r.mem, &irq, acked)))
        .unwrap();
    assert!(!b.is_activated(), "not before the guest runs");
    assert!(fake2.requests().is_empty(), "virtiofsd not contacted yet");
    b.wake_after_restore().unwrap();
    assert!(b.is_activated() && b.is_connected());
    assert!(fake2.requests().contains(&SET_VRING_ENABLE));
    assert_eq!(
        vring_base_set(&fake2, 1, 0),
        3,
        "started where it was saved"
    );
    assert_eq!(irq.status() & INT_VRING, INT_VRING);
    drop(b);
    fake2.join();
    drop(r.fs);
    fake.join();
}
