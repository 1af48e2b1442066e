//! The host side of the hybrid vsock: the `uds_path` listener, the
//! connections keyed by `(local_port, peer_port)`, and one epoll set that
//! holds every host fd (listener, timer, streams). The VMM event loop
//! watches only that epoll fd; connections come and go inside it.
//!
//! Packets the guest is owed wait in an RX queue of connection keys (each
//! connection at most once) plus a bounded queue of raw RSTs for packets
//! that belong to no connection. When the raw queue is full the device stops
//! taking TX chains until the guest drains its RX queue, so a guest that
//! floods without reading cannot make the VMM buffer without bound.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vm_memory::VolatileSlice;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::csm::Connection;
use super::metrics::VsockMetrics;
use super::packet::{op, Header, RxPacket, TYPE_STREAM};
use super::{
    rate_limited, VsockError, CONNECT_TIMEOUT, HOST_CID, LOCAL_PORT_BASE, MAX_CONNECTIONS,
    MAX_CONNECT_LINE, MAX_RAW_RX_QUEUE, TIMER_TICK,
};

/// `(local_port, peer_port)`: host-side port, guest-side port.
pub type ConnKey = (u32, u32);

/// What an fd in the epoll set belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Listener,
    Timer,
    Handshake,
    Conn(ConnKey),
}

/// A host connection that has not finished its `CONNECT <port>\n` line.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum RxItem {
    Conn(ConnKey),
    Raw(Header),
}

/// Most epoll events taken per wait.
const EVENT_BATCH: usize = 64;
/// Most connections accepted per listener event (others wait for the next).
const ACCEPT_BATCH: usize = 64;

/// The hybrid unix-socket backend of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    listener_paused: bool,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    targets: HashMap<RawFd, Target>,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<ConnKey, Connection>,
    rxq: VecDeque<RxItem>,
    raw_queued: usize,
    next_local_port: u32,
    /// Most connections at once (host and guest initiated, handshakes
    /// not counted): [`MAX_CONNECTIONS`], lower only in the fuzz harness so
    /// it reaches the limit with few streams.
    max_connections: usize,
    /// Set by [`Muxer::preconnect`]: one connection to the listener of each
    /// host port the guest may connect to, made before the jail; the
    /// guest's first connection to that port gets it, any other is refused.
    /// None: guest connections are connected as they come (unjailed).
    preconnected: Option<HashMap<u32, UnixStream>>,
    metrics: Arc<VsockMetrics>,
}

/// Parses `CONNECT <port>` (the newline already stripped; a trailing CR is allowed).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let rest = line.strip_prefix(b"CONNECT ")?;
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(rest).ok()?.parse().ok()
}

/// Connects to a unix socket without blocking (a full backlog fails at
/// once instead of stalling the event loop).
fn connect_nonblocking(path: &Path) -> Result<UnixStream, nix::Error> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd: OwnedFd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let addr = UnixAddr::new(path)?;
    connect(fd.as_raw_fd(), &addr)?;
    Ok(UnixStream::from(fd))
}

impl Muxer {
    /// Listens on `uds_path` (a stale socket file there is replaced).
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        metrics: Arc<VsockMetrics>,
    ) -> Result<Self, VsockError> {
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::UdsPathInUse(uds_path.to_path_buf()));
            }
            std::fs::remove_file(uds_path)
                .map_err(|e| VsockError::RemoveStale(uds_path.to_path_buf(), e))?;
        }
        let listener = UnixListener::bind(uds_path)
            .map_err(|e| VsockError::Listen(uds_path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| VsockError::Listen(uds_path.to_path_buf(), e))?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Epoll(e.into()))?;
        let mut m = Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            listener_paused: false,
            epoll,
            timer,
            timer_armed: false,
            targets: HashMap::new(),
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            rxq: VecDeque::new(),
            raw_queued: 0,
            next_local_port: first_local_port(),
            max_connections: MAX_CONNECTIONS,
            preconnected: None,
            metrics,
        };
        let lfd = m.listener.as_raw_fd();
        m.epoll_ctl(ControlOperation::Add, lfd, EventSet::IN)
            .map_err(VsockError::Epoll)?;
        m.targets.insert(lfd, Target::Listener);
        let tfd = m.timer.as_raw_fd();
        m.epoll_ctl(ControlOperation::Add, tfd, EventSet::IN)
            .map_err(VsockError::Epoll)?;
        m.targets.insert(tfd, Target::Timer);
        Ok(m)
    }

    /// Connects now to the listener `<uds_path>_<port>` of each of `ports`
    /// and from then on gives a guest connection to host port P the
    /// connection made here for P, once; a guest connection to any other
    /// port, or a second one to P, is refused (RST). Called before the
    /// jail, after which the VMM can make no connection of its own (its
    /// seccomp profiles have no `socket` or `connect`).
    pub fn preconnect(&mut self, ports: &[u32]) -> Result<(), VsockError> {
        let mut streams = HashMap::with_capacity(ports.len());
        for &port in ports {
            let path = self.host_port_path(port);
            let stream = connect_nonblocking(&path).map_err(|source| VsockError::Preconnect {
                port,
                path,
                source,
            })?;
            streams.insert(port, stream);
        }
        self.preconnected = Some(streams);
        Ok(())
    }

    /// `<uds_path>_<port>`: where a guest connection to host `port` goes.
    fn host_port_path(&self, port: u32) -> PathBuf {
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{port}"));
        PathBuf::from(path)
    }

    /// The epoll fd the VMM event loop watches.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Where host processes connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Live connections plus unfinished `CONNECT` lines.
    pub fn connection_count(&self) -> usize {
        self.conns.len() + self.handshakes.len()
    }

    /// The connection `key`, if any (tests and status).
    pub fn connection(&self, key: ConnKey) -> Option<&Connection> {
        self.conns.get(&key)
    }

    /// Keys of all connections.
    pub fn connection_keys(&self) -> Vec<ConnKey> {
        self.conns.keys().copied().collect()
    }

    /// Whether the guest is owed a packet.
    pub fn has_pending_rx(&self) -> bool {
        !self.rxq.is_empty()
    }

    /// Whether TX processing must wait for the guest to drain RX.
    pub fn tx_throttled(&self) -> bool {
        self.raw_queued >= MAX_RAW_RX_QUEUE
    }

    fn epoll_ctl(&self, op: ControlOperation, fd: RawFd, ev: EventSet) -> std::io::Result<()> {
        self.epoll.ctl(op, fd, EpollEvent::new(ev, fd as u64))
    }

    /// Handles everything the epoll set reports, without blocking.
    pub fn process_events(&mut self) {
        let mut events = [EpollEvent::default(); EVENT_BATCH];
        // A bounded number of rounds keeps the event loop responsive.
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!(device = "vsock", error = %e, "epoll_wait on the vsock muxer failed");
                    break;
                }
            };
            for ev in &events[..n] {
                let fd = ev.data() as RawFd;
                let set = ev.event_set();
                match self.targets.get(&fd).copied() {
                    Some(Target::Listener) => self.accept(),
                    Some(Target::Timer) => {
                        let _ = self.timer.wait();
                        self.sweep(Instant::now());
                    }
                    Some(Target::Handshake) => self.handshake_event(fd),
                    Some(Target::Conn(key)) => {
                        if let Some(c) = self.conns.get_mut(&key) {
                            c.notify(set);
                        }
                        self.update(key);
                    }
                    None => {}
                }
            }
            if n < EVENT_BATCH {
                break;
            }
        }
        self.arm_timer();
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.connection_count() >= self.max_connections {
                        let n = VsockMetrics::add(&self.metrics.conns_refused, 1);
                        if rate_limited(n) {
                            tracing::warn!(
                                device = "vsock",
                                limit = self.max_connections,
                                "vsock connection limit reached; host connection closed"
                            );
                        }
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if stream.set_nonblocking(true).is_err()
                        || self
                            .epoll_ctl(ControlOperation::Add, fd, EventSet::IN)
                            .is_err()
                    {
                        continue;
                    }
                    self.targets.insert(fd, Target::Handshake);
                    self.handshakes.insert(
                        fd,
                        Handshake {
                            stream,
                            line: Vec::with_capacity(MAX_CONNECT_LINE),
                            deadline: Instant::now() + CONNECT_TIMEOUT,
                        },
                    );
                    // The line is often there already.
                    self.handshake_event(fd);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of fds, most likely: stop watching the listener until
                    // the next timer tick instead of spinning on it.
                    tracing::warn!(device = "vsock", error = %e, "accept on the vsock socket failed; pausing the listener");
                    let _ = self.epoll_ctl(
                        ControlOperation::Delete,
                        self.listener.as_raw_fd(),
                        EventSet::empty(),
                    );
                    self.listener_paused = true;
                    return;
                }
            }
        }
    }

    fn close_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            let _ = self.epoll_ctl(ControlOperation::Delete, fd, EventSet::empty());
            self.targets.remove(&fd);
        }
    }

    /// Reads the `CONNECT` line one byte at a time, so nothing after the
    /// newline is consumed before the guest accepts the connection.
    fn handshake_event(&mut self, fd: RawFd) {
        let Some(hs) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut b = [0u8; 1];
            match hs.stream.read(&mut b) {
                Ok(0) => return self.close_handshake(fd),
                Ok(_) if b[0] == b'\n' => break parse_connect_line(&hs.line),
                Ok(_) => {
                    hs.line.push(b[0]);
                    if hs.line.len() >= MAX_CONNECT_LINE {
                        break None;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return self.close_handshake(fd),
            }
        };
        let Some(peer_port) = port else {
            let n = VsockMetrics::add(&self.metrics.conns_refused, 1);
            if rate_limited(n) {
                tracing::warn!(
                    device = "vsock",
                    "malformed CONNECT line; host connection closed"
                );
            }
            return self.close_handshake(fd);
        };
        let Some(hs) = self.handshakes.remove(&fd) else {
            return;
        };
        let Some(local_port) = self.alloc_local_port(peer_port) else {
            let _ = self.epoll_ctl(ControlOperation::Delete, fd, EventSet::empty());
            self.targets.remove(&fd);
            return;
        };
        let key = (local_port, peer_port);
        let mut conn = Connection::new_local(
            hs.stream,
            self.guest_cid,
            local_port,
            peer_port,
            self.metrics.clone(),
        );
        // Still registered for IN from the handshake; `update` sets the real mask.
        conn.registered = Some(EventSet::IN.bits());
        self.targets.insert(fd, Target::Conn(key));
        self.conns.insert(key, conn);
        VsockMetrics::add(&self.metrics.conns_opened, 1);
        tracing::debug!(
            device = "vsock",
            local_port,
            peer_port,
            "host connection to guest port"
        );
        self.update(key);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(LOCAL_PORT_BASE);
            if !self.conns.contains_key(&(p, peer_port)) {
                return Some(p);
            }
        }
        None
    }

    /// Re-syncs a connection with the epoll set and the RX queue, or removes it.
    fn update(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.is_dead() {
            self.remove(key);
            return;
        }
        let want = conn.interest();
        // While the host end is open the fd stays registered (even with no
        // events) so a hang-up is noticed; after it, only for real work.
        let desired = if conn.host_hup() && want.is_empty() {
            None
        } else {
            Some(want.bits())
        };
        if desired != conn.registered {
            let fd = conn.fd();
            let ev = EpollEvent::new(want, fd as u64);
            let res = match (conn.registered, desired) {
                (None, Some(_)) => self.epoll.ctl(ControlOperation::Add, fd, ev),
                (Some(_), Some(_)) => self.epoll.ctl(ControlOperation::Modify, fd, ev),
                (Some(_), None) => self.epoll.ctl(ControlOperation::Delete, fd, ev),
                (None, None) => Ok(()),
            };
            match res {
                Ok(()) => conn.registered = desired,
                Err(e) => {
                    tracing::warn!(device = "vsock", error = %e, "epoll_ctl on a vsock stream failed; connection reset");
                    conn.kill();
                }
            }
        }
        if conn.has_pending_rx() && !conn.queued {
            conn.queued = true;
            self.rxq.push_back(RxItem::Conn(key));
        }
    }

    fn remove(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.remove(&key) {
            let fd = conn.fd();
            if conn.registered.is_some() {
                let _ = self.epoll_ctl(ControlOperation::Delete, fd, EventSet::empty());
            }
            self.targets.remove(&fd);
            VsockMetrics::add(&self.metrics.conns_closed, 1);
            // Dropping the connection closes the host stream.
        }
    }

    fn queue_rst(&mut self, to: &Header) {
        if self.raw_queued >= MAX_RAW_RX_QUEUE {
            VsockMetrics::add(&self.metrics.dropped_packets, 1);
            return;
        }
        self.raw_queued += 1;
        self.rxq.push_back(RxItem::Raw(Header::rst_for(to)));
    }

    /// A packet from the guest's TX queue.
    pub fn send_pkt(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, ()>>) {
        VsockMetrics::add(&self.metrics.tx_packets, 1);
        if hdr.src_cid != self.guest_cid {
            // Spoofed source: answering would address someone else.
            let n = VsockMetrics::add(&self.metrics.dropped_packets, 1);
            if rate_limited(n) {
                tracing::warn!(
                    device = "vsock",
                    src_cid = hdr.src_cid,
                    "guest packet with a foreign source CID dropped"
                );
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.op == op::RST {
            // Never answer an RST.
            if self.conns.contains_key(&key) && hdr.dst_cid == HOST_CID {
                self.remove(key);
                self.arm_timer();
            }
            return;
        }
        if hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            self.queue_rst(hdr);
            return;
        }
        if self.conns.contains_key(&key) {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.send_pkt(hdr, data);
            }
            self.update(key);
        } else if hdr.op == op::REQUEST {
            self.guest_connect(hdr);
        } else {
            self.queue_rst(hdr);
        }
        self.arm_timer();
    }

    /// A guest REQUEST to host port `dst_port`: the connection made for it
    /// before the jail ([`Muxer::preconnect`]), or unjailed, a connection
    /// to `<uds_path>_<port>` made now.
    fn guest_connect(&mut self, hdr: &Header) {
        if self.connection_count() >= self.max_connections {
            VsockMetrics::add(&self.metrics.conns_refused, 1);
            self.queue_rst(hdr);
            return;
        }
        let stream = match &mut self.preconnected {
            Some(streams) => streams.remove(&hdr.dst_port).ok_or_else(|| {
                "no connection to this host port was made before the jail (or it was used)"
                    .to_string()
            }),
            None => {
                connect_nonblocking(&self.host_port_path(hdr.dst_port)).map_err(|e| e.to_string())
            }
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                VsockMetrics::add(&self.metrics.conns_refused, 1);
                tracing::debug!(device = "vsock", port = hdr.dst_port, error = %e, "no host listener for a guest connection; RST");
                self.queue_rst(hdr);
                return;
            }
        };
        let key = (hdr.dst_port, hdr.src_port);
        let conn = Connection::new_peer(stream, hdr, self.metrics.clone());
        self.targets.insert(conn.fd(), Target::Conn(key));
        self.conns.insert(key, conn);
        VsockMetrics::add(&self.metrics.conns_opened, 1);
        tracing::debug!(
            device = "vsock",
            port = hdr.dst_port,
            peer_port = hdr.src_port,
            "guest connection to host port"
        );
        self.update(key);
    }

    /// Fills one RX packet; returns its used length, or None if the guest is
    /// owed nothing right now (the chain is then left for later).
    pub fn recv_pkt(&mut self, pkt: &mut RxPacket<'_>) -> Option<u32> {
        while let Some(item) = self.rxq.pop_front() {
            let hdr = match item {
                RxItem::Raw(h) => {
                    self.raw_queued -= 1;
                    VsockMetrics::add(&self.metrics.rx_packets, 1);
                    VsockMetrics::add(&self.metrics.rst_sent, 1);
                    h
                }
                RxItem::Conn(key) => {
                    let Some(conn) = self.conns.get_mut(&key) else {
                        continue;
                    };
                    conn.queued = false;
                    let h = conn.recv_pkt(pkt);
                    self.update(key);
                    match h {
                        Some(h) => h,
                        None => continue,
                    }
                }
            };
            match pkt.write_header(&hdr) {
                Ok(len) => {
                    self.arm_timer();
                    return Some(len);
                }
                Err(e) => {
                    // Header buffers were validated when the chain was parsed.
                    tracing::warn!(device = "vsock", error = %e, "failed to write an RX header; packet lost");
                    let key = (hdr.src_port, hdr.dst_port);
                    if let Some(c) = self.conns.get_mut(&key) {
                        c.kill();
                    }
                    self.update(key);
                    return Some(0);
                }
            }
        }
        self.arm_timer();
        None
    }

    /// Expires handshakes and connections whose deadline passed.
    pub fn sweep(&mut self, now: Instant) {
        let late: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in late {
            tracing::debug!(
                device = "vsock",
                "host connection sent no CONNECT line in time; closed"
            );
            self.close_handshake(fd);
        }
        for key in self.connection_keys() {
            if let Some(c) = self.conns.get_mut(&key) {
                c.check_deadline(now);
            }
            self.update(key);
        }
        if self.listener_paused {
            let lfd = self.listener.as_raw_fd();
            if self
                .epoll_ctl(ControlOperation::Add, lfd, EventSet::IN)
                .is_ok()
            {
                self.listener_paused = false;
            }
        }
        self.arm_timer();
    }

    /// The periodic timer runs only while something can expire.
    fn arm_timer(&mut self) {
        let need = !self.conns.is_empty() || !self.handshakes.is_empty() || self.listener_paused;
        if need == self.timer_armed {
            return;
        }
        let res = if need {
            self.timer.reset(TIMER_TICK, Some(TIMER_TICK))
        } else {
            self.timer.clear()
        };
        match res {
            Ok(()) => self.timer_armed = need,
            Err(e) => tracing::warn!(device = "vsock", error = %e, "failed to set the vsock timer"),
        }
    }

    /// Lowers the connection limit (fuzzing only: production keeps
    /// [`MAX_CONNECTIONS`]).
    #[cfg(any(test, fuzzing))]
    pub fn set_max_connections(&mut self, limit: usize) {
        self.max_connections = limit.min(MAX_CONNECTIONS);
    }

    /// Device reset: every connection and handshake is dropped (host streams
    /// closed); the listener stays, and so do the connections made for host
    /// ports the guest has not used yet ([`Muxer::preconnect`]).
    pub fn reset(&mut self) {
        for key in self.connection_keys() {
            self.remove(key);
        }
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            self.close_handshake(fd);
        }
        self.rxq.clear();
        self.raw_queued = 0;
        self.arm_timer();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // Leave nothing behind in the sandbox directory.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}

/// Where a muxer starts numbering its host-side ports: a random one of
/// the 2^29 ports from [`LOCAL_PORT_BASE`], as kernels pick ephemeral
/// ports. A VM restored from a snapshot can still hold the sockets of the
/// template's host connections (the transport reset closes them, but they
/// live until their owner closes them); a new connection from the same
/// host port would reach such a socket and be reset.
fn first_local_port() -> u32 {
    let mut b = [0u8; 4];
    // Without randomness (a getrandom error: never, in practice) the plain
    // base still serves VMs that were not restored.
    let offset = match boxlite_protocol::random::fill(&mut b) {
        Ok(()) => u32::from_ne_bytes(b) >> 3,
        Err(_) => 0,
    };
    LOCAL_PORT_BASE + offset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parsing() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 1024\r"), Some(1024));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295"), Some(u32::MAX));
        for bad in [
            &b"CONNECT 4294967296"[..],
            b"CONNECT",
            b"CONNECT ",
            b"CONNECT -1",
            b"CONNECT +1",
            b"CONNECT 1 2",
            b"connect 1",
            b"CONNECT  1",
            b"CONNECT 0x10",
            b"\xff\xfe",
            b"",
        ] {
            assert_eq!(
                parse_connect_line(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn stale_socket_is_replaced_and_other_files_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("v.sock");
        drop(UnixListener::bind(&p).expect("bind"));
        let m = Muxer::new(3, &p, Arc::default()).expect("replaces stale socket");
        drop(m);
        assert!(!p.exists(), "socket removed on drop");
        std::fs::write(&p, b"x").expect("write");
        assert!(matches!(
            Muxer::new(3, &p, Arc::default()),
            Err(VsockError::UdsPathInUse(_))
        ));
    }
}
