//! virtio-net against a real tap (root): the test plays the guest driver
//! over real guest memory and split queues, and the host side is an
//! AF_PACKET socket on the tap inside a network namespace the test creates
//! (and removes on drop). Config validation of `net` entries runs without
//! root. Non-root device tests: `src/devices/virtio/net/tests.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boxlite_vmm::config::{
    ConfigError, DeviceConfig, NetConfig, NetConfigError, Validate, VmConfig,
};
use boxlite_vmm::devices::virtio::net::{
    features, tun_flags, Net, NetError, NetMetrics, Tap, RXQ, TXQ,
};
use boxlite_vmm::devices::virtio::{ActivateContext, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const GUEST_MAC: [u8; 6] = [0x02, 0xb0, 0x0c, 0x5e, 0x00, 0x01];
const ETHERTYPE: [u8; 2] = [0x88, 0xb5]; // IEEE 802 local experimental
const QSIZE: u16 = 64;

#[test]
fn net_config_entries_validate() {
    let cfg = VmConfig {
        devices: vec![DeviceConfig::Net(NetConfig::with_tap_name(
            "tap0",
            Some("02:00:00:00:00:01".into()),
        ))],
        ..VmConfig::default()
    };
    cfg.devices.iter().for_each(|d| match d {
        DeviceConfig::Net(n) => n.validate().expect("valid"),
        other => panic!("{other:?}"),
    });
    let both = NetConfig {
        tap_fd: Some(7),
        tap_name: Some("t".into()),
        mac: None,
    };
    let e = ConfigError::from(both.validate().expect_err("both"));
    assert!(matches!(
        e,
        ConfigError::Net(NetConfigError::TapSource { .. })
    ));
}

/// A network namespace for one test, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "boxlite-nt-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name]);
        Netns(name)
    }

    fn ip(&self, args: &[&str]) {
        let mut a = vec!["-n", &self.0];
        a.extend_from_slice(args);
        run("ip", &a);
    }

    /// Runs `f` on a thread that entered the namespace (sockets and taps
    /// it creates live there).
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.0);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("open netns");
            nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().expect("spawn");
    assert!(st.success(), "{cmd} {args:?} failed: {st}");
}

/// An AF_PACKET socket bound to interface `ifname` (all protocols).
fn packet_socket(ifname: &str) -> (OwnedFd, i32) {
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(
        fd >= 0,
        "AF_PACKET socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: fd was just created and is owned here.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(ifname).unwrap();
    // SAFETY: valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) } as i32;
    assert!(ifindex > 0, "no interface {ifname}");
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto;
    sll.sll_ifindex = ifindex;
    // SAFETY: binding with a correctly sized sockaddr_ll.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: SO_RCVTIMEO with a timeval.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    (fd, ifindex)
}

fn ether_frame(dst: [u8; 6], src: [u8; 6], tag: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ETHERTYPE);
    f.extend_from_slice(tag);
    f.resize(60, 0);
    f
}

/// The guest driver side: memory, two split queues, RX buffers.
struct Guest {
    mem: GuestMemoryMmap,
    rx_avail: u16,
    tx_avail: u16,
    rx_seen: u16,
}

const RXQ_BASE: u64 = 0x1000;
const TXQ_BASE: u64 = 0x4000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x20_0000;
const BUF: u64 = 0x1_0000;

fn rings(base: u64) -> (u64, u64, u64) {
    let avail = base + 16 * u64::from(QSIZE);
    let used = (avail + 6 + 2 * u64::from(QSIZE) + 3) & !3;
    (base, avail, used)
}

impl Guest {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        Guest {
            mem,
            rx_avail: 0,
            tx_avail: 0,
            rx_seen: 0,
        }
    }

    fn queue(&self, base: u64) -> Queue {
        let (d, a, u) = rings(base);
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(d as u32), Some(0));
        q.set_avail_ring_address(Some(a as u32), Some(0));
        q.set_used_ring_address(Some(u as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn push(&mut self, base: u64, idx: u16, addr: u64, len: u32, flags: u16) {
        let (d, a, _) = rings(base);
        let da = GuestAddress(d + 16 * u64::from(idx));
        self.mem.write_obj(addr, da).unwrap();
        self.mem.write_obj(len, GuestAddress(da.0 + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(da.0 + 12)).unwrap();
        self.mem.write_obj(0u16, GuestAddress(da.0 + 14)).unwrap();
        let avail = if base == RXQ_BASE {
            &mut self.rx_avail
        } else {
            &mut self.tx_avail
        };
        let slot = u64::from(*avail % QSIZE);
        self.mem
            .write_obj(idx, GuestAddress(a + 4 + 2 * slot))
            .unwrap();
        *avail = avail.wrapping_add(1);
        self.mem.write_obj(*avail, GuestAddress(a + 2)).unwrap();
    }

    fn post_rx(&mut self, idx: u16) {
        self.push(RXQ_BASE, idx, RX_BUFS + u64::from(idx) * BUF, BUF as u32, 2);
    }

    fn send(&mut self, idx: u16, data: &[u8]) {
        let at = TX_BUFS + u64::from(idx) * BUF;
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
        self.push(TXQ_BASE, idx, at, data.len() as u32, 0);
    }

    /// Frames the device put in RX buffers since last time (header stripped).
    fn received(&mut self) -> Vec<Vec<u8>> {
        let (_, _, u) = rings(RXQ_BASE);
        let used: u16 = self.mem.read_obj(GuestAddress(u + 2)).unwrap();
        let mut out = Vec::new();
        while self.rx_seen != used {
            let e = u + 4 + 8 * u64::from(self.rx_seen % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(RX_BUFS + u64::from(id) * BUF))
                .unwrap();
            out.push(b.split_off(12.min(b.len())));
            self.rx_seen = self.rx_seen.wrapping_add(1);
            self.post_rx(id as u16);
        }
        out
    }
}

fn activate(net: &mut Net, g: &Guest, acked: u64) -> Arc<Interrupt> {
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    net.activate(ActivateContext {
        mem: g.mem.clone(),
        queues: vec![g.queue(RXQ_BASE), g.queue(TXQ_BASE)],
        interrupt: irq.clone(),
        acked_features: acked,
    })
    .unwrap();
    irq
}

/// Opens /dev/net/tun as `name` with `flags` and returns the raw fd
/// (the way the shim would hand one to the VMM).
fn raw_tap_fd(name: &str, flags: i32) -> RawFd {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    #[repr(C)]
    struct Req {
        name: [u8; 16],
        flags: libc::c_short,
        pad: [u8; 22],
    }
    let mut r = Req {
        name: [0; 16],
        flags: flags as libc::c_short,
        pad: [0; 22],
    };
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF with a correctly sized ifreq.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), libc::TUNSETIFF, &mut r) };
    assert_eq!(rc, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
    f.into_raw_fd()
}

#[test]
#[ignore = "needs root (tap device)"]
fn frames_both_ways_through_a_real_tap() {
    let ns = Netns::new();
    // Tap + packet socket inside the namespace; the tap is handed over as
    // an inherited fd (the shim's path).
    let (fd, flags_refused) = ns.enter(|| {
        let plain = raw_tap_fd("bxplain0", libc::IFF_TAP | libc::IFF_NO_PI);
        let refused = matches!(Tap::from_fd(plain), Err(NetError::TapFlags { .. }));
        // SAFETY: closing the fd we opened and Tap::from_fd refused.
        unsafe { libc::close(plain) };
        (
            raw_tap_fd(
                "bxtap0",
                libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
            ),
            refused,
        )
    });
    assert!(flags_refused, "a tap without IFF_VNET_HDR is refused");
    let tap = Tap::from_fd(fd).expect("inherited tap");
    assert_eq!(tap.name(), "bxtap0");
    ns.ip(&["link", "set", "bxtap0", "up"]);
    let (pkt, ifindex) = ns.enter(|| packet_socket("bxtap0"));

    let mut net = Net::new(Box::new(tap), Some(GUEST_MAC)).unwrap();
    let mut g = Guest::new();
    // Everything we offer acked, like Linux does: offloads on the tap.
    let acked = net.avail_features();
    activate(&mut net, &g, acked);
    assert_eq!(
        net.offload(),
        tun_flags::CSUM | tun_flags::TSO4 | tun_flags::TSO6 | tun_flags::TSO_ECN
    );
    assert_eq!(acked & VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1);
    assert_ne!(acked & features::HOST_TSO4, 0);

    // Guest → host.
    let out = ether_frame([0xff; 6], GUEST_MAC, b"boxlite guest->host");
    let mut with_hdr = vec![0u8; 12];
    with_hdr.extend_from_slice(&out);
    g.send(0, &with_hdr);
    net.process_queue(TXQ).unwrap();
    assert_eq!(NetMetrics::get(&net.metrics.tx_frames), 1);
    let end = Instant::now() + Duration::from_secs(3);
    let mut buf = vec![0u8; 2048];
    loop {
        assert!(
            Instant::now() < end,
            "frame never reached the tap's host side"
        );
        // SAFETY: recv into a live buffer of the given length.
        let n = unsafe { libc::recv(pkt.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n > 0 && buf[..n as usize] == out[..] {
            break;
        }
    }

    // Host → guest.
    for i in 0..8 {
        g.post_rx(i);
    }
    net.process_queue(RXQ).unwrap();
    let inbound = ether_frame(GUEST_MAC, [0x02, 0, 0, 0, 0, 0x99], b"boxlite host->guest");
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&GUEST_MAC);
    // SAFETY: sendto with a live buffer and a correctly sized sockaddr_ll.
    let n = unsafe {
        libc::sendto(
            pkt.as_raw_fd(),
            inbound.as_ptr().cast(),
            inbound.len(),
            0,
            std::ptr::addr_of!(sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(
        n as usize,
        inbound.len(),
        "{}",
        std::io::Error::last_os_error()
    );
    let end = Instant::now() + Duration::from_secs(3);
    'wait: loop {
        assert!(Instant::now() < end, "frame never reached the guest");
        net.process_backend_rx();
        for f in g.received() {
            if f == inbound {
                break 'wait;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    drop(net);
    drop(pkt);
}

#[test]
#[ignore = "needs root (tap device)"]
fn tap_opened_by_name_in_a_netns() {
    let ns = Netns::new();
    let tap = ns.enter(|| Tap::open("bxname0").expect("open tap by name"));
    assert_eq!(tap.name(), "bxname0");
    let mut net = Net::new(Box::new(tap), None).unwrap();
    let g = Guest::new();
    // Only checksum offload acked: TSO stays off on the tap.
    activate(
        &mut net,
        &g,
        VIRTIO_F_VERSION_1 | features::CSUM | features::GUEST_CSUM,
    );
    assert_eq!(net.offload(), tun_flags::CSUM);
    net.reset();
    assert_eq!(net.offload(), 0);
    // The interface exists in the namespace while the tap is open.
    ns.ip(&["link", "show", "bxname0"]);
}
