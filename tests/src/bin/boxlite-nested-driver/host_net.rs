//! The `net` scenario's host side: a tap in the test host (made the way the
//! runtime makes a pod's tap) with an IPv4 address, its fd handed to
//! boxlite-vmm like the builtin backend hands it.
//!
//! The test host's initramfs has no `ip`: the address and link state are
//! set with the classic SIOCSIF* ioctls on an AF_INET socket.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A tap created in the test host, not yet handed to a VMM.
pub struct HostTap {
    fd: OwnedFd,
}

impl HostTap {
    /// Creates tap `name` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), gives it
    /// `addr/prefix_len` and brings it up.
    pub fn create(name: &str, addr: Ipv4Addr, prefix_len: u8) -> io::Result<HostTap> {
        let fd = boxlite_runtime::network::create_tap(name)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot create tap {name}: {e}")))?;
        configure_ipv4(name, addr, prefix_len)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot configure {name}: {e}")))?;
        Ok(HostTap { fd })
    }

    /// The fd number for the VMM config, made inheritable: the VMM gets it
    /// at the same number. Keep `self` alive until the VMM has started.
    pub fn inheritable_fd(&self) -> io::Result<RawFd> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_SETFD on an fd this value owns; no pointers.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

fn ifreq_for(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // both are plain old data; this is how SIOCSIFADDR takes an address.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl_ifreq(sock: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every SIOC[GS]IF* request used here reads (and for G, writes)
    // one `struct ifreq`; `req` is a live, properly sized local.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `addr/prefix_len` on `name` and brings it up.
fn configure_ipv4(name: &str, addr: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    // SAFETY: socket(2) takes no pointers; the fd is owned right away.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
    ioctl_ifreq(&sock, libc::SIOCSIFADDR, &mut req)?;

    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix_len))
        .unwrap_or(0);
    let mut req = ifreq_for(name);
    req.ifr_ifru.ifru_netmask = sockaddr_v4(Ipv4Addr::from(mask));
    ioctl_ifreq(&sock, libc::SIOCSIFNETMASK, &mut req)?;

    let mut req = ifreq_for(name);
    ioctl_ifreq(&sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS just filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl_ifreq(&sock, libc::SIOCSIFFLAGS, &mut req)
}
