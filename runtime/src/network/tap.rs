//! The taps that carry a pod interface's frames to and from the VM.
//!
//! Named `tap<N>_bx` (N = the pod interface's position in
//! [`super::PodNetwork::interfaces`]) so teardown and re-wiring can tell
//! them from the CNI's interfaces. They are not persistent: the kernel
//! removes a tap when its last fd closes, so a VMM that exits takes its taps
//! with it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

/// The tap behind one virtio-net device, as a backend takes it.
#[derive(Debug)]
pub enum TapDevice {
    /// An open tap fd (from the pod's netns); handed to the VMM process only.
    Fd(OwnedFd),
    /// A tap interface name in the VMM's network namespace.
    Name(String),
}

/// What every BoxLite tap name ends with.
pub const TAP_SUFFIX: &str = "_bx";
const TAP_PREFIX: &str = "tap";
/// IFNAMSIZ less the NUL.
const MAX_IFNAME_LEN: usize = 15;
/// `/dev/net/tun` flags: a tap (Ethernet frames), no packet-info prefix,
/// and the virtio-net header in front of every frame so the VMM can pass
/// checksum and segmentation offloads through. The header is 10 bytes until
/// the VMM sets its own size (TUNSETVNETHDRSZ); QEMU and the builtin VMM both
/// do.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// The name of the tap for the pod interface at `index`: `tap0_bx`, ...
pub fn tap_name(index: usize) -> String {
    format!("{TAP_PREFIX}{index}{TAP_SUFFIX}")
}

/// Whether `name` is one of ours (`tap<digits>_bx`).
pub fn is_tap_name(name: &str) -> bool {
    name.strip_prefix(TAP_PREFIX)
        .and_then(|rest| rest.strip_suffix(TAP_SUFFIX))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Creates the tap `name` in the calling thread's netns (the tun device
/// binds to the namespace of the thread that opens /dev/net/tun) and returns
/// its fd, the one the VMM will read and write frames on. Blocking mode: the
/// VMM sets O_NONBLOCK itself if it wants it.
pub fn create_tap(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() > MAX_IFNAME_LEN || name.contains('\0') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    set_iff(&tun, name)?;
    Ok(tun.into())
}

/// TUNSETIFF: attach `tun` to a new tap called `name`.
fn set_iff(tun: &File, name: &str) -> io::Result<()> {
    // SAFETY: ifreq is plain old data (a name array and a union of integers
    // and plain structs); all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a live,
    // properly sized and aligned local, and `tun` an open /dev/net/tun.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(tap_name(0), "tap0_bx");
        assert_eq!(tap_name(12), "tap12_bx");
        assert!(is_tap_name("tap0_bx"));
        assert!(is_tap_name(&tap_name(123)));
        for other in [
            "eth0", "tap_bx", "tapx_bx", "tap0", "tap0_bxx", "xtap0_bx", "lo",
        ] {
            assert!(!is_tap_name(other), "{other}");
        }
    }

    #[test]
    fn names_fit_ifnamsiz() {
        assert!(tap_name(999_999_999).len() <= MAX_IFNAME_LEN);
    }

    #[test]
    fn overlong_name_is_refused_before_any_syscall() {
        let err = create_tap("tap0123456789_bx").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
    }
}
