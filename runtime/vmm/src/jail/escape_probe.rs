//! The `escape` test hook: from inside the finished jail, try one way out
//! and report whether it was denied. The jail's tests run it for every
//! probe on both thread kinds, and once with seccomp not yet loaded, so
//! the namespace, user and landlock layers are seen to hold on their own.
//! Never set in production.

use std::io;
use std::os::unix::net::UnixStream;

use crate::config::EscapeProbe;

/// Tries the escape; `Err` is the error that denied it. A seccomp kill
/// never returns.
pub fn attempt(probe: &EscapeProbe) -> io::Result<()> {
    match probe {
        EscapeProbe::ConnectUnix { path } => UnixStream::connect(path).map(drop),
        EscapeProbe::OpenFile { path } => std::fs::File::open(path).map(drop),
        EscapeProbe::CreateFile { path } => std::fs::write(path, b"escaped\n"),
        EscapeProbe::Signal { pid } => {
            // SAFETY: integers only.
            if unsafe { libc::kill(*pid, libc::SIGTERM) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: integers only.
            if unsafe { libc::syscall(libc::SYS_tgkill, *pid, *pid, libc::SIGTERM) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
        EscapeProbe::InetSocket => std::net::UdpSocket::bind("0.0.0.0:0").map(drop),
    }
}
