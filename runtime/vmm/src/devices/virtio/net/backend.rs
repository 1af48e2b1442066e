//! Where virtio-net frames go: a tap in production ([`super::Tap`]), a
//! unix datagram socket in tests. Every frame crossing a backend starts
//! with the 12-byte virtio-net header; one `send`/`recv` is one frame.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;

/// A frame-preserving, non-blocking packet endpoint.
pub trait NetBackend: Send {
    /// The fd the event loop polls for readability.
    fn raw_fd(&self) -> RawFd;
    /// Writes one frame (header included).
    fn send(&mut self, frame: &[u8]) -> io::Result<usize>;
    /// Reads one frame (header included) into `buf`; `WouldBlock` when
    /// none is waiting. A frame larger than `buf` may be truncated: the
    /// caller passes a buffer one byte larger than the largest legal frame.
    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Applies the tap offload flags ([`super::tap_offload_flags`]).
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;
}

/// A unix `SOCK_DGRAM` socket as backend: the peer sees each guest frame
/// as one datagram and each datagram it sends becomes one guest frame.
pub struct UnixDgramBackend {
    sock: UnixDatagram,
    offload: u32,
}

impl UnixDgramBackend {
    /// Wraps one end of a datagram socket pair (made non-blocking).
    pub fn new(sock: UnixDatagram) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(UnixDgramBackend { sock, offload: 0 })
    }

    /// A connected pair: the backend and the peer end.
    pub fn pair() -> io::Result<(Self, UnixDatagram)> {
        let (a, b) = UnixDatagram::pair()?;
        Ok((Self::new(a)?, b))
    }

    /// The offload flags last applied.
    pub fn offload(&self) -> u32 {
        self.offload
    }
}

impl NetBackend for UnixDgramBackend {
    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.sock.send(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload = flags;
        Ok(())
    }
}
