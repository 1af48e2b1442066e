//! The host end of the agent's readiness announcement
//! ([`boxlite_protocol::ready`]): a unix listener at `<hybrid socket>_1027`,
//! bound before the VM starts, on which the guest's connection to host
//! vsock port 1027 arrives once the agent serves.
//!
//! The host makes no connection into the guest before that: it knows the
//! agent serves instead of probing it (a probe costs a CONNECT timeout
//! while the guest boots, and with `vhost-device-vsock` as the qemu
//! backend's vsock device a host connection that arrives before the guest
//! driver enabled the RX queue stops the device for good). The listener is
//! closed after the first announcement, so a container in the guest cannot
//! reach it later.
//!
//! The connection itself may come long before its line: a jailed VMM (or
//! vsock backend) may make no connection once the guest runs, so it
//! connects to this listener when it starts, and the guest's connection to
//! port 1027 gets that connection. The listener keeps an accepted
//! connection and what it has read of its line across calls.

use std::path::{Path, PathBuf};

use boxlite_protocol::ready::{Announcement, AnnouncementError, MAX_LINE_LEN};
use boxlite_protocol::READY_VSOCK_PORT;
use tokio::io::AsyncReadExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::HypervisorError;

/// `<hybrid socket>_1027`: where guest connections to host port 1027 land.
pub fn ready_socket_path(hybrid_socket: &Path) -> PathBuf {
    let mut s = hybrid_socket.as_os_str().to_owned();
    s.push(format!("_{READY_VSOCK_PORT}"));
    PathBuf::from(s)
}

/// Why waiting for one announcement failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadyError {
    /// No connection yet, or one whose line is still to come.
    #[error("no announcement yet")]
    NotYet,
    #[error("accepting the connection failed")]
    Accept(#[source] std::io::Error),
    #[error("reading the announcement failed")]
    Read(#[source] std::io::Error),
    #[error(transparent)]
    Bad(#[from] AnnouncementError),
}

/// The bound listener; removes its socket file when dropped.
#[derive(Debug)]
pub struct ReadyListener {
    listener: UnixListener,
    path: PathBuf,
    /// The accepted connection and the bytes of its line read so far,
    /// until the line is complete.
    pending: Mutex<Option<(UnixStream, Vec<u8>)>>,
}

impl ReadyListener {
    /// Binds `<hybrid socket>_1027`, replacing a stale socket file. Needs a
    /// tokio runtime.
    pub fn bind(hybrid_socket: &Path) -> std::io::Result<Self> {
        let path = ready_socket_path(hybrid_socket);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        Ok(Self {
            listener,
            path,
            pending: Mutex::new(None),
        })
    }

    /// [`Self::bind`] for a backend's `start`, with the error it reports.
    pub fn bind_for_sandbox(id: &str, hybrid_socket: &Path) -> Result<Self, HypervisorError> {
        Self::bind(hybrid_socket).map_err(|error| HypervisorError::Io {
            id: id.to_owned(),
            op: "cannot listen for the agent's readiness announcement",
            path: ready_socket_path(hybrid_socket),
            error,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until `until` for one connection and its line. A connection
    /// whose line has not come by then is kept for the next call
    /// ([`ReadyError::NotYet`]).
    pub async fn accept_until(&self, until: Instant) -> Result<Announcement, ReadyError> {
        let mut pending = self.pending.lock().await;
        if pending.is_none() {
            let (conn, _) = tokio::time::timeout_at(until, self.listener.accept())
                .await
                .map_err(|_| ReadyError::NotYet)?
                .map_err(ReadyError::Accept)?;
            *pending = Some((conn, Vec::with_capacity(64)));
        }
        let read = {
            let (conn, line) = pending.as_mut().expect("accepted above");
            tokio::time::timeout_at(until, read_line(conn, line)).await
        };
        // The line is complete, or the connection failed: either way this
        // connection is done with.
        let result = read.map_err(|_| ReadyError::NotYet)?;
        let (_, line) = pending.take().expect("accepted above");
        result?;
        Ok(Announcement::parse(&line)?)
    }

    /// Whether a connection was accepted whose line has not come yet (for
    /// the message of a wait that ends without an announcement).
    pub async fn awaiting_line(&self) -> bool {
        self.pending.lock().await.is_some()
    }
}

/// Reads into `line` until a newline, end of file or [`MAX_LINE_LEN`]
/// bytes. Cancel-safe: what was read stays in `line`.
async fn read_line(conn: &mut UnixStream, line: &mut Vec<u8>) -> Result<(), ReadyError> {
    let mut buf = [0u8; MAX_LINE_LEN];
    while !line.contains(&b'\n') && line.len() < MAX_LINE_LEN {
        let room = MAX_LINE_LEN - line.len();
        let n = conn
            .read(&mut buf[..room])
            .await
            .map_err(ReadyError::Read)?;
        if n == 0 {
            break;
        }
        line.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

impl Drop for ReadyListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn path_appends_the_port() {
        assert_eq!(
            ready_socket_path(Path::new("/run/boxlite/x/vsock.sock")),
            PathBuf::from("/run/boxlite/x/vsock.sock_1027")
        );
    }

    #[tokio::test]
    async fn reads_one_announcement_and_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let hybrid = dir.path().join("vsock.sock");
        std::fs::write(ready_socket_path(&hybrid), b"stale").unwrap();
        let l = ReadyListener::bind(&hybrid).unwrap();
        let path = l.path().to_owned();
        let mut c = UnixStream::connect(&path).await.unwrap();
        c.write_all(b"BOXLITE-READY 1 9.9.9\n").await.unwrap();
        let a = l.accept_until(soon()).await.unwrap();
        assert_eq!(a.agent_version, "9.9.9");
        drop(l);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn line_split_over_writes_is_joined() {
        let dir = tempfile::tempdir().unwrap();
        let l = ReadyListener::bind(&dir.path().join("v.sock")).unwrap();
        let mut c = UnixStream::connect(l.path()).await.unwrap();
        let writer = tokio::spawn(async move {
            c.write_all(b"BOXLITE-READY 1 ").await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            c.write_all(b"0.1.0\n").await.unwrap();
            c
        });
        assert_eq!(l.accept_until(soon()).await.unwrap().protocol_version, 1);
        drop(writer.await.unwrap());
    }

    #[tokio::test]
    async fn a_connection_made_long_before_its_line_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let l = ReadyListener::bind(&dir.path().join("v.sock")).unwrap();
        // As a jailed VMM connects at its start, long before the guest
        // announces.
        let mut c = UnixStream::connect(l.path()).await.unwrap();
        for _ in 0..3 {
            let until = Instant::now() + Duration::from_millis(50);
            assert!(matches!(
                l.accept_until(until).await,
                Err(ReadyError::NotYet)
            ));
            assert!(l.awaiting_line().await);
        }
        c.write_all(b"BOXLITE-READY 1 ").await.unwrap();
        let until = Instant::now() + Duration::from_millis(50);
        assert!(matches!(
            l.accept_until(until).await,
            Err(ReadyError::NotYet)
        ));
        c.write_all(b"2.0.0\n").await.unwrap();
        let a = l.accept_until(soon()).await.unwrap();
        assert_eq!(a.agent_version, "2.0.0");
        assert!(!l.awaiting_line().await);
    }

    #[tokio::test]
    async fn bad_and_missing_announcements_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let l = ReadyListener::bind(&dir.path().join("v.sock")).unwrap();
        let until = Instant::now() + Duration::from_millis(100);
        assert!(matches!(
            l.accept_until(until).await,
            Err(ReadyError::NotYet)
        ));

        let mut c = UnixStream::connect(l.path()).await.unwrap();
        c.write_all(b"hello\n").await.unwrap();
        let err = l.accept_until(soon()).await.unwrap_err();
        assert!(matches!(err, ReadyError::Bad(_)), "{err}");

        // Closed without a newline.
        let mut c = UnixStream::connect(l.path()).await.unwrap();
        c.write_all(b"BOXLITE-READY 1 0.1.0").await.unwrap();
        drop(c);
        let err = l.accept_until(soon()).await.unwrap_err();
        assert!(
            matches!(err, ReadyError::Bad(AnnouncementError::NoNewline)),
            "{err}"
        );
    }
}
