//! The vhost-user control connection to virtiofsd.
//!
//! Message sequence (one connection for the device's life; a driver reset
//! stops the vrings but keeps the connection, because virtiofsd exits when
//! its frontend disconnects):
//!
//! ```text
//! connect (retry ≤ CONNECT_TIMEOUT while the socket is missing/refusing)
//! GET_FEATURES → GET_PROTOCOL_FEATURES → SET_PROTOCOL_FEATURES(ours ∩ its)
//! → GET_QUEUE_NUM (if MQ) → SET_OWNER                         [Connection::connect]
//! SET_FEATURES → SET_MEM_TABLE(memfd regions + fds)
//! → per vring: SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE,
//!   SET_VRING_CALL(irqfd), SET_VRING_KICK(ioeventfd)
//! → SET_VRING_ENABLE(1) per vring                             [Connection::start]
//! SET_VRING_ENABLE(0) → GET_VRING_BASE (stops the vring) per vring
//!                                                      [Connection::stop_vrings]
//! → RESET_DEVICE (if negotiated)                              [Connection::stop]
//!
//! A snapshot stops the vrings without the reset (their bases are what it
//! saves) and starts them again from those bases; a VM restored from it
//! starts them on its new virtiofsd from the saved bases.
//! ```
//!
//! With REPLY_ACK every request asks for an acknowledgement, so a refusal is
//! an error at the step that caused it. Every reply is awaited for at most
//! [`BACKEND_REPLY_TIMEOUT`].

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::{FsError, BACKEND_REPLY_TIMEOUT, CONNECT_RETRY_INTERVAL, NUM_QUEUES};
use crate::devices::virtio::VIRTIO_F_VERSION_1;

/// VHOST_USER_F_PROTOCOL_FEATURES (feature bit 30).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

/// Protocol features we use when virtiofsd offers them. No CONFIG (the
/// VMM owns the config space), no LOG_SHMFD (no migration), no BACKEND_REQ
/// (no DAX window).
pub fn wanted_protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// One vring, validated against guest memory and translated to the
/// VMM's addresses (what SET_VRING_ADDR carries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VringSetup {
    /// Queue index.
    pub index: u16,
    /// Negotiated size.
    pub size: u16,
    /// Largest size.
    pub max_size: u16,
    /// Host virtual addresses of the descriptor table and the rings.
    pub desc_hva: u64,
    /// Available ring.
    pub avail_hva: u64,
    /// Used ring.
    pub used_hva: u64,
    /// Next available index the backend starts from.
    pub next_avail: u16,
}

/// An open, owned vhost-user session with virtiofsd.
pub struct Connection {
    frontend: Frontend,
    path: PathBuf,
    backend_features: u64,
    protocol_features: VhostUserProtocolFeatures,
}

fn connect_with_retry(path: &Path, timeout: Duration) -> Result<UnixStream, FsError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                let retriable = matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                );
                if !retriable || Instant::now() + CONNECT_RETRY_INTERVAL > deadline {
                    return Err(FsError::Connect {
                        path: path.to_path_buf(),
                        timeout,
                        source: e,
                    });
                }
                std::thread::sleep(CONNECT_RETRY_INTERVAL);
            }
        }
    }
}

impl Connection {
    /// Connects to `path` (retrying for at most `timeout`), negotiates the
    /// protocol features and becomes the backend's owner.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, FsError> {
        let stream = connect_with_retry(path, timeout)?;
        let setup = |e| FsError::SocketSetup(path.to_path_buf(), e);
        stream
            .set_read_timeout(Some(BACKEND_REPLY_TIMEOUT))
            .map_err(setup)?;
        stream
            .set_write_timeout(Some(BACKEND_REPLY_TIMEOUT))
            .map_err(setup)?;
        let mut c = Connection {
            frontend: Frontend::from_stream(stream, NUM_QUEUES as u64),
            path: path.to_path_buf(),
            backend_features: 0,
            protocol_features: VhostUserProtocolFeatures::empty(),
        };
        c.handshake()?;
        Ok(c)
    }

    fn err(&self, step: &'static str) -> impl FnOnce(vhost::Error) -> FsError + '_ {
        move |source| FsError::VhostUser {
            step,
            path: self.path.clone(),
            source,
        }
    }

    fn handshake(&mut self) -> Result<(), FsError> {
        self.backend_features = self
            .frontend
            .get_features()
            .map_err(self.err("GET_FEATURES"))?;
        if self.backend_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(FsError::BackendNotModern {
                path: self.path.clone(),
                features: self.backend_features,
            });
        }
        if self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0 {
            let offered = self
                .frontend
                .get_protocol_features()
                .map_err(self.err("GET_PROTOCOL_FEATURES"))?;
            let acked = offered & wanted_protocol_features();
            self.frontend
                .set_protocol_features(acked)
                .map_err(self.err("SET_PROTOCOL_FEATURES"))?;
            self.protocol_features = acked;
            if acked.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                self.frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if acked.contains(VhostUserProtocolFeatures::MQ) {
                let got = self
                    .frontend
                    .get_queue_num()
                    .map_err(self.err("GET_QUEUE_NUM"))?;
                if got < NUM_QUEUES as u64 {
                    return Err(FsError::QueueCount {
                        path: self.path.clone(),
                        got,
                        need: NUM_QUEUES,
                    });
                }
            }
        }
        self.frontend.set_owner().map_err(self.err("SET_OWNER"))
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Virtio features virtiofsd offers.
    pub fn backend_features(&self) -> u64 {
        self.backend_features
    }

    /// Protocol features both sides use.
    pub fn protocol_features(&self) -> VhostUserProtocolFeatures {
        self.protocol_features
    }

    fn has_protocol_features(&self) -> bool {
        self.backend_features & VHOST_USER_F_PROTOCOL_FEATURES != 0
    }

    /// Hands virtiofsd the driver's features, guest memory and vrings, and
    /// starts them. `call` is the device's irqfd; `kicks[i]` is queue i's
    /// ioeventfd.
    pub fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        acked_features: u64,
        vrings: &[VringSetup],
        call: &EventFd,
        kicks: &[EventFd],
    ) -> Result<(), FsError> {
        if acked_features & !self.backend_features != 0 {
            return Err(FsError::UnsupportedFeatures {
                path: self.path.clone(),
                acked: acked_features,
                backend: self.backend_features,
            });
        }
        let features = if self.has_protocol_features() {
            acked_features | VHOST_USER_F_PROTOCOL_FEATURES
        } else {
            acked_features
        };
        self.frontend
            .set_features(features)
            .map_err(self.err("SET_FEATURES"))?;
        let regions = memory_table(mem)?;
        self.frontend
            .set_mem_table(&regions)
            .map_err(self.err("SET_MEM_TABLE"))?;
        for v in vrings {
            let i = usize::from(v.index);
            let kick = kicks.get(i).ok_or(FsError::QueueEvents {
                got: kicks.len(),
                need: NUM_QUEUES,
            })?;
            self.frontend
                .set_vring_num(i, v.size)
                .map_err(self.err("SET_VRING_NUM"))?;
            let addr = VringConfigData {
                queue_max_size: v.max_size,
                queue_size: v.size,
                flags: 0,
                desc_table_addr: v.desc_hva,
                used_ring_addr: v.used_hva,
                avail_ring_addr: v.avail_hva,
                log_addr: None,
            };
            self.frontend
                .set_vring_addr(i, &addr)
                .map_err(self.err("SET_VRING_ADDR"))?;
            self.frontend
                .set_vring_base(i, v.next_avail)
                .map_err(self.err("SET_VRING_BASE"))?;
            self.frontend
                .set_vring_call(i, call)
                .map_err(self.err("SET_VRING_CALL"))?;
            self.frontend
                .set_vring_kick(i, kick)
                .map_err(self.err("SET_VRING_KICK"))?;
        }
        if self.has_protocol_features() {
            for v in vrings {
                self.frontend
                    .set_vring_enable(usize::from(v.index), true)
                    .map_err(self.err("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the first `queues` vrings (GET_VRING_BASE stops a vring in
    /// vhost-user) and returns where each stopped: the next available
    /// index the backend would have read.
    pub fn stop_vrings(&mut self, queues: usize) -> Result<Vec<u16>, FsError> {
        let mut bases = Vec::with_capacity(queues);
        for i in 0..queues {
            if self.has_protocol_features() {
                self.frontend
                    .set_vring_enable(i, false)
                    .map_err(self.err("SET_VRING_ENABLE"))?;
            }
            let base = self
                .frontend
                .get_vring_base(i)
                .map_err(self.err("GET_VRING_BASE"))?;
            // A split ring's index is 16 bits; the backend answers in a u32.
            bases.push(base as u16);
        }
        Ok(bases)
    }

    /// Stops the vrings and resets the backend's device state so the next
    /// driver starts afresh.
    pub fn stop(&mut self, queues: usize) -> Result<(), FsError> {
        self.stop_vrings(queues)?;
        if self
            .protocol_features
            .contains(VhostUserProtocolFeatures::RESET_DEVICE)
        {
            self.frontend
                .reset_device()
                .map_err(self.err("RESET_DEVICE"))?;
        }
        Ok(())
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        self.frontend.as_raw_fd()
    }
}

/// The SET_MEM_TABLE regions: every guest RAM region with the fd and
/// offset it is mapped from. Anonymous memory cannot be shared, and
/// neither can a private (copy-on-write) mapping of a file, such as a
/// snapshot's memory file: the backend would map the file and never see
/// the guest's writes. Both are refused.
pub fn memory_table(mem: &GuestMemoryMmap) -> Result<Vec<VhostUserMemoryRegionInfo>, FsError> {
    let n = mem.num_regions();
    if n > vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES {
        return Err(FsError::TooManyRegions(n));
    }
    mem.iter()
        .map(|r| {
            let not_shared = FsError::MemoryNotShared {
                addr: r.start_addr().0,
            };
            if r.flags() & libc::MAP_SHARED == 0 {
                return Err(not_shared);
            }
            VhostUserMemoryRegionInfo::from_guest_region(r).map_err(|_| not_shared)
        })
        .collect()
}
