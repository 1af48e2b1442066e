//! Device-level vsock tests: the test is the guest driver (real guest
//! memory, real split queues) and the host side is real unix sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::csm::ConnState;
use super::packet::{op, shutdown, Header, HEADER_SIZE, TYPE_STREAM};
use super::test_utils::{Rig, GUEST_BUF_ALLOC, GUEST_CID, RX_BUF};
use super::*;
use crate::devices::virtio::test_utils::{
    activate_ctx, guest_memory, test_interrupt, GUEST_MEM_SIZE,
};
use crate::devices::virtio::{VirtioDevice, VirtioError, INT_VRING, VIRTIO_F_VERSION_1};

const GUEST_PORT: u32 = 1024;

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn assert_eof(s: &mut UnixStream) {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected EOF, got {other:?}"),
    }
}

fn metric(r: &Rig<'_>, f: impl Fn(&VsockMetrics) -> &std::sync::atomic::AtomicU64) -> u64 {
    f(&r.dev.metrics).load(Ordering::Relaxed)
}

#[test]
fn config_space_features_and_queues() {
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(42, &dir.path().join("v.sock")).unwrap();
    assert_eq!(dev.device_type(), 19);
    assert_eq!(dev.avail_features(), VIRTIO_F_VERSION_1);
    assert_eq!(dev.queue_max_sizes(), &[QUEUE_SIZE; 3]);
    let mut cfg = [0xffu8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(u64::from_le_bytes(cfg), 42);
    let mut hi = [0xffu8; 4];
    dev.read_config(4, &mut hi);
    assert_eq!(hi, [0; 4]);
    dev.read_config(u64::MAX, &mut hi);
    assert_eq!(hi, [0; 4]);
    assert!(matches!(
        dev.write_config(0, &[1]),
        Err(VirtioError::ReadOnlyConfig { .. })
    ));
    assert!(matches!(
        dev.process_queue(3),
        Err(VirtioError::BadQueueIndex(3))
    ));
    // Inactive: queues do nothing.
    dev.process_queue(RXQ).unwrap();
    assert!(!dev.is_activated());
    assert!(matches!(
        Vsock::new(2, &dir.path().join("w.sock")),
        Err(VsockError::BadCid(2))
    ));
}

#[test]
fn activation_needs_rx_and_tx_queues() {
    let mem = guest_memory();
    let dir = tempfile::tempdir().unwrap();
    let mut dev = Vsock::new(GUEST_CID, &dir.path().join("v.sock")).unwrap();
    let q = crate::devices::virtio::test_utils::GuestQueue::new(&mem, 16, 0x1000);
    let mut unready = q.queue();
    virtio_queue::QueueT::set_ready(&mut unready, false);
    let irq = test_interrupt();
    let r = dev.activate(activate_ctx(
        &mem,
        vec![q.queue(), unready],
        &irq,
        VIRTIO_F_VERSION_1,
    ));
    assert!(matches!(r, Err(VirtioError::Activate(_))));
    assert!(!dev.is_activated());
}

#[test]
fn host_connect_handshake() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 4);
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!(p.hdr.op, op::REQUEST);
    assert_eq!(p.used_len as usize, HEADER_SIZE);
    assert_eq!(
        (p.hdr.src_cid, p.hdr.dst_cid, p.hdr.dst_port, p.hdr.type_),
        (HOST_CID, GUEST_CID, 1024, TYPE_STREAM)
    );
    assert!(p.hdr.src_port >= LOCAL_PORT_BASE);
    assert_eq!(p.hdr.buf_alloc, MAX_CONN_TX_BUF);
    assert_ne!(r.irq.status() & INT_VRING, 0, "guest interrupted");
    // No reply before the guest answers.
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).unwrap_err().kind(), ErrorKind::WouldBlock);
    let resp = r.hdr(op::RESPONSE, 1024, p.hdr.src_port);
    r.send(resp, &[]);
    s.set_nonblocking(false).unwrap();
    let line = read_exact_timeout(&mut s, format!("OK {}\n", p.hdr.src_port).len());
    assert_eq!(line, format!("OK {}\n", p.hdr.src_port).into_bytes());
    let key = (p.hdr.src_port, 1024);
    assert_eq!(
        r.dev.muxer().connection(key).unwrap().state(),
        ConnState::Established
    );
    // A second connection gets another local port.
    let (_s2, local2) = r.host_connect(1024);
    assert_ne!(local2, p.hdr.src_port);
    assert_eq!(metric(&r, |m| &m.conns_opened), 2);
}

#[test]
fn host_connect_answered_by_rst_closes_host_stream() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 4);
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONNECT 7777\n").unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!(p.hdr.op, op::REQUEST);
    let rst = r.hdr(op::RST, 7777, p.hdr.src_port);
    r.send(rst, &[]);
    assert_eof(&mut s);
    assert_eq!(r.dev.muxer().connection_count(), 0);
    // RST is never answered.
    r.expect_nothing();
}

#[test]
fn malformed_or_long_connect_lines_close_the_connection() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 4);
    let long = vec![b'C'; MAX_CONNECT_LINE];
    let cases: Vec<&[u8]> = vec![
        b"HELLO 1024\n",
        b"CONNECT abc\n",
        b"CONNECT 99999999999\n",
        b"CONNECT\n",
        &long,
    ];
    for line in cases {
        let mut s = UnixStream::connect(&r.uds).unwrap();
        s.write_all(line).unwrap();
        r.pump();
        assert_eof(&mut s);
    }
    // 31 bytes without a newline: still waiting.
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(&[b'x'; MAX_CONNECT_LINE - 1]).unwrap();
    r.pump();
    assert_eq!(r.dev.muxer().connection_count(), 1);
    // ... the 32nd byte ends it.
    s.write_all(b"x").unwrap();
    r.pump();
    assert_eof(&mut s);
    // The host hanging up mid-line is cleaned up too.
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONN").unwrap();
    r.pump();
    drop(s);
    r.pump();
    assert_eq!(r.dev.muxer().connection_count(), 0);
    r.expect_nothing();
    assert_eq!(metric(&r, |m| &m.conns_refused), 6);
}

#[test]
fn connect_line_timeout_and_unanswered_request() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 4);
    let mut silent = UnixStream::connect(&r.uds).unwrap();
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONNECT 5\n").unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!(p.hdr.op, op::REQUEST);
    r.dev
        .muxer_mut()
        .sweep(Instant::now() + CONNECT_TIMEOUT + Duration::from_secs(1));
    assert_eof(&mut silent);
    assert_eof(&mut s);
    // The guest saw the REQUEST, so it gets an RST to cancel it.
    let p = r.expect(1).remove(0);
    assert_eq!((p.hdr.op, p.hdr.dst_port), (op::RST, 5));
    assert_eq!(r.dev.muxer().connection_count(), 0);
}

#[test]
fn data_both_ways_on_host_initiated_stream() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let (mut s, local) = r.host_connect(GUEST_PORT);
    s.write_all(b"ping from host").unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!(p.hdr.op, op::RW);
    assert_eq!(p.data, b"ping from host");
    assert_eq!(p.used_len as usize, HEADER_SIZE + 14);
    assert_eq!((p.hdr.src_port, p.hdr.dst_port), (local, GUEST_PORT));

    let rw = r.hdr(op::RW, GUEST_PORT, local);
    r.send(rw, b"pong from guest");
    assert_eq!(read_exact_timeout(&mut s, 15), b"pong from guest");
    assert_eq!(metric(&r, |m| &m.tx_bytes), 15);
    assert_eq!(metric(&r, |m| &m.rx_bytes), 14);

    // Bytes the host sent right after the CONNECT line are not lost.
    let mut s2 = UnixStream::connect(&r.uds).unwrap();
    s2.write_all(b"CONNECT 2048\nearly bytes").unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!(p.hdr.op, op::REQUEST);
    let resp = r.hdr(op::RESPONSE, 2048, p.hdr.src_port);
    r.send(resp, &[]);
    let p = r.expect(1).remove(0);
    assert_eq!((p.hdr.op, p.data.as_slice()), (op::RW, &b"early bytes"[..]));
}

#[test]
fn large_transfer_is_split_into_rx_buffers() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 32);
    let (mut s, local) = r.host_connect(GUEST_PORT);
    let msg: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    s.write_all(&msg).unwrap();
    let mut got = Vec::new();
    let end = Instant::now() + Duration::from_secs(2);
    while got.len() < msg.len() && Instant::now() < end {
        r.pump();
        for p in r.inbox.drain(..) {
            assert_eq!(p.hdr.op, op::RW);
            assert!(p.data.len() <= RX_BUF as usize);
            got.extend_from_slice(&p.data);
        }
        // The guest consumes what it gets and says so.
        let mut cu = r.hdr(op::CREDIT_UPDATE, GUEST_PORT, local);
        cu.fwd_cnt = got.len() as u32;
        r.send(cu, &[]);
    }
    assert_eq!(got, msg);
}

#[test]
fn guest_connects_to_host_listener() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let listener = UnixListener::bind(r.port_path(5000)).unwrap();
    let mut s = r.guest_connect(&listener, 40_001, 5000);
    let rw = r.hdr(op::RW, 40_001, 5000);
    r.send(rw, b"hello host");
    assert_eq!(read_exact_timeout(&mut s, 10), b"hello host");
    s.write_all(b"hello guest").unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!(
        (p.hdr.op, p.hdr.src_port, p.hdr.dst_port),
        (op::RW, 5000, 40_001)
    );
    assert_eq!(p.data, b"hello guest");
}

/// Jailed, the VMM connects to the listeners of the allowed host ports at
/// start: the guest's first connection to such a port gets that
/// connection (made before the guest asked), a second one or one to any
/// other port gets RST, even with a listener there.
#[test]
fn preconnected_host_ports_serve_one_guest_connection_each() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let allowed = UnixListener::bind(r.port_path(5000)).unwrap();
    let other = UnixListener::bind(r.port_path(5001)).unwrap();
    other.set_nonblocking(true).unwrap();
    r.dev.preconnect(&[5000]).unwrap();
    // Connected already, before any guest packet.
    let (mut s, _) = allowed.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let req = r.hdr(op::REQUEST, 40_001, 5000);
    r.send(req, &[]);
    assert_eq!(r.expect(1)[0].hdr.op, op::RESPONSE);
    let rw = r.hdr(op::RW, 40_001, 5000);
    r.send(rw, b"ready");
    assert_eq!(read_exact_timeout(&mut s, 5), b"ready");
    for (guest_port, host_port) in [(40_002, 5000), (40_003, 5001)] {
        let req = r.hdr(op::REQUEST, guest_port, host_port);
        r.send(req, &[]);
        assert_eq!(r.expect(1)[0].hdr.op, op::RST, "port {host_port}");
    }
    assert!(other.accept().is_err(), "nothing connected to port 5001");
    assert_eq!(r.dev.muxer().connection_count(), 1);
}

#[test]
fn a_missing_preconnect_listener_fails_the_device_naming_it() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let err = r.dev.preconnect(&[1027]).unwrap_err().to_string();
    assert!(
        err.starts_with("Cannot connect to the listener of host port 1027 at")
            && err.contains("vsock.sock_1027"),
        "{err}"
    );
}

#[test]
fn guest_connect_without_listener_gets_rst() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 4);
    let req = r.hdr(op::REQUEST, 40_002, 5001);
    r.send(req, &[]);
    let p = r.expect(1).remove(0);
    assert_eq!(p.hdr.op, op::RST);
    assert_eq!(
        (p.hdr.src_cid, p.hdr.dst_cid, p.hdr.src_port, p.hdr.dst_port),
        (HOST_CID, GUEST_CID, 5001, 40_002)
    );
    // A listener socket file with nobody behind it: RST as well.
    drop(UnixListener::bind(r.port_path(5002)).unwrap());
    let req = r.hdr(op::REQUEST, 40_003, 5002);
    r.send(req, &[]);
    assert_eq!(r.expect(1)[0].hdr.op, op::RST);
    assert_eq!(r.dev.muxer().connection_count(), 0);
}

#[test]
fn packets_for_unknown_connections_get_rst() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    for o in [
        op::RW,
        op::SHUTDOWN,
        op::CREDIT_UPDATE,
        op::CREDIT_REQUEST,
        op::RESPONSE,
    ] {
        let h = r.hdr(o, 1, 2);
        r.send(h, if o == op::RW { b"x" } else { b"" });
        let p = r.expect(1).remove(0);
        assert_eq!((p.hdr.op, p.hdr.src_port, p.hdr.dst_port), (op::RST, 2, 1));
    }
    let h = r.hdr(op::RST, 1, 2);
    r.send(h, &[]);
    r.expect_nothing();
}

#[test]
fn guest_credit_limits_host_to_guest_data() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 32);
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let p = r.expect(1).remove(0);
    let local = p.hdr.src_port;
    // The guest has only 8 KiB of buffer for this stream.
    let mut resp = r.hdr(op::RESPONSE, GUEST_PORT, local);
    resp.buf_alloc = 8192;
    r.send(resp, &[]);
    read_exact_timeout(&mut s, format!("OK {local}\n").len());
    s.write_all(&vec![7u8; 64 * 1024]).unwrap();

    let mut data = 0;
    let mut credit_requests = 0;
    for _ in 0..20 {
        r.pump();
        for p in r.inbox.drain(..) {
            match p.hdr.op {
                op::RW => data += p.data.len(),
                op::CREDIT_REQUEST => credit_requests += 1,
                o => panic!("unexpected op {o}"),
            }
        }
    }
    assert_eq!(data, 8192, "exactly the guest's credit was sent");
    assert_eq!(credit_requests, 1, "one credit request while blocked");
    let conn = r.dev.muxer().connection((local, GUEST_PORT)).unwrap();
    assert_eq!(conn.peer_free(), 0);
    assert!(conn.interest().is_empty(), "host stream not polled");

    // The guest read 4 KiB: exactly 4 KiB more flows.
    let mut cu = r.hdr(op::CREDIT_UPDATE, GUEST_PORT, local);
    cu.buf_alloc = 8192;
    cu.fwd_cnt = 4096;
    r.send(cu, &[]);
    let mut more = 0;
    for _ in 0..20 {
        r.pump();
        for p in r.inbox.drain(..) {
            if p.hdr.op == op::RW {
                more += p.data.len();
            }
        }
    }
    assert_eq!(more, 4096);
    assert_eq!(metric(&r, |m| &m.rx_bytes), 8192 + 4096);
}

#[test]
fn stalled_guest_stops_the_vmm_reading_the_host_socket() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 32);
    let (mut s, local) = r.host_connect(GUEST_PORT);
    // The guest stops giving RX buffers: keep what it has, post no more.
    r.auto_rx = false;
    s.set_nonblocking(true).unwrap();
    let chunk = vec![1u8; 16 * 1024];
    let mut written = 0usize;
    let mut blocked = false;
    for _ in 0..1000 {
        match s.write(&chunk) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                // Let the VMM run; if it still read, we could write more.
                r.pump();
                match s.write(&chunk) {
                    Ok(n) => written += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        blocked = true;
                        break;
                    }
                    Err(e) => panic!("{e}"),
                }
            }
            Err(e) => panic!("{e}"),
        }
        r.pump();
    }
    assert!(
        blocked,
        "host writer must block once the guest stops reading"
    );
    let delivered = metric(&r, |m| &m.rx_bytes) as usize;
    // At most the guest's credit reached the guest; the rest stays in the
    // host socket (not in the VMM).
    assert_eq!(delivered, GUEST_BUF_ALLOC as usize);
    assert!(written > delivered);
    assert!(r.rx_posted() > 0, "limited by credit, not by RX buffers");
    let conn = r.dev.muxer().connection((local, GUEST_PORT)).unwrap();
    assert_eq!(conn.tx_buffered(), 0);
    assert!(!conn.interest().contains(vmm_sys_util::epoll::EventSet::IN));
    // Pumping more changes nothing (and does not spin).
    let before = metric(&r, |m| &m.rx_packets);
    for _ in 0..10 {
        r.pump();
    }
    assert_eq!(metric(&r, |m| &m.rx_packets), before);
}

#[test]
fn slow_host_reader_bounds_vmm_buffering() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 16);
    let listener = UnixListener::bind(r.port_path(6000)).unwrap();
    let s = r.guest_connect(&listener, 50_000, 6000);
    let total: usize = 1536 * 1024;
    let reader = std::thread::spawn(move || {
        let mut s = s;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // A slow start: the VMM must buffer, within bounds.
        std::thread::sleep(Duration::from_millis(200));
        let mut got = Vec::with_capacity(total);
        let mut buf = vec![0u8; 8192];
        while got.len() < total {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "EOF after {}", got.len());
            got.extend_from_slice(&buf[..n]);
            std::thread::sleep(Duration::from_micros(50));
        }
        got
    });
    let msg: Vec<u8> = (0..total).map(|i| (i * 7 % 253) as u8).collect();
    // A well-behaved guest: never more than the device's credit in flight.
    let mut sent = 0usize;
    let mut peer_fwd: u32 = 0;
    let mut peer_alloc: u32 = MAX_CONN_TX_BUF;
    let mut max_buffered = 0;
    let end = Instant::now() + Duration::from_secs(20);
    while sent < total {
        assert!(Instant::now() < end, "stalled at {sent}");
        let in_flight = (sent as u32).wrapping_sub(peer_fwd);
        let credit = peer_alloc.saturating_sub(in_flight) as usize;
        let n = credit.min(64 * 1024).min(total - sent);
        if n > 0 {
            let rw = r.hdr(op::RW, 50_000, 6000);
            r.send(rw, &msg[sent..sent + n]);
            sent += n;
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
        r.pump();
        for p in r.inbox.drain(..) {
            assert_ne!(p.hdr.op, op::RST, "compliant guest reset");
            peer_fwd = p.hdr.fwd_cnt;
            peer_alloc = p.hdr.buf_alloc;
        }
        let b = r
            .dev
            .muxer()
            .connection((6000, 50_000))
            .unwrap()
            .tx_buffered();
        max_buffered = max_buffered.max(b);
    }
    while r
        .dev
        .muxer()
        .connection((6000, 50_000))
        .unwrap()
        .tx_buffered()
        > 0
    {
        assert!(Instant::now() < end);
        r.pump();
        std::thread::sleep(Duration::from_millis(1));
    }
    let got = reader.join().unwrap();
    assert!(got == msg, "data corrupted");
    assert!(max_buffered > 0, "the slow reader made the VMM buffer");
    assert!(max_buffered <= MAX_CONN_TX_BUF as usize, "{max_buffered}");
}

#[test]
fn guest_exceeding_its_credit_is_reset() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 16);
    let listener = UnixListener::bind(r.port_path(6001)).unwrap();
    let mut s = r.guest_connect(&listener, 50_001, 6001);
    // The host never reads: socket buffer, then VMM buffer, then RST.
    let chunk = vec![9u8; 64 * 1024];
    let mut reset = false;
    for _ in 0..64 {
        let rw = r.hdr(op::RW, 50_001, 6001);
        r.send(rw, &chunk);
        if let Some(c) = r.dev.muxer().connection((6001, 50_001)) {
            assert!(c.tx_buffered() <= MAX_CONN_TX_BUF as usize);
        }
        r.pump();
        if r.inbox.iter().any(|p| p.hdr.op == op::RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "a guest ignoring credit gets RST");
    assert_eq!(r.dev.muxer().connection_count(), 0);
    assert_eq!(metric(&r, |m| &m.protocol_errors), 1);
    // The host stream is closed (after whatever was delivered).
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn credit_update_after_host_drains() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 16);
    let listener = UnixListener::bind(r.port_path(6002)).unwrap();
    let mut s = r.guest_connect(&listener, 50_002, 6002);
    // More than the update threshold, written straight through.
    let chunk = vec![3u8; 64 * 1024];
    for _ in 0..2 {
        let rw = r.hdr(op::RW, 50_002, 6002);
        r.send(rw, &chunk);
    }
    // One update per threshold's worth of forwarded bytes.
    let p = r.expect(2);
    assert_eq!(
        (p[0].hdr.op, p[0].hdr.fwd_cnt),
        (op::CREDIT_UPDATE, 64 * 1024)
    );
    assert_eq!(
        (p[1].hdr.op, p[1].hdr.fwd_cnt),
        (op::CREDIT_UPDATE, 128 * 1024)
    );
    assert_eq!(
        read_exact_timeout(&mut s, 128 * 1024),
        vec![3u8; 128 * 1024]
    );
    // An explicit credit request is answered.
    let cr = r.hdr(op::CREDIT_REQUEST, 50_002, 6002);
    r.send(cr, &[]);
    let p = r.expect(1).remove(0);
    assert_eq!((p.hdr.op, p.hdr.fwd_cnt), (op::CREDIT_UPDATE, 128 * 1024));
}

#[test]
fn guest_reset_mid_stream_closes_host_stream() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let (mut s, local) = r.host_connect(GUEST_PORT);
    s.write_all(b"some data").unwrap();
    assert_eq!(r.expect(1)[0].hdr.op, op::RW);
    let rst = r.hdr(op::RST, GUEST_PORT, local);
    r.send(rst, &[]);
    assert_eof(&mut s);
    assert_eq!(r.dev.muxer().connection_count(), 0);
    assert_eq!(metric(&r, |m| &m.conns_closed), 1);
    // Later packets for it get RST.
    let rw = r.hdr(op::RW, GUEST_PORT, local);
    r.send(rw, b"late");
    assert_eq!(r.expect(1)[0].hdr.op, op::RST);
}

#[test]
fn host_close_mid_stream_resets_guest() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let (mut s, local) = r.host_connect(GUEST_PORT);
    s.write_all(b"last words").unwrap();
    drop(s);
    let pkts = r.expect(2);
    assert_eq!(
        (pkts[0].hdr.op, pkts[0].data.as_slice()),
        (op::RW, &b"last words"[..])
    );
    assert_eq!(pkts[1].hdr.op, op::SHUTDOWN);
    assert_eq!(pkts[1].hdr.flags, shutdown::BOTH);
    // The guest answers RST as Linux does.
    let rst = r.hdr(op::RST, GUEST_PORT, local);
    r.send(rst, &[]);
    assert_eq!(r.dev.muxer().connection_count(), 0);

    // A guest that never answers is reset after the timeout.
    let (s, local) = r.host_connect(GUEST_PORT);
    drop(s);
    let p = r.expect(1).remove(0);
    assert_eq!((p.hdr.op, p.hdr.flags), (op::SHUTDOWN, shutdown::BOTH));
    r.dev
        .muxer_mut()
        .sweep(Instant::now() + SHUTDOWN_TIMEOUT + Duration::from_secs(1));
    let p = r.expect(1).remove(0);
    assert_eq!((p.hdr.op, p.hdr.src_port), (op::RST, local));
    assert_eq!(r.dev.muxer().connection_count(), 0);
}

#[test]
fn host_write_to_closed_stream_resets_guest() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let listener = UnixListener::bind(r.port_path(6003)).unwrap();
    let s = r.guest_connect(&listener, 50_003, 6003);
    // Guest credit exhausted-free case: the host hangs up; the guest is told.
    drop(s);
    let p = r.expect(1).remove(0);
    assert_eq!((p.hdr.op, p.hdr.flags), (op::SHUTDOWN, shutdown::BOTH));
    // Data the guest sends meanwhile is dropped, then its full shutdown is
    // answered with RST.
    let rw = r.hdr(op::RW, 50_003, 6003);
    r.send(rw, b"into the void");
    let mut sd = r.hdr(op::SHUTDOWN, 50_003, 6003);
    sd.flags = shutdown::BOTH;
    r.send(sd, &[]);
    let p = r.expect(1).remove(0);
    assert_eq!(p.hdr.op, op::RST);
    assert_eq!(r.dev.muxer().connection_count(), 0);
}

#[test]
fn half_close_both_ways() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let listener = UnixListener::bind(r.port_path(6004)).unwrap();
    let mut s = r.guest_connect(&listener, 50_004, 6004);
    // Guest: "no more sending" → host reads EOF, can still write.
    let rw = r.hdr(op::RW, 50_004, 6004);
    r.send(rw, b"request");
    let mut sd = r.hdr(op::SHUTDOWN, 50_004, 6004);
    sd.flags = shutdown::SEND;
    r.send(sd, &[]);
    assert_eq!(read_exact_timeout(&mut s, 7), b"request");
    assert_eof(&mut s);
    s.write_all(b"reply").unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!((p.hdr.op, p.data.as_slice()), (op::RW, &b"reply"[..]));
    // Host: half-close too → both directions done → RST, removed.
    s.shutdown(Shutdown::Write).unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!(p.hdr.op, op::RST);
    assert_eq!(r.dev.muxer().connection_count(), 0);

    // Host half-close first: the guest gets SHUTDOWN(SEND) and may still send.
    let (mut s, local) = r.host_connect(GUEST_PORT);
    s.shutdown(Shutdown::Write).unwrap();
    let p = r.expect(1).remove(0);
    assert_eq!((p.hdr.op, p.hdr.flags), (op::SHUTDOWN, shutdown::SEND));
    let rw = r.hdr(op::RW, GUEST_PORT, local);
    r.send(rw, b"still here");
    assert_eq!(read_exact_timeout(&mut s, 10), b"still here");
    // Guest closes: RST.
    let mut sd = r.hdr(op::SHUTDOWN, GUEST_PORT, local);
    sd.flags = shutdown::BOTH;
    r.send(sd, &[]);
    assert_eq!(r.expect(1)[0].hdr.op, op::RST);
    assert_eof(&mut s);
    assert_eq!(r.dev.muxer().connection_count(), 0);
}

#[test]
fn wrong_cids_type_and_ops() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let listener = UnixListener::bind(r.port_path(6005)).unwrap();
    // Spoofed source CID: dropped without an answer.
    let mut h = r.hdr(op::REQUEST, 1, 6005);
    h.src_cid = 4;
    r.send(h, &[]);
    r.expect_nothing();
    assert_eq!(metric(&r, |m| &m.dropped_packets), 1);
    // Another destination CID: RST from that CID.
    let mut h = r.hdr(op::REQUEST, 1, 6005);
    h.dst_cid = 7;
    r.send(h, &[]);
    let p = r.expect(1).remove(0);
    assert_eq!(
        (p.hdr.op, p.hdr.src_cid, p.hdr.dst_cid),
        (op::RST, 7, GUEST_CID)
    );
    // SEQPACKET (not offered): RST.
    let mut h = r.hdr(op::REQUEST, 1, 6005);
    h.type_ = 2;
    r.send(h, &[]);
    assert_eq!(r.expect(1)[0].hdr.op, op::RST);
    // Unknown op, no connection: RST.
    let h = r.hdr(99, 1, 6005);
    r.send(h, &[]);
    assert_eq!(r.expect(1)[0].hdr.op, op::RST);
    assert_eq!(r.dev.muxer().connection_count(), 0);

    // On an established stream, an unknown op or a second REQUEST resets it.
    let _s = r.guest_connect(&listener, 2, 6005);
    let h = r.hdr(op::INVALID, 2, 6005);
    r.send(h, &[]);
    assert_eq!(r.expect(1)[0].hdr.op, op::RST);
    assert_eq!(r.dev.muxer().connection_count(), 0);
    let _s = r.guest_connect(&listener, 3, 6005);
    let h = r.hdr(op::REQUEST, 3, 6005);
    r.send(h, &[]);
    assert_eq!(r.expect(1)[0].hdr.op, op::RST);
    // Data before the RESPONSE of a host-initiated stream resets it too.
    let mut s = UnixStream::connect(&r.uds).unwrap();
    s.write_all(b"CONNECT 9\n").unwrap();
    let p = r.expect(1).remove(0);
    let rw = r.hdr(op::RW, 9, p.hdr.src_port);
    r.send(rw, b"too early");
    assert_eq!(r.expect(1)[0].hdr.op, op::RST);
    assert_eof(&mut s);
    assert_eq!(metric(&r, |m| &m.protocol_errors), 3);
}

#[test]
fn hostile_tx_chains_fail_alone() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let listener = UnixListener::bind(r.port_path(6006)).unwrap();
    let hdr_at = 0x3f_0000u64;
    let data_at = 0x3f_1000u64;
    let put = |h: Header| {
        mem.write_slice(&h.to_bytes(), vm_memory::GuestAddress(hdr_at))
            .unwrap()
    };
    use vm_memory::Bytes;
    let good = r.hdr(op::REQUEST, 77, 6006);

    // Header descriptor write-only.
    put(good);
    r.send_raw(&[(hdr_at, 44, crate::devices::virtio::test_utils::F_WRITE)]);
    // Header descriptor shorter than a header.
    r.send_raw(&[(hdr_at, 20, 0)]);
    // Header outside guest memory, and overflowing the address space.
    r.send_raw(&[(GUEST_MEM_SIZE - 8, 44, 0)]);
    r.send_raw(&[(u64::MAX - 10, 44, 0)]);
    // len above the protocol maximum.
    let mut h = r.hdr(op::RW, 77, 6006);
    h.len = MAX_PKT_BUF_SIZE + 1;
    put(h);
    r.send_raw(&[(hdr_at, 44, 0), (data_at, MAX_PKT_BUF_SIZE + 1, 0)]);
    // len larger than the data buffer.
    h.len = 4096;
    put(h);
    r.send_raw(&[(hdr_at, 44, 0), (data_at, 100, 0)]);
    // len > 0 but no data descriptor.
    r.send_raw(&[(hdr_at, 44, 0)]);
    // Data descriptor write-only.
    h.len = 16;
    put(h);
    r.send_raw(&[
        (hdr_at, 44, 0),
        (data_at, 16, crate::devices::virtio::test_utils::F_WRITE),
    ]);
    // Data outside guest memory.
    r.send_raw(&[(hdr_at, 44, 0), (GUEST_MEM_SIZE - 4, 16, 0)]);
    assert_eq!(metric(&r, |m| &m.bad_chains), 9);
    r.expect_nothing();

    // The queue still works.
    let mut s = r.guest_connect(&listener, 77, 6006);
    let rw = r.hdr(op::RW, 77, 6006);
    r.send(rw, b"fine");
    assert_eq!(read_exact_timeout(&mut s, 4), b"fine");
    assert!(!r.irq.needs_reset());
}

#[test]
fn hostile_rx_chains_fail_alone() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 0);
    // Three bad RX chains, then good ones.
    use crate::devices::virtio::test_utils::{F_NEXT, F_WRITE};
    r.rxq.write_desc(40, 0x3e_0000, 44, F_NEXT, 41); // read-only header
    r.rxq.write_desc(41, 0x3e_1000, 4096, F_WRITE, 0);
    r.rxq.publish(40);
    r.rxq.write_desc(42, 0x3e_0000, 10, F_WRITE | F_NEXT, 43); // short header
    r.rxq.write_desc(43, 0x3e_1000, 4096, F_WRITE, 0);
    r.rxq.publish(42);
    r.rxq.write_desc(44, GUEST_MEM_SIZE - 4, 44, F_WRITE, 0); // outside memory
    r.rxq.publish(44);
    r.post_rx(4);
    let req = r.hdr(op::REQUEST, 1, 9999);
    r.send(req, &[]);
    r.pump();
    let lens: Vec<u32> = r.inbox.iter().map(|p| p.used_len).collect();
    assert_eq!(&lens[..3], &[0, 0, 0], "{:?}", r.inbox);
    assert_eq!(r.inbox[3].hdr.op, op::RST);
    assert_eq!(metric(&r, |m| &m.bad_chains), 3);
    assert!(!r.irq.needs_reset());
}

#[test]
fn avail_index_too_far_ahead_is_a_device_error() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 0);
    r.txq.set_avail_idx(200);
    assert!(matches!(
        r.dev.process_queue(TXQ),
        Err(VirtioError::Queue(_))
    ));
}

#[test]
fn raw_rst_backlog_throttles_tx() {
    let mem = guest_memory();
    // No RX buffers: RSTs pile up until the TX queue is held back.
    let mut r = Rig::new(&mem, 0);
    r.auto_rx = false;
    for i in 0..MAX_RAW_RX_QUEUE as u32 {
        let h = r.hdr(op::RW, i, 1);
        r.send(h, b"x");
    }
    assert!(r.dev.muxer().tx_throttled());
    // The next chain stays in the TX queue.
    let used = r.txq.used_idx();
    let h = r.hdr(op::RW, 9999, 1);
    r.send(h, b"x");
    assert_eq!(r.txq.used_idx(), used, "chain held back");
    // The guest drains RX: the held TX chain is processed too.
    r.auto_rx = true;
    r.post_rx(32);
    for _ in 0..20 {
        r.pump();
    }
    assert!(!r.dev.muxer().tx_throttled());
    assert_eq!(r.inbox.len(), MAX_RAW_RX_QUEUE + 1);
    assert!(r.inbox.iter().all(|p| p.hdr.op == op::RST));
}

#[test]
fn reset_closes_every_connection() {
    let mem = guest_memory();
    let mut r = Rig::new(&mem, 8);
    let (mut a, _) = r.host_connect(1);
    let listener = UnixListener::bind(r.port_path(6007)).unwrap();
    let mut b = r.guest_connect(&listener, 2, 6007);
    let mut c = UnixStream::connect(&r.uds).unwrap();
    c.write_all(b"CONN").unwrap();
    r.pump();
    assert_eq!(r.dev.muxer().connection_count(), 3);
    r.dev.reset();
    assert!(!r.dev.is_activated());
    assert_eq!(r.dev.muxer().connection_count(), 0);
    assert_eof(&mut a);
    assert_eof(&mut b);
    assert_eof(&mut c);
    // The listener survives a reset.
    UnixStream::connect(&r.uds).unwrap();
}

#[test]
fn event_loop_drives_the_backend() {
    let mem = guest_memory();
    let r = Rig::new(&mem, 4);
    let uds = r.uds.clone();
    let Rig { dev, rxq, .. } = r;
    let dev = Arc::new(Mutex::new(dev));
    let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().unwrap();
    em.add_subscriber(Arc::new(Mutex::new(VsockEventHandler::new(dev.clone()))));
    let mut s = UnixStream::connect(&uds).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let end = Instant::now() + Duration::from_secs(2);
    while rxq.used_idx() == 0 && Instant::now() < end {
        em.run_with_timeout(50).unwrap();
    }
    assert_eq!(
        rxq.used_idx(),
        1,
        "REQUEST delivered through the event loop"
    );
    // Idle: the loop does not spin on the backend fd.
    let n = em.run_with_timeout(50).unwrap();
    assert_eq!(n, 0, "no events while idle");
    drop(s);
}

#[test]
fn a_restored_vsock_keeps_its_ring_positions_and_resets_the_guests_connections() {
    use super::test_utils::{activate_on, guest_queues, TempDir};
    use crate::devices::virtio::test_utils::F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    const EVENT_BUF: u64 = 0x9000;
    let mem = guest_memory();
    let queues = guest_queues(&mem);
    let irq = test_interrupt();
    let dir = TempDir::new();
    let uds = dir.path().join("vsock.sock");
    let mut dev = Vsock::new(GUEST_CID, &uds).unwrap();
    activate_on(&mut dev, &mem, &queues, &irq).unwrap();
    let [rxq, txq, mut evq] = queues;
    let mut rig = Rig::with_device(dev, &mem, [rxq, txq], irq, dir, uds, 4);
    // A connection moves both rings on; it is what the snapshot freezes.
    let (_host, _) = rig.host_connect(GUEST_PORT);
    let snap = rig.dev.save_state().unwrap();
    assert!(snap.activated);
    assert_eq!(snap.queues.len(), 3, "RX, TX and event queues");
    assert!(snap.queues[RXQ as usize].next_used > 0, "{snap:?}");
    assert!(snap.queues[TXQ as usize].next_avail > 0, "{snap:?}");

    // The driver's event buffer, with bytes the event must overwrite.
    mem.write_obj(0xdead_beef_u32, GuestAddress(EVENT_BUF))
        .unwrap();
    evq.write_desc(0, EVENT_BUF, 8, F_WRITE, 0);
    evq.publish(0);

    // Another device, on another CID and socket, restored from the state.
    let dir_b = TempDir::new();
    let mut b = Vsock::new(GUEST_CID + 1, &dir_b.path().join("vsock.sock")).unwrap();
    let irq_b = test_interrupt();
    let ctx = activate_ctx(
        &mem,
        vec![rig.rxq.queue(), rig.txq.queue(), evq.queue()],
        &irq_b,
        VIRTIO_F_VERSION_1,
    );
    b.restore_state(&snap, Some(ctx)).unwrap();
    assert!(b.is_activated());
    assert_eq!(b.save_state().unwrap(), snap, "positions kept");
    assert_eq!(
        evq.used_idx(),
        0,
        "nothing reaches the guest before it runs"
    );
    assert_eq!(irq_b.status(), 0);

    b.wake_after_restore().unwrap();
    assert_eq!(evq.used_idx(), 1);
    assert_eq!(evq.used_elem(0), (0, 4), "the event is one le32");
    assert_eq!(
        mem.read_obj::<u32>(GuestAddress(EVENT_BUF)).unwrap(),
        0,
        "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert_ne!(irq_b.status() & INT_VRING, 0, "the driver is told");
    // Until the driver has handled the reset, nothing goes to the guest:
    // a host connection made now waits (it would be reset with the
    // frozen ones otherwise).
    let mut host =
        std::os::unix::net::UnixStream::connect(dir_b.path().join("vsock.sock")).unwrap();
    host.write_all(b"CONNECT 1024\n").unwrap();
    let used_rx = rig.rxq.used_idx();
    for _ in 0..50 {
        b.process_backend();
        std::thread::sleep(Duration::from_millis(2));
    }
    b.process_queue(RXQ).unwrap();
    // A notification of the event queue without a new buffer (the restore
    // kicks every queue once) does not count as the reset being handled.
    b.process_queue(EVQ).unwrap();
    assert_eq!(
        rig.rxq.used_idx(),
        used_rx,
        "RX held while the reset is pending"
    );
    // The driver re-posts its event buffer: the REQUEST goes.
    evq.publish(0);
    b.process_queue(EVQ).unwrap();
    assert_eq!(
        rig.rxq.used_idx(),
        used_rx.wrapping_add(1),
        "the held REQUEST is delivered once the reset is handled"
    );
    // The config space carries the new CID, which the driver re-reads.
    let mut cid = [0u8; 8];
    b.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID + 1);
}
