//! The agent's side of the helper protocol: spawn `__container-helper`
//! with the process's stdio, read its one result line, register the new
//! pid with the reaper, ack, and collect the helper's exit.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{HelperRequest, HelperResult, HELPER_ARG, RESULT_FD};
use crate::container::error::ContainerError;
use crate::container::keyring::join_session_keyring;
use crate::container::stdio_fds::{bind_console_socket, receive_pty, to_stdio};
use crate::reaper::{ExitWatch, Reaper};

/// How long the helper may take to create a container or start an exec.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(30);

/// The last lines the helper logged, on one line: what libcontainer said
/// before it failed.
fn helper_log_tail(path: &Path) -> Option<String> {
    let tail = boxlite_protocol::log_tail::log_tail(path, 5)?;
    let joined = tail.lines().map(str::trim).collect::<Vec<_>>().join("; ");
    Some(joined.chars().take(1000).collect())
}

/// Reads the helper's one result line (at most 64 KiB); `None` on EOF
/// before a newline or a read error.
async fn read_result_line(stream: &mut tokio::net::UnixStream) -> Option<Vec<u8>> {
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        line.extend_from_slice(&buf[..n]);
        if let Some(end) = line.iter().position(|b| *b == b'\n') {
            line.truncate(end);
            return Some(line);
        }
        if line.len() > 64 * 1024 {
            return None;
        }
    }
}

/// Between fork and exec: puts `fd` at `target` without close-on-exec.
/// dup2 onto itself would keep the flag, so that case clears it instead.
fn move_fd(fd: RawFd, target: RawFd) -> std::io::Result<()> {
    // SAFETY: dup2/fcntl on fd numbers only; async-signal-safe.
    let rc = unsafe {
        if fd == target {
            libc::fcntl(fd, libc::F_SETFD, 0)
        } else {
            libc::dup2(fd, target)
        }
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Runs the helper and returns the new process's pid, its exit watch
/// (registered under the reaper lock), and the pty master if any.
pub async fn run(
    reaper: &Reaper,
    req: HelperRequest,
    process_fds: [Option<OwnedFd>; 3],
    op: &'static str,
) -> Result<(ExitWatch, Option<OwnedFd>), ContainerError> {
    let helper_err = |message: String| ContainerError::Helper { op, message };
    let console = req
        .console_socket
        .as_deref()
        .map(bind_console_socket)
        .transpose()?;
    let json = serde_json::to_string(&req).map_err(|e| helper_err(e.to_string()))?;
    let [stdin, stdout, stderr] = process_fds;
    let keyring = format!("_ses.{}", req.container_id);
    let keyring_c = CString::new(keyring.clone())
        .map_err(|_| helper_err(format!("container id {:?} has a NUL", req.container_id)))?;
    // The helper reports on fd RESULT_FD and waits for our ack (see the
    // helper module): a socket, so EOF tells us it died without a word.
    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(|source| ContainerError::Io {
            what: "create the helper's result socket",
            source,
        })?;
    let theirs_fd = theirs.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER_ARG)
        .arg(json)
        .stdin(to_stdio(stdin))
        .stdout(to_stdio(stdout))
        .stderr(to_stdio(stderr));
    // SAFETY: join_session_keyring and move_fd only make async-signal-safe
    // syscalls on fds and buffers that exist before the fork.
    unsafe {
        cmd.pre_exec(move || {
            join_session_keyring(&keyring_c)?;
            move_fd(theirs_fd, RESULT_FD)
        });
    }
    let started = Instant::now();
    let (_child, helper_watch) = reaper.spawn(&mut cmd).map_err(|e| {
        helper_err(format!(
            "{} (the helper joins the session keyring {keyring} before it runs)",
            boxlite_protocol::error_chain::chain(&e)
        ))
    })?;
    drop(cmd);
    drop(theirs);
    let helper_pid = helper_watch.pid();
    let kill_helper = || {
        let _ = nix::sys::signal::kill(Pid::from_raw(helper_pid), Signal::SIGKILL);
    };
    let mut ours = tokio::net::UnixStream::from_std({
        ours.set_nonblocking(true)
            .map_err(|source| ContainerError::Io {
                what: "set up the helper's result socket",
                source,
            })?;
        ours
    })
    .map_err(|source| ContainerError::Io {
        what: "set up the helper's result socket",
        source,
    })?;
    let line = match tokio::time::timeout(HELPER_TIMEOUT, read_result_line(&mut ours)).await {
        Ok(line) => line,
        Err(_) => {
            kill_helper();
            return Err(helper_err(format!("no answer within {HELPER_TIMEOUT:?}")));
        }
    };
    let result = line.and_then(|l| serde_json::from_slice::<HelperResult>(&l).ok());
    // Registered before the ack, while the process is the helper's child.
    let watch = match &result {
        Some(HelperResult::Started { pid }) => {
            let watch = reaper.lock_for_spawn().register_since(*pid, started);
            let _ = ours.write_all(b"k").await;
            Some(watch)
        }
        _ => None,
    };
    drop(ours);
    let status = match tokio::time::timeout(HELPER_TIMEOUT, helper_watch.wait()).await {
        Ok(Ok(e)) => e.status,
        Ok(Err(e)) => return Err(helper_err(e.to_string())),
        Err(_) => {
            kill_helper();
            return Err(helper_err(format!(
                "did not exit within {HELPER_TIMEOUT:?} after its result"
            )));
        }
    };
    let log_tail = helper_log_tail(&req.log_path);
    let _ = std::fs::remove_file(&req.log_path);
    let (pid, watch) = match (result, watch) {
        (Some(HelperResult::Started { pid }), Some(watch)) => (pid, watch),
        (Some(HelperResult::Failed { error }), _) => {
            return Err(helper_err(match log_tail {
                Some(tail) => format!("{error} (libcontainer: {tail})"),
                None => error,
            }))
        }
        _ => {
            return Err(helper_err(format!(
                "it exited with status {status} and no result{}",
                log_tail.map(|t| format!(" (log: {t})")).unwrap_or_default()
            )))
        }
    };
    let master = match console {
        Some(listener) => match receive_pty(listener).await {
            Ok(fd) => Some(fd),
            Err(e) => {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                return Err(e);
            }
        },
        None => None,
    };
    if let Some(path) = &req.console_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok((watch, master))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_log_tail_keeps_the_last_lines_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("exec-x.log");
        assert_eq!(helper_log_tail(&log), None, "no log");
        std::fs::write(&log, "\n\n").unwrap();
        assert_eq!(helper_log_tail(&log), None, "blank log");
        std::fs::write(&log, "a\nb\n\nc\nd\ne\nf\n  g  \n").unwrap();
        assert_eq!(helper_log_tail(&log).as_deref(), Some("c; d; e; f; g"));
    }
}
