//! One process of a container (its init or an exec): pid, exit, and stdio.
//!
//! Stdio: the agent keeps its ends of the process's pipes (or a pty master)
//! until the host's streams arrive on the stdio port. Start and Exec wait
//! for every declared stream ([`Process::wait_streams`]), then
//! [`Process::start_pumps`] copies bytes between each stream and its fd.
//! The exit is published only after stdout and stderr reached EOF (or
//! [`DRAIN_TIMEOUT`] passed after the exit, when something else still holds
//! the write end), so no output is lost or reported after the exit.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use boxlite_protocol::stdio::StreamKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use super::error::ContainerError;
use super::spec::Stdio;
use crate::listener::BoxConn;
use crate::reaper::ExitWatch;

/// How long Start/Exec wait for the declared streams to connect.
pub const STREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the exit the agent still waits for stdout/stderr EOF.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
const COPY_BUF: usize = 64 * 1024;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    pub at: SystemTime,
}

#[derive(Default)]
struct Io {
    /// The agent's ends, until the pumps take them.
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    /// pty master (terminal processes), kept for ResizePty.
    pty: Option<Arc<OwnedFd>>,
    /// Streams that arrived and wait for the pumps.
    conns: HashMap<u8, BoxConn>,
    /// Streams seen so far (also after the pumps took them).
    seen: Vec<u8>,
    stdin_closed: bool,
    stdin_pump: Option<JoinHandle<()>>,
    output_pumps: Vec<JoinHandle<()>>,
    pumps_started: bool,
}

pub struct Process {
    pub exec_id: String,
    pub stdio: Stdio,
    pid: Mutex<Option<i32>>,
    io: Mutex<Io>,
    stream_arrived: Notify,
    exit_tx: watch::Sender<Option<Exit>>,
}

fn kind_byte(kind: StreamKind) -> u8 {
    match kind {
        StreamKind::Stdin => 0,
        StreamKind::Stdout => 1,
        StreamKind::Stderr => 2,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Process {
    pub fn new(exec_id: &str, stdio: Stdio) -> Arc<Self> {
        Arc::new(Process {
            exec_id: exec_id.to_string(),
            stdio,
            pid: Mutex::new(None),
            io: Mutex::new(Io::default()),
            stream_arrived: Notify::new(),
            exit_tx: watch::channel(None).0,
        })
    }

    /// "init" or `exec "<id>"`, for messages.
    pub fn name(&self) -> String {
        if self.exec_id.is_empty() {
            "init process".to_string()
        } else {
            format!("exec {:?}", self.exec_id)
        }
    }

    pub fn pid(&self) -> Option<i32> {
        *lock(&self.pid)
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    /// Hands the process the agent's ends of its stdio pipes
    /// (`[stdin, stdout, stderr]`, as `stdio_fds::pipes` gives them) and,
    /// for a terminal process, the pty master the helper received.
    pub fn set_stdio(
        &self,
        [stdin, stdout, stderr]: [Option<OwnedFd>; 3],
        master: Option<OwnedFd>,
    ) -> Result<(), ContainerError> {
        self.set_fds(stdin, stdout, stderr);
        if let Some(master) = master {
            self.set_pty(master)?;
        }
        Ok(())
    }

    /// Hands the agent's ends of the stdio fds to the process.
    fn set_fds(&self, stdin: Option<OwnedFd>, stdout: Option<OwnedFd>, stderr: Option<OwnedFd>) {
        let mut io = lock(&self.io);
        io.stdin = stdin;
        io.stdout = stdout;
        io.stderr = stderr;
    }

    /// Terminal processes: the pty master; stdin and stdout use dups of it.
    fn set_pty(&self, master: OwnedFd) -> Result<(), ContainerError> {
        let dup = |what| {
            master
                .try_clone()
                .map_err(|source| ContainerError::Io { what, source })
        };
        let stdin = if self.stdio.stdin {
            Some(dup("dup pty master")?)
        } else {
            None
        };
        let stdout = if self.stdio.stdout {
            Some(dup("dup pty master")?)
        } else {
            None
        };
        let mut io = lock(&self.io);
        io.stdin = stdin;
        io.stdout = stdout;
        io.pty = Some(Arc::new(master));
        Ok(())
    }

    fn declared(&self, kind: StreamKind) -> bool {
        match kind {
            StreamKind::Stdin => self.stdio.stdin,
            StreamKind::Stdout => self.stdio.stdout,
            StreamKind::Stderr => self.stdio.stderr,
        }
    }

    /// Whether a stream of this kind would be accepted now.
    pub fn check_attach(&self, kind: StreamKind) -> Result<(), String> {
        self.check_attach_locked(kind, &lock(&self.io))
    }

    fn check_attach_locked(&self, kind: StreamKind, io: &Io) -> Result<(), String> {
        if !self.declared(kind) {
            return Err(format!(
                "the {} has no {kind:?} stream (not declared in its StdioConfig)",
                self.name()
            ));
        }
        if self.exit().is_some() {
            return Err(format!("the {} has already exited", self.name()));
        }
        if kind == StreamKind::Stdin && io.stdin_closed {
            return Err(format!("stdin of the {} was closed", self.name()));
        }
        if io.seen.contains(&kind_byte(kind)) {
            return Err(format!(
                "the {kind:?} stream of the {} is already connected",
                self.name()
            ));
        }
        Ok(())
    }

    /// A stream connection for this process arrived on the stdio port.
    pub fn attach(&self, kind: StreamKind, conn: BoxConn) -> Result<(), String> {
        let mut io = lock(&self.io);
        self.check_attach_locked(kind, &io)?;
        io.seen.push(kind_byte(kind));
        io.conns.insert(kind_byte(kind), conn);
        let start_now = io.pumps_started;
        drop(io);
        if start_now {
            self.start_pumps();
        }
        self.stream_arrived.notify_waiters();
        Ok(())
    }

    /// Waits until every declared stream has connected, up to `timeout`.
    pub async fn wait_streams(
        &self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<(), ContainerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.stream_arrived.notified();
            let missing = {
                let io = lock(&self.io);
                [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr]
                    .into_iter()
                    .filter(|k| self.declared(*k) && !io.seen.contains(&kind_byte(*k)))
                    .map(|k| format!("{k:?}").to_lowercase())
                    .collect::<Vec<_>>()
            };
            if missing.is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(ContainerError::StreamsMissing {
                    container_id: container_id.to_string(),
                    process: self.name(),
                    missing: missing.join(", "),
                    timeout,
                });
            }
        }
    }

    /// Starts copying for every stream that is connected and has its fd.
    /// Called at start, and again when a stream arrives later.
    pub fn start_pumps(&self) {
        let mut io = lock(&self.io);
        io.pumps_started = true;
        if let (Some(conn), Some(fd)) = (
            io.conns.remove(&kind_byte(StreamKind::Stdin)),
            io.stdin.take(),
        ) {
            if io.stdin_closed {
                drop((conn, fd));
            } else {
                io.stdin_pump = Some(tokio::spawn(pump_stdin(conn, fd)));
            }
        }
        for kind in [StreamKind::Stdout, StreamKind::Stderr] {
            let has_conn = io.conns.contains_key(&kind_byte(kind));
            let fd = match kind {
                StreamKind::Stdout if has_conn => io.stdout.take(),
                StreamKind::Stderr if has_conn => io.stderr.take(),
                _ => None,
            };
            if let (Some(fd), Some(conn)) = (fd, io.conns.remove(&kind_byte(kind))) {
                io.output_pumps.push(tokio::spawn(pump_output(fd, conn)));
            }
        }
    }

    /// CloseStdin: the process reads EOF once buffered input is consumed.
    pub fn close_stdin(&self) {
        let mut io = lock(&self.io);
        io.stdin_closed = true;
        io.stdin = None;
        io.conns.remove(&kind_byte(StreamKind::Stdin));
        if let Some(pump) = io.stdin_pump.take() {
            pump.abort();
        }
    }

    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), String> {
        let pty = lock(&self.io).pty.clone();
        let Some(pty) = pty else {
            return Err(format!("the {} has no terminal", self.name()));
        };
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which
        // points to a live local; the fd is an open pty master.
        let rc = unsafe { libc::ioctl(pty.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc < 0 {
            return Err(format!(
                "TIOCSWINSZ failed: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    }

    /// Records the pid and starts the task that publishes the exit once the
    /// output is drained.
    pub fn started(
        self: &Arc<Self>,
        watch: ExitWatch,
        on_exit: impl FnOnce(Exit) + Send + 'static,
    ) {
        *lock(&self.pid) = Some(watch.pid());
        let this = self.clone();
        tokio::spawn(async move {
            let exit = match watch.wait().await {
                Ok(e) => Exit {
                    status: e.status,
                    at: e.exited_at,
                },
                Err(e) => {
                    tracing::error!(error = %e, "exit status lost");
                    Exit {
                        status: 255,
                        at: SystemTime::now(),
                    }
                }
            };
            let pumps = {
                let mut io = lock(&this.io);
                // Nothing reads stdin any more; output not connected is dropped.
                if let Some(p) = io.stdin_pump.take() {
                    p.abort();
                }
                io.stdin = None;
                std::mem::take(&mut io.output_pumps)
            };
            let drained =
                tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(pumps)).await;
            if drained.is_err() {
                tracing::warn!(
                    process = %this.name(),
                    "output not at EOF {DRAIN_TIMEOUT:?} after the exit (a child still holds it?); reporting the exit"
                );
            }
            tracing::info!(process = %this.name(), status = exit.status, "process exited");
            on_exit(exit);
            this.exit_tx.send_replace(Some(exit));
        });
    }

    /// Waits for the exit (published after the output drained).
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                // The sender lives in self; unreachable while self is alive.
                return Exit {
                    status: 255,
                    at: SystemTime::now(),
                };
            }
        }
    }
}

fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = fcntl(fd, FcntlArg::F_GETFL).map_err(std::io::Error::from)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd, FcntlArg::F_SETFL(flags)).map_err(std::io::Error::from)?;
    Ok(())
}

/// Copies the process's output to the host until EOF (EIO on a pty whose
/// other side is closed counts as EOF). If the host goes away, the output
/// is still read and dropped so the process never blocks on it.
async fn pump_output(fd: OwnedFd, mut conn: BoxConn) {
    if let Err(e) = set_nonblocking(&fd) {
        tracing::error!(error = %e, "stdio fd");
        return;
    }
    let mut reader = match tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "stdio fd");
            return;
        }
    };
    let mut buf = vec![0u8; COPY_BUF];
    let mut host_gone = false;
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "reading process output failed");
                break;
            }
        };
        if !host_gone {
            if let Err(e) = conn.write_all(&buf[..n]).await {
                tracing::debug!(error = %e, "stdio stream closed by the host; dropping output");
                host_gone = true;
            }
        }
    }
    let _ = conn.flush().await;
    let _ = conn.shutdown().await;
}

/// Reads output nobody asked for until EOF, so the writer never blocks.
pub async fn discard_output(fd: OwnedFd) {
    if set_nonblocking(&fd).is_err() {
        return;
    }
    let Ok(mut reader) = tokio::net::unix::pipe::Receiver::from_owned_fd_unchecked(fd) else {
        return;
    };
    let mut buf = vec![0u8; COPY_BUF];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Copies the host's stdin stream into the process until the host closes
/// its side; then the process sees EOF.
async fn pump_stdin(mut conn: BoxConn, fd: OwnedFd) {
    if let Err(e) = set_nonblocking(&fd) {
        tracing::error!(error = %e, "stdin fd");
        return;
    }
    let mut writer = match tokio::net::unix::pipe::Sender::from_owned_fd_unchecked(fd) {
        Ok(w) => w,
        Err(e) => {
            tracing::error!(error = %e, "stdin fd");
            return;
        }
    };
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if writer.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
}
