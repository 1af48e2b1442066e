//! `boxlite_runtime::network` against real network namespaces: a CNI-like
//! veth `eth0` in a "pod" netns, its peer in a second netns standing in for
//! the bridge side, then wire, frames both ways through the tap, teardown.
//!
//! Needs root (netns, veth, tap, tc): every test is `#[ignore = "needs
//! root …"]`, run as root with `--ignored --test-threads=1` (the second
//! phase of scripts/test.sh). The namespaces are made with `ip` (fine in
//! tests; the library itself uses netlink only) and deleted by a guard even
//! when a test panics.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::ops::Deref;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use boxlite_protocol::error_chain::chain;
use boxlite_runtime::network::{
    teardown, IpFamily, IpNet, PodNetwork, PodRoute, RouteScope, WiredInterface,
};
use boxlite_runtime::network::{MacAddr, TapDevice};
use boxlite_test_support::netns::{self as support, run};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, CloneFlags};
use serde_json::Value;

const POD_MAC: [u8; 6] = [0x02, 0x42, 0x0a, 0x4d, 0x00, 0x02];
const POD_IP: [u8; 4] = [10, 77, 0, 2];
const PEER_IP: [u8; 4] = [10, 77, 0, 1];
/// The virtio-net header in front of every frame on a tap opened with
/// IFF_VNET_HDR, at its default size (nothing here sets TUNSETVNETHDRSZ).
const VNET_HDR_LEN: usize = 10;
const ETH_P_ARP: u16 = 0x0806;

/// The JSON output of `args`; no output at all (tc with nothing to show)
/// is an empty list.
fn json(args: &[&str]) -> Value {
    let out = run(args);
    if out.trim().is_empty() {
        return Value::Array(vec![]);
    }
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: bad JSON {out:?}: {e}"))
}

/// A named netns (boxlite-test-support's, deleted on drop even if the test
/// panics) and what these tests read from it.
struct Netns(support::Netns);

impl Deref for Netns {
    type Target = support::Netns;

    fn deref(&self) -> &support::Netns {
        &self.0
    }
}

impl Netns {
    fn new(role: &str) -> Self {
        Netns(support::Netns::add(role))
    }

    fn tc_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["tc", "-j", "-n", &self.name];
        all.extend_from_slice(args);
        json(&all)
    }

    fn links(&self) -> Vec<Value> {
        let v = json(&["ip", "-j", "-n", &self.name, "link", "show"]);
        v.as_array().unwrap().clone()
    }

    fn link(&self, name: &str) -> Option<Value> {
        self.links().into_iter().find(|l| l["ifname"] == name)
    }

    /// The kinds of the qdiscs of `dev`.
    fn qdisc_kinds(&self, dev: &str) -> Vec<String> {
        let v = self.tc_json(&["qdisc", "show", "dev", dev]);
        kinds(&v)
    }

    /// The ingress filters of `dev` that have actions.
    fn ingress_filters(&self, dev: &str) -> Vec<Value> {
        let v = self.tc_json(&["filter", "show", "dev", dev, "ingress"]);
        let all = v.as_array().cloned().unwrap_or_default();
        all.into_iter()
            .filter(|f| f["options"]["actions"].is_array())
            .collect()
    }

    /// Runs `f` on a thread inside this netns.
    fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let ns = File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

fn kinds(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|q| q["kind"].as_str().unwrap().to_string())
        .collect()
}

/// A pod netns with a CNI-like `eth0` (a veth with a known MAC, 10.77.0.2/24,
/// MTU 1450, default route via 10.77.0.1, plus fd77::2/64 and a default
/// route via fd77::1) whose peer `br0` (10.77.0.1/24) is in the peer netns.
struct Rig {
    // Field order: the pod netns goes first, taking the veth with it.
    pod: Netns,
    peer: Netns,
}

impl Rig {
    /// A second pod interface: `eth1` (10.78.0.2/24), up, its veth peer
    /// `br1` in the peer netns.
    fn add_second_interface(&self) {
        self.pod.ip(&[
            "link",
            "add",
            "eth1",
            "type",
            "veth",
            "peer",
            "name",
            "br1",
            "netns",
            &self.peer.name,
        ]);
        self.pod.ip(&["link", "set", "eth1", "up"]);
        self.pod.ip(&["addr", "add", "10.78.0.2/24", "dev", "eth1"]);
    }

    fn new() -> Self {
        let pod = Netns::new("pod");
        let peer = Netns::new("peer");
        pod.ip(&[
            "link", "add", "eth0", "type", "veth", "peer", "name", "br0", "netns", &peer.name,
        ]);
        pod.ip(&[
            "link",
            "set",
            "eth0",
            "address",
            &MacAddr(POD_MAC).to_string(),
            "mtu",
            "1450",
            "up",
        ]);
        pod.ip(&["addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        pod.ip(&["-6", "addr", "add", "fd77::2/64", "dev", "eth0", "nodad"]);
        pod.ip(&["route", "add", "default", "via", "10.77.0.1"]);
        pod.ip(&[
            "-6", "route", "add", "default", "via", "fd77::1", "dev", "eth0",
        ]);
        peer.ip(&["link", "set", "br0", "mtu", "1450", "up"]);
        peer.ip(&["addr", "add", "10.77.0.1/24", "dev", "br0"]);
        Rig { pod, peer }
    }

    /// The MAC of the bridge side.
    fn peer_mac(&self) -> [u8; 6] {
        let link = self.peer.link("br0").unwrap();
        let mac: MacAddr = link["address"].as_str().unwrap().parse().unwrap();
        mac.0
    }

    /// What a TCP connect from the peer to the pod's port 9 (where nothing
    /// listens) gets: "refused" while the pod netns's own stack answers,
    /// "timeout" when its frames are redirected elsewhere.
    fn connect_from_peer(&self) -> &'static str {
        self.peer.enter(|| {
            let addr = SocketAddr::new(IpAddr::from(POD_IP), 9);
            match TcpStream::connect_timeout(&addr, Duration::from_millis(1500)) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => "refused",
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => "timeout",
                other => panic!("unexpected connect result {other:?}"),
            }
        })
    }

    /// Makes the peer's kernel send an ARP request for the pod's IP (a UDP
    /// datagram to an address it has no neighbour entry for).
    fn peer_arps_for_pod(&self) {
        self.peer.ip(&["neigh", "flush", "dev", "br0"]);
        self.peer.enter(|| {
            let sock = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
            sock.send_to(b"boxlite", SocketAddr::new(IpAddr::from(POD_IP), 9))
                .unwrap();
        });
    }

    /// The peer's neighbour entry for the pod's IP, if any.
    fn peer_neighbour_mac(&self) -> Option<String> {
        let v = json(&[
            "ip",
            "-j",
            "-n",
            &self.peer.name,
            "neigh",
            "show",
            "10.77.0.2",
            "dev",
            "br0",
        ]);
        v.as_array()?
            .iter()
            .find_map(|n| n["lladdr"].as_str().map(str::to_string))
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// An ARP packet (Ethernet frame without the vnet header).
fn arp(op: u16, dst: [u8; 6], sha: [u8; 6], spa: [u8; 4], tha: [u8; 6], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sha);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4]); // Ethernet, IPv4, sizes
    f.extend_from_slice(&op.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&tha);
    f.extend_from_slice(&tpa);
    f.resize(60, 0); // minimum Ethernet frame
    f
}

/// The fields of an ARP packet the tests look at.
#[derive(Debug, PartialEq, Eq)]
struct Arp {
    op: u16,
    sender_mac: [u8; 6],
    sender_ip: [u8; 4],
    target_ip: [u8; 4],
}

fn parse_arp(frame: &[u8]) -> Option<Arp> {
    if frame.len() < 42 || frame[12..14] != ETH_P_ARP.to_be_bytes() {
        return None;
    }
    let a = &frame[14..];
    Some(Arp {
        op: u16::from_be_bytes([a[6], a[7]]),
        sender_mac: a[8..14].try_into().unwrap(),
        sender_ip: a[14..18].try_into().unwrap(),
        target_ip: a[24..28].try_into().unwrap(),
    })
}

/// Writes one frame into the tap, as the VMM would.
fn send_to_tap(tap: &mut File, frame: &[u8]) {
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend_from_slice(frame);
    let n = tap.write(&buf).unwrap();
    assert_eq!(n, buf.len());
}

/// Reads frames from the tap (as the VMM would) until `want` accepts one or
/// `timeout` passes; other frames (IPv6 neighbour discovery, ...) are
/// skipped.
/// The first ARP packet `keep` accepts that arrives on the tap within 3 s.
fn recv_arp(tap: &mut File, keep: impl Fn(&Arp) -> bool) -> Option<Arp> {
    recv_from_tap(tap, Duration::from_secs(3), |f| parse_arp(f).filter(&keep))
}

/// An ARP packet (`op` 1 request, 2 reply) from the peer about the pod's IP.
fn peer_to_pod(op: u16, peer_mac: [u8; 6]) -> Arp {
    Arp {
        op,
        sender_mac: peer_mac,
        sender_ip: PEER_IP,
        target_ip: POD_IP,
    }
}

fn recv_from_tap<T>(
    tap: &mut File,
    timeout: Duration,
    want: impl Fn(&[u8]) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(tap.as_fd(), PollFlags::POLLIN)];
        if poll(&mut fds, PollTimeout::from(ms)).unwrap() == 0 {
            continue;
        }
        let n = tap.read(&mut buf).unwrap();
        assert!(n >= VNET_HDR_LEN, "short read {n}");
        if let Some(found) = want(&buf[VNET_HDR_LEN..n]) {
            return Some(found);
        }
    }
}

fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tap_file(iface: &mut WiredInterface) -> File {
    match iface.take_tap() {
        Some(TapDevice::Fd(fd)) => File::from(fd),
        other => panic!("expected a tap fd, got {other:?}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Asserts the tc wiring between `dev` and `tap` in `ns`.
fn assert_redirect(ns: &Netns, from: &str, to: &str) {
    let filters = ns.ingress_filters(from);
    assert_eq!(filters.len(), 1, "ingress filters of {from}: {filters:?}");
    let f = &filters[0];
    assert_eq!(f["kind"], "u32", "{f}");
    assert_eq!(f["protocol"], "all", "{f}");
    let action = &f["options"]["actions"][0];
    assert_eq!(action["kind"], "mirred", "{f}");
    assert_eq!(action["mirred_action"], "redirect", "{f}");
    assert_eq!(action["direction"], "egress", "{f}");
    assert_eq!(action["to_dev"], to, "{f}");
}

#[test]
#[ignore = "needs root (netns, veth, tap, tc)"]
fn wire_carries_frames_both_ways_and_teardown_restores_the_pod() {
    let rig = Rig::new();
    let rt = rt();
    // The rig works: the pod netns's own stack refuses the connection.
    assert_eq!(rig.connect_from_peer(), "refused");

    let mut net = rt
        .block_on(PodNetwork::wire("sb-both-ways", &rig.pod.path()))
        .unwrap();

    // What the guest needs.
    assert_eq!(net.interfaces.len(), 1, "{net:?}");
    let iface = &net.interfaces[0];
    assert_eq!(iface.name, "eth0");
    assert_eq!(iface.mac, MacAddr(POD_MAC));
    assert_eq!(iface.mtu, 1450);
    assert_eq!(
        iface.addresses,
        vec![
            IpNet {
                addr: ip("10.77.0.2"),
                prefix_len: 24
            },
            IpNet {
                addr: ip("fd77::2"),
                prefix_len: 64
            },
        ]
    );
    assert_eq!(iface.tap_name, "tap0_bx");
    assert_eq!(net.tap_names(), vec!["tap0_bx".to_string()]);
    assert_eq!(
        net.routes,
        vec![
            PodRoute::default_via(ip("10.77.0.1"), "eth0"),
            PodRoute {
                metric: Some(1024),
                ..PodRoute::default_via(ip("fd77::1"), "eth0")
            },
        ]
    );

    // The tap and the tc plumbing, as ip and tc see them.
    let tap = rig.pod.link("tap0_bx").expect("tap0_bx exists");
    assert_eq!(tap["mtu"], 1450, "{tap}");
    let flags: Vec<&str> = tap["flags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert!(flags.contains(&"UP"), "{tap}");
    assert!(rig.pod.qdisc_kinds("eth0").contains(&"ingress".into()));
    assert!(rig.pod.qdisc_kinds("tap0_bx").contains(&"ingress".into()));
    assert_redirect(&rig.pod, "eth0", "tap0_bx");
    assert_redirect(&rig.pod, "tap0_bx", "eth0");

    // The pod netns's stack no longer sees eth0's traffic.
    assert_eq!(rig.connect_from_peer(), "timeout");

    // VM -> peer: an ARP request written to the tap reaches the peer, which
    // learns the pod's MAC from it...
    let mut tap = tap_file(&mut net.interfaces[0]);
    let request = arp(1, [0xff; 6], POD_MAC, POD_IP, [0; 6], PEER_IP);
    rig.peer.ip(&["neigh", "flush", "dev", "br0"]);
    send_to_tap(&mut tap, &request);
    let learned = wait_for(Duration::from_secs(3), || rig.peer_neighbour_mac());
    assert_eq!(learned, Some(MacAddr(POD_MAC).to_string()));
    // ...and peer -> VM: its ARP reply comes back out of the tap.
    let peer_mac = rig.peer_mac();
    let reply = recv_arp(&mut tap, |a| a.op == 2 && a.sender_ip == PEER_IP);
    assert_eq!(reply, Some(peer_to_pod(2, peer_mac)));

    // Peer -> VM again, from the peer's own traffic: its kernel's ARP
    // request for the pod's IP arrives on the tap.
    rig.peer_arps_for_pod();
    let asked = recv_arp(&mut tap, |a| a.op == 1 && a.target_ip == POD_IP);
    assert_eq!(asked, Some(peer_to_pod(1, peer_mac)));

    // Teardown: no tap, no ingress qdisc, no filter; the pod netns answers
    // again. The tap goes even though its fd is still open.
    let names = net.tap_names();
    rt.block_on(teardown(&rig.pod.path(), &names)).unwrap();
    assert!(rig.pod.link("tap0_bx").is_none(), "{:?}", rig.pod.links());
    assert!(!rig.pod.qdisc_kinds("eth0").contains(&"ingress".into()));
    assert!(rig.pod.ingress_filters("eth0").is_empty());
    assert_eq!(rig.connect_from_peer(), "refused");
    drop(tap);

    // Idempotent, and a netns that is gone is fine.
    rt.block_on(teardown(&rig.pod.path(), &names)).unwrap();
    let path = rig.pod.path();
    run(&["ip", "netns", "del", &rig.pod.name]);
    assert!(!path.exists());
    rt.block_on(teardown(&path, &names)).unwrap();
}

#[test]
#[ignore = "needs root (netns, veth, tap, tc)"]
fn two_interfaces_get_two_taps_and_their_routes() {
    let rig = Rig::new();
    rig.add_second_interface();
    let pod = &rig.pod;
    // Calico-style: a link-scope route to a gateway outside the subnet,
    // and a route through it.
    pod.ip(&[
        "route",
        "add",
        "169.254.1.1",
        "dev",
        "eth1",
        "scope",
        "link",
    ]);
    pod.ip(&[
        "route",
        "add",
        "10.96.0.0/12",
        "via",
        "169.254.1.1",
        "dev",
        "eth1",
    ]);
    // Not a pod interface: no address (like the gretap0 fallback device).
    pod.ip(&[
        "link", "add", "spare0", "type", "veth", "peer", "name", "spare1",
    ]);
    // A qdisc that is not ours; teardown must leave it.
    pod.tc(&["qdisc", "add", "dev", "spare0", "ingress"]);

    let rt = rt();
    let net = rt
        .block_on(PodNetwork::wire("sb-two", &pod.path()))
        .unwrap();
    let names: Vec<(&str, &str)> = net
        .interfaces
        .iter()
        .map(|i| (i.name.as_str(), i.tap_name.as_str()))
        .collect();
    assert_eq!(names, vec![("eth0", "tap0_bx"), ("eth1", "tap1_bx")]);
    assert_eq!(net.interfaces[1].mtu, 1500);
    assert!(net.interfaces.iter().all(|i| i.tap_fd.is_some()));
    assert_redirect(pod, "eth1", "tap1_bx");
    assert_redirect(pod, "tap1_bx", "eth1");
    assert!(pod.link("tap1_bx").is_some());

    let route = |dst: Option<(&str, u8)>, gw: Option<&str>, dev: &str, scope| PodRoute {
        family: IpFamily::V4,
        destination: dst.map(|(a, prefix_len)| IpNet {
            addr: ip(a),
            prefix_len,
        }),
        gateway: gw.map(ip),
        device: dev.into(),
        source: None,
        scope,
        metric: None,
    };
    let v4: Vec<PodRoute> = net
        .routes
        .iter()
        .filter(|r| r.family == IpFamily::V4)
        .cloned()
        .collect();
    assert_eq!(
        v4,
        vec![
            route(Some(("169.254.1.1", 32)), None, "eth1", RouteScope::Link),
            route(None, Some("10.77.0.1"), "eth0", RouteScope::Universe),
            route(
                Some(("10.96.0.0", 12)),
                Some("169.254.1.1"),
                "eth1",
                RouteScope::Universe
            ),
        ]
    );

    rt.block_on(teardown(&pod.path(), &net.tap_names()))
        .unwrap();
    for dev in ["eth0", "eth1"] {
        assert!(!pod.qdisc_kinds(dev).contains(&"ingress".into()), "{dev}");
    }
    assert!(pod.link("tap0_bx").is_none() && pod.link("tap1_bx").is_none());
    assert!(pod.qdisc_kinds("spare0").contains(&"ingress".into()));
}

#[test]
#[ignore = "needs root (netns, veth, tap, tc)"]
fn failed_wiring_undoes_what_it_did() {
    let rig = Rig::new();
    rig.add_second_interface();
    let pod = &rig.pod;
    // eth0 wires fine; eth1 already has an ingress qdisc, so its step fails
    // after tap1_bx exists.
    pod.tc(&["qdisc", "add", "dev", "eth1", "ingress"]);

    let err = rt()
        .block_on(PodNetwork::wire("sb-fail", &pod.path()))
        .unwrap_err();
    assert_eq!(
        chain(&err),
        format!(
            "sandbox sb-fail: netns {}: cannot add the ingress qdisc on eth1: File exists",
            pod.path().display()
        )
    );
    assert_eq!(err.interface.as_deref(), Some("eth1"));
    assert_eq!(err.errno(), Some(libc::EEXIST));

    // Nothing of ours is left; the qdisc that was there before stays.
    let names: Vec<String> = pod
        .links()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("tap")),
        "taps left: {names:?}"
    );
    assert!(!pod.qdisc_kinds("eth0").contains(&"ingress".into()));
    assert!(pod.ingress_filters("eth0").is_empty());
    assert!(pod.qdisc_kinds("eth1").contains(&"ingress".into()));
}

#[test]
#[ignore = "needs root (netns, veth, tap, tc)"]
fn teardown_after_the_vmm_closed_the_tap() {
    let rig = Rig::new();
    let rt = rt();
    let mut net = rt
        .block_on(PodNetwork::wire("sb-closed", &rig.pod.path()))
        .unwrap();
    // The VMM exits: the last fd closes and the kernel removes the tap, but
    // eth0 still redirects (to nothing).
    let fd: OwnedFd = net.interfaces[0].tap_fd.take().unwrap();
    drop(fd);
    let gone = wait_for(Duration::from_secs(3), || {
        rig.pod.link("tap0_bx").is_none().then_some(())
    });
    assert!(gone.is_some(), "tap0_bx outlived its fd");
    assert!(rig.pod.qdisc_kinds("eth0").contains(&"ingress".into()));
    assert_eq!(rig.pod.ingress_filters("eth0").len(), 1);

    rt.block_on(teardown(&rig.pod.path(), &net.tap_names()))
        .unwrap();
    assert!(!rig.pod.qdisc_kinds("eth0").contains(&"ingress".into()));
    assert_eq!(rig.connect_from_peer(), "refused");
}

#[test]
#[ignore = "needs root (netns, veth, tap, tc)"]
fn netns_with_only_lo_wires_nothing() {
    let ns = Netns::new("empty");
    let rt = rt();
    let net = rt
        .block_on(PodNetwork::wire("sb-empty", &ns.path()))
        .unwrap();
    assert!(net.interfaces.is_empty(), "{net:?}");
    assert!(net.routes.is_empty(), "{net:?}");
    let names: Vec<Value> = ns.links().iter().map(|l| l["ifname"].clone()).collect();
    assert_eq!(names, vec![Value::from("lo")]);
    rt.block_on(teardown(&ns.path(), &[])).unwrap();
}

#[test]
#[ignore = "needs root (netns, veth, tap, tc)"]
fn wiring_a_wired_netns_fails_and_keeps_the_first_wiring() {
    let rig = Rig::new();
    let rt = rt();
    let first = rt
        .block_on(PodNetwork::wire("sb-first", &rig.pod.path()))
        .unwrap();
    let err = rt
        .block_on(PodNetwork::wire("sb-second", &rig.pod.path()))
        .unwrap_err();
    assert_eq!(
        chain(&err),
        format!(
            "sandbox sb-second: netns {}: cannot create tap tap0_bx for eth0: \
             Device or resource busy",
            rig.pod.path().display()
        )
    );
    // The failed attempt undid only its own steps.
    assert!(rig.pod.link("tap0_bx").is_some());
    assert_redirect(&rig.pod, "eth0", "tap0_bx");
    assert_redirect(&rig.pod, "tap0_bx", "eth0");
    assert_eq!(rig.connect_from_peer(), "timeout");
    drop(first);
}
