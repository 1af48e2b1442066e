//! Bringing `lo` up at start-up. This uses ioctls rather than rtnetlink
//! because it runs before the tokio runtime exists and needs nothing else.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum LinkUpError {
    #[error("interface name {0:?} is empty or longer than 15 bytes")]
    BadName(String),
    #[error("Failed to open a socket to configure {ifname}")]
    Socket {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to read the flags of {ifname}")]
    GetFlags {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to bring {ifname} up")]
    SetFlags {
        ifname: String,
        #[source]
        source: std::io::Error,
    },
}

/// Sets IFF_UP on `ifname` with the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls.
pub fn bring_up(ifname: &str) -> Result<(), LinkUpError> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(&0) {
        return Err(LinkUpError::BadName(ifname.to_string()));
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(LinkUpError::Socket {
            ifname: ifname.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just returned by socket(2) and is owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };

    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ifr is a valid, initialised ifreq with a NUL-terminated name
    // (the name is shorter than IFNAMSIZ); SIOCGIFFLAGS writes ifru_flags.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut ifr) } < 0 {
        return Err(LinkUpError::GetFlags {
            ifname: ifname.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: SIOCGIFFLAGS succeeded, so ifru_flags is the active union field.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    let up = libc::IFF_UP as libc::c_short;
    if flags & up != 0 {
        return Ok(());
    }
    ifr.ifr_ifru.ifru_flags = flags | up;
    // SAFETY: as above; SIOCSIFFLAGS only reads ifr.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &ifr) } < 0 {
        return Err(LinkUpError::SetFlags {
            ifname: ifname.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_names() {
        assert!(matches!(bring_up(""), Err(LinkUpError::BadName(_))));
        assert!(matches!(
            bring_up("a-very-long-interface"),
            Err(LinkUpError::BadName(_))
        ));
    }

    #[test]
    fn unknown_interface_is_named_in_the_error() {
        let e = bring_up("nosuchif0").unwrap_err();
        assert_eq!(e.to_string(), "Failed to read the flags of nosuchif0");
    }

    #[test]
    fn loopback_flags_are_readable() {
        // lo exists everywhere; when it is already up nothing changes and no
        // privilege is needed, otherwise only setting the flag may fail.
        match bring_up("lo") {
            Ok(()) | Err(LinkUpError::SetFlags { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
}
