//! The fds a container process's stdio is made of: pipes for the streams
//! the host declared (and drains for those it did not), or, with a
//! terminal, the pty master that libcontainer sends on a console socket.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use super::error::ContainerError;
use super::process;
use super::spec::Stdio;

/// Pipes for the declared streams: (agent ends, process ends), plus the
/// read ends of output the host did not ask for, which the agent drains
/// and drops. Undeclared output cannot simply be `/dev/null`: libcontainer
/// 0.7 re-opens a `/dev/null` stdio fd inside the container read-only
/// (`reopen_dev_null`), so the process's writes would fail with EBADF.
pub struct Pipes {
    pub agent: [Option<OwnedFd>; 3],
    pub process: [Option<OwnedFd>; 3],
    discard: Vec<OwnedFd>,
}

impl Pipes {
    /// Drops whatever the process writes to undeclared stdout/stderr.
    pub fn spawn_discards(&mut self) {
        for fd in self.discard.drain(..) {
            tokio::spawn(process::discard_output(fd));
        }
    }
}

pub fn pipes(stdio: Stdio) -> Result<Pipes, ContainerError> {
    let mut p = Pipes {
        agent: [None, None, None],
        process: [None, None, None],
        discard: Vec::new(),
    };
    if stdio.terminal {
        return Ok(p);
    }
    let pipe = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| ContainerError::Io {
            what: "create a stdio pipe",
            source: e.into(),
        })
    };
    if stdio.stdin {
        let (r, w) = pipe()?;
        p.agent[0] = Some(w);
        p.process[0] = Some(r);
    }
    for (i, declared) in [(1, stdio.stdout), (2, stdio.stderr)] {
        let (r, w) = pipe()?;
        p.process[i] = Some(w);
        if declared {
            p.agent[i] = Some(r);
        } else {
            p.discard.push(r);
        }
    }
    Ok(p)
}

pub fn to_stdio(fd: Option<OwnedFd>) -> std::process::Stdio {
    fd.map(std::process::Stdio::from)
        .unwrap_or_else(std::process::Stdio::null)
}

/// Listens on `path` for libcontainer's console-socket connection (a
/// leftover socket file of an earlier process is replaced).
pub fn bind_console_socket(path: &Path) -> Result<UnixListener, ContainerError> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(|source| ContainerError::Io {
        what: "bind the console socket",
        source,
    })
}

/// Accepts libcontainer's connection on the console socket and receives the
/// pty master it sends with SCM_RIGHTS. The connection is already queued.
pub async fn receive_pty(listener: UnixListener) -> Result<OwnedFd, ContainerError> {
    tokio::task::spawn_blocking(move || {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::os::fd::{AsRawFd, FromRawFd};
        let io_err = |source| ContainerError::Io {
            what: "receive the pty master",
            source,
        };
        listener.set_nonblocking(true).map_err(io_err)?;
        let (conn, _) = listener.accept().map_err(io_err)?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(io_err)?;
        let mut buf = [0u8; 4096];
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
        let msg = recvmsg::<()>(
            conn.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::empty(),
        )
        .map_err(|e| io_err(e.into()))?;
        for c in msg.cmsgs().map_err(|e| io_err(e.into()))? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                if let Some(fd) = fds.first() {
                    // SAFETY: the kernel just installed this fd for us; we
                    // are its only owner.
                    return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
                }
            }
        }
        Err(io_err(std::io::Error::other(
            "no fd in the console message",
        )))
    })
    .await
    .map_err(|e| ContainerError::Helper {
        op: "receive the pty",
        message: e.to_string(),
    })?
}
