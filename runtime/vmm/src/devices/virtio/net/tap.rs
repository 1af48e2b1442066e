//! The tap backend: `/dev/net/tun` with `IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR`, vnet header size 12, non-blocking, offloads off until the
//! driver acks them.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::backend::NetBackend;
use super::{NetError, VNET_HDR_LEN};

/// Longest interface name (IFNAMSIZ - 1).
pub const MAX_TAP_NAME_LEN: usize = 15;

/// A tap device.
pub struct Tap {
    file: File,
    name: String,
}

/// `struct ifreq` with the name and the flags member of the union.
#[repr(C)]
#[derive(Clone, Copy)]
struct IfReqFlags {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Tap {
    /// Creates (or attaches to) the tap `name`.
    pub fn open(name: &str) -> Result<Self, NetError> {
        if name.is_empty() || name.len() > MAX_TAP_NAME_LEN || name.as_bytes().contains(&0) {
            return Err(NetError::BadTapName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = IfReqFlags {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes);
        // `req` is a live, correctly sized and aligned local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(NetError::SetIff(
                name.to_string(),
                io::Error::last_os_error(),
            ));
        }
        let tap = Tap {
            file,
            name: ifname(&req.name),
        };
        tap.configure()?;
        Ok(tap)
    }

    /// Takes ownership of an inherited tap fd (`tap_fd` in the config). It
    /// must be attached to a tap opened with IFF_NO_PI and IFF_VNET_HDR.
    pub fn from_fd(fd: RawFd) -> Result<Self, NetError> {
        // SAFETY: F_GETFD only reads the descriptor flags of `fd`.
        if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(NetError::BadFd(fd));
        }
        let mut req = IfReqFlags {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` into `req`, a live,
        // correctly sized local.
        let rc = unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) };
        if rc < 0 {
            return Err(NetError::NotATap(fd, io::Error::last_os_error()));
        }
        let flags = req.flags as u16 as u32;
        let need = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u32;
        if flags & need != need {
            return Err(NetError::TapFlags { fd, flags });
        }
        // SAFETY: the config hands this fd to the VMM to own; it is open
        // (F_GETFD succeeded) and not stdio, and nothing else in the VMM
        // wraps it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let tap = Tap {
            file: File::from(owned),
            name: ifname(&req.name),
        };
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        // SAFETY: as above.
        if fl < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) } < 0 {
            return Err(NetError::NonBlocking(io::Error::last_os_error()));
        }
        tap.configure()?;
        Ok(tap)
    }

    fn configure(&self) -> Result<(), NetError> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) };
        if rc < 0 {
            return Err(NetError::VnetHdrSize(io::Error::last_os_error()));
        }
        self.offload(0).map_err(|e| NetError::SetOffload(0, e))?;
        Ok(())
    }

    fn offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn ifname(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

impl NetBackend for Tap {
    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn send(&mut self, frame: &[u8]) -> io::Result<usize> {
        self.file.write(frame)
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload(flags)
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn bad_names_and_fds() {
        assert!(matches!(Tap::open(""), Err(NetError::BadTapName(_))));
        assert!(matches!(
            Tap::open("a-name-that-is-too-long"),
            Err(NetError::BadTapName(_))
        ));
        assert!(matches!(Tap::from_fd(1), Err(NetError::BadFd(1))));
        assert!(matches!(Tap::from_fd(99_999), Err(NetError::BadFd(_))));
        // An open fd that is not a tap (and stays ours: from_fd fails first).
        let f = File::open("/dev/null").expect("open");
        assert!(matches!(
            Tap::from_fd(f.as_raw_fd()),
            Err(NetError::NotATap(..))
        ));
        assert_eq!(ifname(b"tap0\0\0\0\0\0\0\0\0\0\0\0\0"), "tap0");
    }
}
