//! Host side of Firecracker-style hybrid vsock.
//!
//! The VMM (or its vsock device as `boxlite-vsock` for the qemu backend) listens on a unix
//! socket. To reach guest vsock port `P`, the host connects, writes
//! `CONNECT P\n` and reads one line; `OK <host port>\n` means the guest
//! accepted, and from then on the unix stream carries the vsock stream.
//!
//! While the guest is not listening yet, the socket may be missing, refuse
//! the connection, or accept it and close it without an answer (that is what
//! the VMM's muxer does when the guest answers with a reset).
//! [`HybridVsock::connect`] retries those cases until a deadline. A reply that
//! is not `OK` is a wrong peer and fails at once.
//!
//! The reply is read byte by byte and bounded by [`MAX_REPLY_LEN`], so no
//! byte after the newline is consumed and a garbage peer cannot make us
//! buffer without limit.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::time::Instant;

use crate::fmt_duration;

/// Longest reply line accepted, newline excluded. `OK 4294967295` is 13 bytes.
pub const MAX_REPLY_LEN: usize = 64;
/// Default budget of one attempt (connect, write, read the reply).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Default pause between attempts.
pub const DEFAULT_RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    #[error("the socket does not exist")]
    SocketMissing,
    #[error("connection refused")]
    Refused,
    #[error("the peer closed the connection before answering OK (guest not listening yet?)")]
    ClosedBeforeOk,
    #[error("no answer within {}", fmt_duration(*.0))]
    NoAnswer(Duration),
    #[error("unexpected reply {0:?} (expected \"OK <port>\")")]
    BadReply(String),
    #[error("reply longer than {MAX_REPLY_LEN} bytes without a newline (starts {0:?})")]
    ReplyTooLong(String),
    #[error(transparent)]
    Io(io::Error),
}

impl AttemptError {
    /// True for what a guest that is still booting produces.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            AttemptError::SocketMissing
                | AttemptError::Refused
                | AttemptError::ClosedBeforeOk
                | AttemptError::NoAnswer(_)
        )
    }

    fn from_connect(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::NotFound => AttemptError::SocketMissing,
            io::ErrorKind::ConnectionRefused => AttemptError::Refused,
            // A full listen backlog.
            io::ErrorKind::WouldBlock => AttemptError::Refused,
            _ => AttemptError::Io(e),
        }
    }

    fn from_stream(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::UnexpectedEof => AttemptError::ClosedBeforeOk,
            _ => AttemptError::Io(e),
        }
    }
}

/// Renders `; console log: <path>` when the caller supplied one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConsoleLogHint(pub Option<PathBuf>);

impl fmt::Display for ConsoleLogHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(path) => write!(f, "; console log: {}", path.display()),
            None => Ok(()),
        }
    }
}

/// Errors of [`HybridVsock::connect`]. Messages name the socket, the port,
/// what happened and the console log (when known).
///
/// `Failed` still puts its cause in the message rather than in `source`:
/// the shim prints this error with `to_string()` (shim/src/stdio.rs), so
/// the cause would vanish from its messages. Move it once the shim prints
/// the chain. (`Timeout`'s `last` is context, not a cause.)
#[derive(Debug, thiserror::Error)]
pub enum HybridVsockError {
    #[error(
        "hybrid vsock {}: no connection to guest port {port} within {} (last attempt: {last}){console_log}",
        socket.display(), fmt_duration(*timeout)
    )]
    Timeout {
        socket: PathBuf,
        port: u32,
        timeout: Duration,
        last: AttemptError,
        console_log: ConsoleLogHint,
    },
    #[error(
        "hybrid vsock {}: connecting to guest port {port} failed: {cause}{console_log}",
        socket.display()
    )]
    Failed {
        socket: PathBuf,
        port: u32,
        cause: AttemptError,
        console_log: ConsoleLogHint,
    },
}

/// A hybrid vsock unix socket and how to connect through it.
#[derive(Debug, Clone)]
pub struct HybridVsock {
    socket_path: PathBuf,
    console_log: Option<PathBuf>,
    attempt_timeout: Duration,
    retry_interval: Duration,
}

impl HybridVsock {
    pub fn new(socket_path: impl Into<PathBuf>) -> Self {
        Self {
            socket_path: socket_path.into(),
            console_log: None,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            retry_interval: DEFAULT_RETRY_INTERVAL,
        }
    }

    /// The guest console log, named in errors so the reader knows where to
    /// look next.
    pub fn with_console_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.console_log = Some(path.into());
        self
    }

    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    pub fn with_retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    pub fn console_log(&self) -> Option<&Path> {
        self.console_log.as_deref()
    }

    /// One attempt, bounded by `timeout`: connect, `CONNECT <port>\n`, read
    /// the `OK` line. The stream is positioned right after the newline.
    pub async fn try_connect(
        &self,
        port: u32,
        timeout: Duration,
    ) -> Result<UnixStream, AttemptError> {
        let attempt = async {
            let mut stream = UnixStream::connect(&self.socket_path)
                .await
                .map_err(AttemptError::from_connect)?;
            handshake(&mut stream, port).await?;
            Ok(stream)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            Err(_) => Err(AttemptError::NoAnswer(timeout)),
        }
    }

    /// Connects to guest `port`, retrying what a booting guest produces until
    /// `timeout` has passed. Returns within about `timeout` (plus one retry
    /// interval at most).
    pub async fn connect(
        &self,
        port: u32,
        timeout: Duration,
    ) -> Result<UnixStream, HybridVsockError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let budget = self
                .attempt_timeout
                .min(remaining)
                .max(Duration::from_millis(1));
            match self.try_connect(port, budget).await {
                Ok(stream) => return Ok(stream),
                Err(cause) if !cause.is_retryable() => {
                    return Err(HybridVsockError::Failed {
                        socket: self.socket_path.clone(),
                        port,
                        cause,
                        console_log: ConsoleLogHint(self.console_log.clone()),
                    })
                }
                Err(last) => {
                    if Instant::now() + self.retry_interval >= deadline {
                        return Err(HybridVsockError::Timeout {
                            socket: self.socket_path.clone(),
                            port,
                            timeout,
                            last,
                            console_log: ConsoleLogHint(self.console_log.clone()),
                        });
                    }
                    tracing::trace!(socket = %self.socket_path.display(), port, %last, "hybrid vsock: retrying");
                    tokio::time::sleep(self.retry_interval).await;
                }
            }
        }
    }

    /// [`HybridVsock::connect`], then a ttrpc client over the stream.
    /// Must be called inside a tokio runtime (the client spawns its task).
    pub async fn connect_ttrpc(
        &self,
        port: u32,
        timeout: Duration,
    ) -> Result<ttrpc::r#async::Client, HybridVsockError> {
        let stream = self.connect(port, timeout).await?;
        Ok(ttrpc_client(stream))
    }
}

/// Wraps a connected stream (after the handshake) in a ttrpc client. ttrpc
/// knows nothing of hybrid vsock; from its point of view this is a plain unix
/// socket. Must be called inside a tokio runtime.
pub fn ttrpc_client(stream: UnixStream) -> ttrpc::r#async::Client {
    ttrpc::r#async::Client::new(ttrpc::r#async::transport::Socket::from(stream))
}

async fn handshake(stream: &mut UnixStream, port: u32) -> Result<(), AttemptError> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(AttemptError::from_stream)?;
    let mut line = Vec::with_capacity(MAX_REPLY_LEN);
    loop {
        let mut byte = [0u8; 1];
        let n = stream
            .read(&mut byte)
            .await
            .map_err(AttemptError::from_stream)?;
        if n == 0 {
            return Err(AttemptError::ClosedBeforeOk);
        }
        if byte[0] == b'\n' {
            break;
        }
        if line.len() >= MAX_REPLY_LEN {
            return Err(AttemptError::ReplyTooLong(
                String::from_utf8_lossy(&line[..16]).into_owned(),
            ));
        }
        line.push(byte[0]);
    }
    parse_reply(&line).map(|_| ())
}

/// Parses the reply line (without its newline). Lenient: `OK` followed by
/// anything after a space is accepted; returns the host port when it parses.
pub fn parse_reply(line: &[u8]) -> Result<Option<u32>, AttemptError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line.strip_prefix(b"OK") {
        Some([]) => Ok(None),
        Some(rest) if rest.starts_with(b" ") => Ok(std::str::from_utf8(&rest[1..])
            .ok()
            .and_then(|s| s.trim().parse().ok())),
        _ => Err(AttemptError::BadReply(
            String::from_utf8_lossy(line).into_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_test_support::fake_guest::{accept_connect, read_connect_line};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncBufReadExt;
    use tokio::net::UnixListener;

    /// A vsock in a temp dir and a listener on its socket, standing in for
    /// the guest side.
    fn listening() -> (tempfile::TempDir, HybridVsock, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let v = vsock(dir.path());
        let listener = UnixListener::bind(v.socket_path()).unwrap();
        (dir, v, listener)
    }

    /// Accepts one connection, reads its CONNECT line and leaves the rest
    /// to `peer`, in a task of its own.
    fn answer_once<F: std::future::Future<Output = ()> + Send + 'static>(
        listener: UnixListener,
        peer: impl FnOnce(UnixStream) -> F + Send + 'static,
    ) {
        tokio::spawn(async move {
            let (s, _) = accept_connect(&listener).await;
            peer(s).await;
        });
    }

    fn vsock(dir: &Path) -> HybridVsock {
        HybridVsock::new(dir.join("vsock.sock"))
            .with_console_log(dir.join("console.log"))
            .with_attempt_timeout(Duration::from_millis(300))
            .with_retry_interval(Duration::from_millis(20))
    }

    #[test]
    fn reply_parsing() {
        assert_eq!(parse_reply(b"OK 1073741824").unwrap(), Some(1073741824));
        assert_eq!(parse_reply(b"OK 1024\r").unwrap(), Some(1024));
        assert_eq!(parse_reply(b"OK").unwrap(), None);
        assert_eq!(parse_reply(b"OK whatever").unwrap(), None);
        assert!(matches!(
            parse_reply(b"OKAY"),
            Err(AttemptError::BadReply(_))
        ));
        assert!(matches!(
            parse_reply(b"ERR 1"),
            Err(AttemptError::BadReply(_))
        ));
        assert!(matches!(parse_reply(b""), Err(AttemptError::BadReply(_))));
    }

    #[tokio::test]
    async fn good_handshake_then_data_both_ways() {
        let (_dir, v, listener) = listening();
        let peer = tokio::spawn(async move {
            let (mut s, line) = accept_connect(&listener).await;
            s.write_all(b"OK 1073741824\n").await.unwrap();
            s.write_all(b"from guest\n").await.unwrap();
            let (r, mut w) = s.split();
            let mut r = tokio::io::BufReader::new(r);
            let mut got = String::new();
            r.read_line(&mut got).await.unwrap();
            w.write_all(format!("echo {got}").as_bytes()).await.unwrap();
            line
        });
        let stream = v.connect(1024, Duration::from_secs(5)).await.unwrap();
        let mut stream = tokio::io::BufReader::new(stream);
        let mut first = String::new();
        stream.read_line(&mut first).await.unwrap();
        assert_eq!(first, "from guest\n");
        stream.get_mut().write_all(b"ping\n").await.unwrap();
        let mut echo = String::new();
        stream.read_line(&mut echo).await.unwrap();
        assert_eq!(echo, "echo ping\n");
        assert_eq!(peer.await.unwrap(), "CONNECT 1024");
    }

    #[tokio::test]
    async fn bytes_after_ok_are_kept() {
        let (_dir, v, listener) = listening();
        answer_once(listener, |mut s| async move {
            // Reply and payload in one write: must not be swallowed.
            s.write_all(b"OK 5\nHELLO").await.unwrap();
            s.shutdown().await.unwrap();
            let mut rest = Vec::new();
            s.read_to_end(&mut rest).await.unwrap();
        });
        let mut stream = v.connect(1025, Duration::from_secs(5)).await.unwrap();
        let mut got = Vec::new();
        stream.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HELLO");
    }

    #[tokio::test]
    async fn garbage_reply_fails_at_once() {
        let (_dir, v, listener) = listening();
        answer_once(listener, |mut s| async move {
            s.write_all(b"HTTP/1.1 400 Bad Request\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let started = std::time::Instant::now();
        let err = v.connect(1024, Duration::from_secs(10)).await.unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        let msg = err.to_string();
        assert!(
            msg.contains(&v.socket_path().display().to_string()),
            "{msg}"
        );
        assert!(msg.contains("guest port 1024"), "{msg}");
        assert!(
            msg.contains("unexpected reply \"HTTP/1.1 400 Bad Request\""),
            "{msg}"
        );
        assert!(msg.contains("console log: "), "{msg}");
        assert!(matches!(err, HybridVsockError::Failed { .. }));
    }

    #[tokio::test]
    async fn over_long_reply_is_bounded() {
        let (_dir, v, listener) = listening();
        answer_once(listener, |mut s| async move {
            // An endless line: we must stop reading at MAX_REPLY_LEN.
            let chunk = [b'A'; 4096];
            while s.write_all(&chunk).await.is_ok() {}
        });
        let err = v.connect(1024, Duration::from_secs(10)).await.unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("reply longer than 64 bytes"), "{msg}");
    }

    #[tokio::test]
    async fn peer_closing_early_is_retried() {
        let (_dir, v, listener) = listening();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let n = count.fetch_add(1, Ordering::SeqCst);
                read_connect_line(&mut s).await;
                if n < 3 {
                    drop(s); // what the muxer does on a guest RST
                    continue;
                }
                s.write_all(b"OK 1\nready").await.unwrap();
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
        });
        let mut stream = v.connect(1024, Duration::from_secs(5)).await.unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ready");
        assert_eq!(accepted.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn peer_always_closing_times_out_naming_the_cause() {
        let (_dir, v, listener) = listening();
        tokio::spawn(async move {
            loop {
                let _conn = accept_connect(&listener).await;
            }
        });
        let err = v
            .connect(1024, Duration::from_millis(400))
            .await
            .unwrap_err();
        assert!(matches!(err, HybridVsockError::Timeout { .. }));
        assert!(
            err.to_string()
                .contains("closed the connection before answering OK"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn socket_appearing_later_is_retried() {
        let dir = tempfile::tempdir().unwrap();
        let v = vsock(dir.path());
        let path = v.socket_path().to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listener = UnixListener::bind(&path).unwrap();
            let (mut s, _) = accept_connect(&listener).await;
            s.write_all(b"OK 7\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        let started = std::time::Instant::now();
        v.connect(1024, Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250));
    }

    #[tokio::test]
    async fn refused_socket_is_retried_until_listener_exists() {
        let dir = tempfile::tempdir().unwrap();
        let v = vsock(dir.path());
        // A socket file with nobody listening: connect gives ECONNREFUSED.
        drop(std::os::unix::net::UnixListener::bind(v.socket_path()).unwrap());
        let err = v
            .try_connect(1024, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err, AttemptError::Refused), "{err}");
        let path = v.socket_path().to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            std::fs::remove_file(&path).unwrap();
            let listener = UnixListener::bind(&path).unwrap();
            let (mut s, _) = accept_connect(&listener).await;
            s.write_all(b"OK 7\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        v.connect(1024, Duration::from_secs(5)).await.unwrap();
    }

    #[tokio::test]
    async fn deadline_error_is_bounded_and_names_everything() {
        let dir = tempfile::tempdir().unwrap();
        let v = vsock(dir.path());
        let started = std::time::Instant::now();
        let err = v
            .connect(1024, Duration::from_millis(500))
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(1500), "{elapsed:?}");
        let msg = err.to_string();
        let expected = format!(
            "hybrid vsock {}: no connection to guest port 1024 within 500ms \
             (last attempt: the socket does not exist); console log: {}",
            dir.path().join("vsock.sock").display(),
            dir.path().join("console.log").display()
        );
        assert_eq!(msg, expected);
    }

    #[tokio::test]
    async fn silent_peer_hits_the_attempt_timeout() {
        let (_dir, v, listener) = listening();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (s, _) = listener.accept().await.unwrap();
                held.push(s); // accept, never answer
            }
        });
        let started = std::time::Instant::now();
        let err = v
            .connect(1024, Duration::from_millis(800))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(1500));
        assert!(
            err.to_string().contains("last attempt: no answer within"),
            "{err}"
        );
    }
}
