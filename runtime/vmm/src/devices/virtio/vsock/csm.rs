//! One vsock stream: the guest's AF_VSOCK socket on one side, a host unix
//! stream on the other. The connection state machine and the credit
//! accounting of both directions.
//!
//! - host → guest (RX): bytes are read from the host stream straight into
//!   the guest's RX buffer, never more than the guest's free credit
//!   (`peer_buf_alloc - (rx_cnt - peer_fwd_cnt)`). With no credit the host
//!   stream is not polled for reading, so a slow guest leaves the data in
//!   the host socket and the host writer blocks. Nothing is buffered here.
//! - guest → host (TX): bytes are written to the host stream at once; what
//!   the host does not take waits in a buffer of at most
//!   [`MAX_CONN_TX_BUF`] bytes, which is the `buf_alloc` we advertise. A
//!   guest that sends more than its credit gets RST.
//!
//! Shutdown: a host half-close (EOF) becomes `SHUTDOWN(SEND)`; a full host
//! close (EPOLLHUP) becomes `SHUTDOWN(RCV|SEND)` and the guest has
//! [`SHUTDOWN_TIMEOUT`] to answer RST. A guest `SHUTDOWN(SEND)` half-closes
//! the host stream once the buffer is flushed; a guest full shutdown is
//! answered with RST once the buffer is flushed. When both directions are
//! finished the connection is reset and removed.

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use vm_memory::io::{ReadVolatile, WriteVolatile};
use vm_memory::{VolatileMemoryError, VolatileSlice};
use vmm_sys_util::epoll::EventSet;

use super::metrics::VsockMetrics;
use super::packet::{op, shutdown, Header, RxPacket, TYPE_STREAM};
use super::{
    rate_limited, VsockError, CONNECT_TIMEOUT, CREDIT_UPDATE_THRESHOLD, HOST_CID, MAX_CONN_TX_BUF,
    MAX_PKT_BUF_SIZE, SHUTDOWN_TIMEOUT,
};

/// Where a connection is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST owed to (or sent to) the guest, no RESPONSE yet.
    LocalInit,
    /// Guest-initiated: the host stream is connected, RESPONSE owed to the guest.
    PeerInit,
    /// Data flows.
    Established,
    /// A full shutdown is under way; waiting for RST or for the TX buffer to drain.
    Closing,
    /// RST owed to the guest; removed once it is sent.
    Killed,
    /// Finished; the muxer removes it.
    Dead,
}

/// Control packets a connection owes the guest (bit set).
mod pending {
    pub const RST: u8 = 1;
    pub const REQUEST: u8 = 2;
    pub const RESPONSE: u8 = 4;
    pub const RW: u8 = 8;
    pub const SHUTDOWN: u8 = 16;
    pub const CREDIT_REQUEST: u8 = 32;
    pub const CREDIT_UPDATE: u8 = 64;
}

/// Guest → host bytes the host has not taken yet. Bounded by [`MAX_CONN_TX_BUF`].
#[derive(Debug, Default)]
struct TxBuf {
    data: Vec<u8>,
    head: usize,
}

impl TxBuf {
    fn len(&self) -> usize {
        self.data.len() - self.head
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends `src`, refusing to grow past the limit.
    fn push(&mut self, src: &VolatileSlice<'_, ()>) -> Result<(), VsockError> {
        let buffered = self.len();
        if buffered + src.len() > MAX_CONN_TX_BUF as usize {
            return Err(VsockError::TxBufFull {
                got: src.len(),
                buffered,
            });
        }
        let start = self.data.len();
        self.data.resize(start + src.len(), 0);
        src.copy_to(&mut self.data[start..]);
        Ok(())
    }

    /// Writes as much as the stream takes; returns the bytes written.
    fn flush(&mut self, stream: &mut UnixStream) -> std::io::Result<usize> {
        let mut total = 0;
        while self.head < self.data.len() {
            match stream.write(&self.data[self.head..]) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.head += n;
                    total += n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.head == self.data.len() {
            // Give big buffers back once drained.
            if self.data.capacity() > 64 * 1024 {
                self.data = Vec::new();
            } else {
                self.data.clear();
            }
            self.head = 0;
        } else if self.head > self.data.len() / 2 {
            self.data.drain(..self.head);
            self.head = 0;
        }
        Ok(total)
    }

    fn clear(&mut self) {
        self.data = Vec::new();
        self.head = 0;
    }
}

fn would_block(e: &VolatileMemoryError) -> bool {
    matches!(e, VolatileMemoryError::IOError(io) if io.kind() == ErrorKind::WouldBlock)
}

/// One vsock stream connection.
#[derive(Debug)]
pub struct Connection {
    state: ConnState,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    stream: UnixStream,
    tx_buf: TxBuf,
    /// Guest → host bytes written to the host stream.
    fwd_cnt: u32,
    /// `fwd_cnt` as the guest last saw it.
    last_fwd_cnt_sent: u32,
    /// The guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Host → guest bytes sent.
    rx_cnt: u32,
    pending: u8,
    /// Flags of the SHUTDOWN owed to the guest.
    shutdown_flags: u32,
    /// SHUTDOWN flags the guest sent us.
    peer_shutdown: u32,
    /// SHUTDOWN flags we sent the guest.
    local_shutdown: u32,
    /// The host stream returned EOF.
    host_eof: bool,
    /// The host closed its end completely (EPOLLHUP).
    host_hup: bool,
    /// We half-closed the host stream after the guest's SHUTDOWN(SEND).
    host_write_closed: bool,
    /// A CREDIT_REQUEST was sent since the guest last reported credit.
    credit_requested: bool,
    /// The REQUEST of a host-initiated connection reached the guest.
    request_sent: bool,
    deadline: Option<Instant>,
    /// In the muxer's RX queue.
    pub(crate) queued: bool,
    /// Current epoll registration (event bits), if any.
    pub(crate) registered: Option<u32>,
    metrics: Arc<VsockMetrics>,
}

impl Connection {
    fn base(
        state: ConnState,
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        metrics: Arc<VsockMetrics>,
    ) -> Self {
        Connection {
            state,
            guest_cid,
            local_port,
            peer_port,
            stream,
            tx_buf: TxBuf::default(),
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            rx_cnt: 0,
            pending: 0,
            shutdown_flags: 0,
            peer_shutdown: 0,
            local_shutdown: 0,
            host_eof: false,
            host_hup: false,
            host_write_closed: false,
            credit_requested: false,
            request_sent: false,
            deadline: None,
            queued: false,
            registered: None,
            metrics,
        }
    }

    /// A host-initiated connection to guest port `peer_port`: owes a REQUEST.
    pub fn new_local(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        metrics: Arc<VsockMetrics>,
    ) -> Self {
        let mut c = Self::base(
            ConnState::LocalInit,
            stream,
            guest_cid,
            local_port,
            peer_port,
            metrics,
        );
        c.pending = pending::REQUEST;
        c.deadline = Some(Instant::now() + CONNECT_TIMEOUT);
        c
    }

    /// A guest-initiated connection (its REQUEST is `req`): owes a RESPONSE.
    pub fn new_peer(stream: UnixStream, req: &Header, metrics: Arc<VsockMetrics>) -> Self {
        let mut c = Self::base(
            ConnState::PeerInit,
            stream,
            req.src_cid,
            req.dst_port,
            req.src_port,
            metrics,
        );
        c.peer_buf_alloc = req.buf_alloc;
        c.peer_fwd_cnt = req.fwd_cnt;
        c.pending = pending::RESPONSE;
        c
    }

    /// The connection's state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// The host stream's fd.
    pub fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    /// Whether the muxer should drop it now.
    pub fn is_dead(&self) -> bool {
        self.state == ConnState::Dead
    }

    /// Whether the connection owes the guest a packet.
    pub fn has_pending_rx(&self) -> bool {
        self.pending != 0
    }

    /// Whether the host stream is known to be fully closed.
    pub fn host_hup(&self) -> bool {
        self.host_hup
    }

    /// Guest → host bytes buffered in the VMM.
    pub fn tx_buffered(&self) -> usize {
        self.tx_buf.len()
    }

    /// How many bytes the guest can still receive.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.rx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn wants_read(&self) -> bool {
        self.state == ConnState::Established
            && !self.host_eof
            && self.peer_shutdown & shutdown::RCV == 0
            && self.local_shutdown & shutdown::SEND == 0
    }

    /// The epoll events this connection needs from its host stream.
    pub fn interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if matches!(self.state, ConnState::Killed | ConnState::Dead) {
            return ev;
        }
        if self.wants_read() && self.peer_free() > 0 && self.pending & pending::RW == 0 {
            ev |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            ev |= EventSet::OUT;
        }
        ev
    }

    /// Ends the connection with an RST to the guest (or silently if the
    /// guest never heard of it).
    pub fn kill(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Both);
        self.tx_buf.clear();
        self.deadline = None;
        let guest_knows = match self.state {
            ConnState::LocalInit => self.request_sent,
            ConnState::Dead => false,
            _ => true,
        };
        if guest_knows {
            self.state = ConnState::Killed;
            self.pending = pending::RST;
        } else {
            self.state = ConnState::Dead;
            self.pending = 0;
        }
    }

    fn protocol_error(&mut self, what: &str) {
        let n = VsockMetrics::add(&self.metrics.protocol_errors, 1);
        if rate_limited(n) {
            tracing::warn!(
                device = "vsock",
                local_port = self.local_port,
                peer_port = self.peer_port,
                state = ?self.state,
                "guest broke the vsock protocol ({what}); connection reset"
            );
        }
        self.kill();
    }

    fn header(&self, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: MAX_CONN_TX_BUF,
            fwd_cnt: self.fwd_cnt,
        }
    }

    fn both_directions_done(&self) -> bool {
        let host_to_guest_done = self.host_eof || self.peer_shutdown & shutdown::RCV != 0;
        let guest_to_host_done = self.peer_shutdown & shutdown::SEND != 0 && self.tx_buf.is_empty();
        host_to_guest_done && guest_to_host_done
    }

    fn maybe_credit_update(&mut self) {
        if self.state == ConnState::Established
            && self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
        {
            self.pending |= pending::CREDIT_UPDATE;
        }
    }

    /// The host closed its end entirely: tell the guest, wait for its RST.
    fn host_gone(&mut self) {
        self.tx_buf.clear();
        self.pending &= !pending::RW;
        let missing = shutdown::BOTH & !self.local_shutdown;
        if missing != 0 {
            self.shutdown_flags |= missing;
            self.pending |= pending::SHUTDOWN;
        }
        self.state = ConnState::Closing;
        self.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
    }

    /// Events from the host stream.
    pub fn notify(&mut self, events: EventSet) {
        if matches!(self.state, ConnState::Killed | ConnState::Dead) {
            return;
        }
        let hup = events.contains(EventSet::HANG_UP);
        if hup {
            self.host_hup = true;
        }
        match self.state {
            ConnState::LocalInit | ConnState::PeerInit => {
                if hup || events.contains(EventSet::ERROR) {
                    // The host left before the guest answered.
                    self.kill();
                }
                return;
            }
            _ => {}
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR)
            && self.wants_read()
        {
            // The read finds data, EOF or the error.
            self.pending |= pending::RW;
        }
        if !self.tx_buf.is_empty()
            && events.intersects(EventSet::OUT | EventSet::HANG_UP | EventSet::ERROR)
        {
            self.flush();
        }
        if hup
            && !self.host_write_closed
            && !self.wants_read()
            && self.state == ConnState::Established
            && self.tx_buf.is_empty()
            && self.local_shutdown != shutdown::BOTH
        {
            self.host_gone();
        }
    }

    fn flush(&mut self) {
        match self.tx_buf.flush(&mut self.stream) {
            Ok(n) => {
                self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                self.maybe_credit_update();
            }
            Err(e) => {
                tracing::debug!(device = "vsock", local_port = self.local_port, error = %e, "host stream write failed; connection reset");
                self.kill();
                return;
            }
        }
        if self.tx_buf.is_empty() {
            self.after_tx_drained();
        }
    }

    fn after_tx_drained(&mut self) {
        if self.peer_shutdown & shutdown::SEND != 0 && !self.host_write_closed {
            let _ = self.stream.shutdown(Shutdown::Write);
            self.host_write_closed = true;
        }
        if (self.state == ConnState::Closing && self.peer_shutdown == shutdown::BOTH)
            || self.both_directions_done()
        {
            self.kill();
        }
    }

    /// Checks the connection's deadline.
    pub fn check_deadline(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| d <= now) {
            tracing::debug!(device = "vsock", local_port = self.local_port, peer_port = self.peer_port, state = ?self.state, "vsock connection timed out");
            self.kill();
        }
    }

    /// A guest packet for this connection (not RST: the muxer handles that).
    pub fn send_pkt(&mut self, hdr: &Header, data: Option<&VolatileSlice<'_, ()>>) {
        if matches!(self.state, ConnState::Killed | ConnState::Dead) {
            return;
        }
        // Every packet carries the guest's credit.
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = hdr.fwd_cnt;
        if self.peer_free() > 0 {
            self.credit_requested = false;
        }
        match hdr.op {
            op::RW => self.guest_data(data),
            op::RESPONSE if self.state == ConnState::LocalInit => self.established_by_guest(),
            op::CREDIT_UPDATE => {}
            op::CREDIT_REQUEST => self.pending |= pending::CREDIT_UPDATE,
            op::SHUTDOWN => self.guest_shutdown(hdr.flags),
            op::REQUEST | op::RESPONSE => self.protocol_error("unexpected handshake packet"),
            _ => self.protocol_error("unknown operation"),
        }
    }

    fn established_by_guest(&mut self) {
        let line = format!("OK {}\n", self.local_port);
        match self.stream.write(line.as_bytes()) {
            // The stream is empty at this point: a short write means a broken host.
            Ok(n) if n == line.len() => {
                self.state = ConnState::Established;
                self.deadline = None;
            }
            _ => self.kill(),
        }
    }

    fn guest_data(&mut self, data: Option<&VolatileSlice<'_, ()>>) {
        if self.state != ConnState::Established || self.peer_shutdown & shutdown::SEND != 0 {
            if self.state == ConnState::Closing {
                // The host is gone; the guest has not seen our SHUTDOWN yet.
                return;
            }
            self.protocol_error("data outside an established stream");
            return;
        }
        let Some(data) = data else { return };
        VsockMetrics::add(&self.metrics.tx_bytes, data.len() as u64);
        let mut written = 0usize;
        if self.tx_buf.is_empty() {
            match (&self.stream).write_volatile(data) {
                Ok(n) => written = n,
                Err(e) if would_block(&e) => {}
                Err(e) => {
                    tracing::debug!(device = "vsock", local_port = self.local_port, error = %e, "host stream write failed; connection reset");
                    self.kill();
                    return;
                }
            }
            self.fwd_cnt = self.fwd_cnt.wrapping_add(written as u32);
        }
        if written < data.len() {
            let rest = match data.offset(written) {
                Ok(r) => r,
                Err(_) => return self.kill(),
            };
            if let Err(e) = self.tx_buf.push(&rest) {
                self.protocol_error(&e.to_string());
                return;
            }
        }
        self.maybe_credit_update();
    }

    fn guest_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & shutdown::BOTH;
        if self.peer_shutdown & shutdown::RCV != 0 {
            // The guest reads no more: host writers get EPIPE.
            let _ = self.stream.shutdown(Shutdown::Read);
            self.pending &= !pending::RW;
        }
        if self.peer_shutdown == shutdown::BOTH {
            if self.tx_buf.is_empty() {
                self.kill();
                return;
            }
            self.state = ConnState::Closing;
            self.deadline = Some(Instant::now() + SHUTDOWN_TIMEOUT);
        }
        if self.tx_buf.is_empty() {
            self.after_tx_drained();
        }
    }

    /// Fills one RX packet for the guest, if the connection owes one.
    /// Payload is read from the host stream straight into guest memory.
    pub fn recv_pkt(&mut self, pkt: &RxPacket<'_>) -> Option<Header> {
        let hdr = self.next_rx(pkt)?;
        // Every packet carries our fwd_cnt: no separate update is owed.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.pending &= !pending::CREDIT_UPDATE;
        VsockMetrics::add(&self.metrics.rx_packets, 1);
        if hdr.op == op::RST {
            VsockMetrics::add(&self.metrics.rst_sent, 1);
        }
        Some(hdr)
    }

    fn next_rx(&mut self, pkt: &RxPacket<'_>) -> Option<Header> {
        if self.pending & pending::RST != 0 {
            self.pending = 0;
            self.state = ConnState::Dead;
            return Some(self.header(op::RST));
        }
        if self.pending & pending::REQUEST != 0 {
            self.pending &= !pending::REQUEST;
            self.request_sent = true;
            return Some(self.header(op::REQUEST));
        }
        if self.pending & pending::RESPONSE != 0 {
            self.pending &= !pending::RESPONSE;
            self.state = ConnState::Established;
            return Some(self.header(op::RESPONSE));
        }
        if self.pending & pending::RW != 0 {
            if let Some(h) = self.read_host(pkt) {
                return Some(h);
            }
        }
        if self.pending & pending::SHUTDOWN != 0 {
            self.pending &= !pending::SHUTDOWN;
            self.local_shutdown |= self.shutdown_flags;
            let mut h = self.header(op::SHUTDOWN);
            h.flags = self.shutdown_flags;
            return Some(h);
        }
        if self.pending & pending::CREDIT_REQUEST != 0 {
            self.pending &= !pending::CREDIT_REQUEST;
            return Some(self.header(op::CREDIT_REQUEST));
        }
        if self.pending & pending::CREDIT_UPDATE != 0 {
            return Some(self.header(op::CREDIT_UPDATE));
        }
        None
    }

    /// The RW part of `next_rx`.
    fn read_host(&mut self, pkt: &RxPacket<'_>) -> Option<Header> {
        if !self.wants_read() {
            self.pending &= !pending::RW;
            return None;
        }
        let free = self.peer_free();
        if free == 0 {
            self.pending &= !pending::RW;
            if !self.credit_requested {
                self.credit_requested = true;
                return Some(self.header(op::CREDIT_REQUEST));
            }
            return None;
        }
        let cap = pkt
            .data_capacity()
            .min(free as usize)
            .min(MAX_PKT_BUF_SIZE as usize);
        if cap == 0 {
            // An RX buffer with no room for data: spend it on a credit update
            // so the guest's queue keeps moving; the data waits.
            return Some(self.header(op::CREDIT_UPDATE));
        }
        let mut buf = match pkt.data(cap) {
            Ok(b) => b,
            Err(_) => return Some(self.header(op::CREDIT_UPDATE)),
        };
        match (&self.stream).read_volatile(&mut buf) {
            Ok(0) => {
                self.host_eof = true;
                self.pending &= !pending::RW;
                if self.both_directions_done() {
                    self.kill();
                    return self.next_rx(pkt);
                }
                if self.host_hup && !self.host_write_closed {
                    // Not a half-close: the host end is gone.
                    self.host_gone();
                    return self.next_rx(pkt);
                }
                self.local_shutdown |= shutdown::SEND;
                let mut h = self.header(op::SHUTDOWN);
                h.flags = shutdown::SEND;
                Some(h)
            }
            Ok(n) => {
                // A short read drained the socket; otherwise stay scheduled,
                // there may be more (epoll reports anything newer).
                if n < cap {
                    self.pending &= !pending::RW;
                }
                self.rx_cnt = self.rx_cnt.wrapping_add(n as u32);
                VsockMetrics::add(&self.metrics.rx_bytes, n as u64);
                let mut h = self.header(op::RW);
                h.len = n as u32;
                Some(h)
            }
            Err(e) if would_block(&e) => {
                self.pending &= !pending::RW;
                None
            }
            Err(e) => {
                tracing::debug!(device = "vsock", local_port = self.local_port, error = %e, "host stream read failed; connection reset");
                self.kill();
                self.next_rx(pkt)
            }
        }
    }
}
