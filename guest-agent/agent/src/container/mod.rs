//! The container service: containers and their processes, created and
//! started with youki's `libcontainer` in a single-threaded helper
//! ([`helper`]), watched by the agent's reaper, controlled through their
//! cgroup ([`cgroup`]).
//!
//! State machine of a container: `Created` → (StartContainer) `Running` ⇄
//! `Paused` → `Stopped` (the init process exited). Illegal transitions are
//! FAILED_PRECONDITION.

pub mod cgroup;
pub mod device_filter;
pub mod helper;
pub mod process;
pub mod spec;

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::LinuxCapabilities;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::helper::{HelperOp, HelperRequest, HelperResult, HELPER_ARG};
use self::process::{Exit, Process, STREAM_CONNECT_TIMEOUT};
use self::spec::{CreateRequest, ExecRequest, Stdio};
use crate::config::Config;
use crate::reaper::Reaper;

/// Guest directory of libcontainer's state (one directory per container).
pub const STATE_ROOT: &str = "/run/boxlite/containers";
/// Guest directory of the bundles the agent writes (config.json, exec
/// Process files, console sockets).
pub const BUNDLE_ROOT: &str = "/run/boxlite/bundles";
/// How long the helper may take to create a container or start an exec.
pub const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// RemoveContainer's wait for the processes to die when timeout_secs is 0.
pub const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("{field} {id:?} is invalid: {why}")]
    InvalidId {
        field: &'static str,
        id: String,
        why: String,
    },
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("rootfs {0} does not exist or is not a directory")]
    RootfsMissing(PathBuf),
    #[error("signal {0} is not a valid signal number")]
    InvalidSignal(u32),
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("exec {exec_id:?} not found in container {container_id:?}")]
    ExecNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("container {0:?} already exists")]
    AlreadyExists(String),
    #[error("exec {exec_id:?} already exists in container {container_id:?}")]
    ExecExists {
        container_id: String,
        exec_id: String,
    },
    #[error("cannot {op} container {id:?}: it is {state}")]
    State {
        op: &'static str,
        id: String,
        state: &'static str,
    },
    #[error("the {process} of container {container_id:?} has already exited")]
    Exited {
        container_id: String,
        process: String,
    },
    #[error("{0}")]
    Precondition(String),
    #[error(
        "the {process} of container {container_id:?}: stdio stream(s) {missing} did not \
         connect within {timeout:?}"
    )]
    StreamsMissing {
        container_id: String,
        process: String,
        missing: String,
        timeout: Duration,
    },
    #[error("container helper failed to {op}: {message}")]
    Helper { op: &'static str, message: String },
    #[error("Failed to {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {what} failed: {message}")]
    Cgroup { what: &'static str, message: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Created => "created, not started",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }
}

pub struct Container {
    pub id: String,
    pub cgroup_path: PathBuf,
    bundle: PathBuf,
    state_dir: PathBuf,
    state: Mutex<State>,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    exec_added: tokio::sync::Notify,
    /// The init's capabilities (after [`runc_capabilities`]): what an exec
    /// without `capabilities` gets.
    capabilities: LinuxCapabilities,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A process's capabilities as runc reads them. libcontainer 0.7 reads
/// them differently, and the difference only ever grants more:
/// - no `capabilities` object: runc gives a container's init none at all
///   and an exec the init's; libcontainer drops nothing, so the process
///   kept every capability of the agent (root).
/// - a set left out (`"capabilities": {"bounding": […]}`): runc makes it
///   empty; libcontainer leaves effective, permitted, inheritable and
///   ambient as the agent had them.
///
/// So every set is made explicit before libcontainer sees the spec:
/// `inherit` for a missing object (the init's capabilities for an exec,
/// none for an init), empty for a missing set.
fn runc_capabilities(
    caps: Option<&LinuxCapabilities>,
    inherit: Option<&LinuxCapabilities>,
) -> LinuxCapabilities {
    let none = || Some(Default::default());
    let empty = LinuxCapabilities::default()
        .set_bounding(none())
        .set_effective(none())
        .set_inheritable(none())
        .set_permitted(none())
        .set_ambient(none())
        .clone();
    let Some(caps) = caps.or(inherit) else {
        return empty;
    };
    let mut c = caps.clone();
    let or_empty = |set: &Option<oci_spec::runtime::Capabilities>| set.clone().or(none());
    c.set_bounding(or_empty(caps.bounding()))
        .set_effective(or_empty(caps.effective()))
        .set_inheritable(or_empty(caps.inheritable()))
        .set_permitted(or_empty(caps.permitted()))
        .set_ambient(or_empty(caps.ambient()));
    c
}

/// runc's HOME: a process whose env has no (or an empty) HOME gets its
/// user's home from the container's /etc/passwd, and `/` when the uid has
/// no entry there. libcontainer does the first part itself (after
/// pivot_root) but leaves HOME out for an unknown uid, so a program run as
/// `--user 4242` saw no HOME under BoxLite and `HOME=/` under runc (found
/// by tests/runc_differential.rs). `root` is the container's root as the
/// agent sees it.
fn runc_default_home(process: &mut oci_spec::runtime::Process, root: &Path) {
    let env = process.env().clone().unwrap_or_default();
    if env
        .iter()
        .any(|e| e.strip_prefix("HOME=").is_some_and(|v| !v.is_empty()))
    {
        return;
    }
    let uid = process.user().uid().to_string();
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let known = passwd
        .lines()
        .any(|l| l.split(':').nth(2) == Some(uid.as_str()));
    if !known {
        let mut env: Vec<String> = env
            .into_iter()
            .filter(|e| !e.starts_with("HOME="))
            .collect();
        env.push("HOME=/".to_owned());
        process.set_env(Some(env));
    }
}

impl Container {
    pub fn state(&self) -> State {
        *lock(&self.state)
    }

    fn check_state(&self, op: &'static str, allowed: &[State]) -> Result<(), ContainerError> {
        let state = self.state();
        if allowed.contains(&state) {
            Ok(())
        } else {
            Err(ContainerError::State {
                op,
                id: self.id.clone(),
                state: state.name(),
            })
        }
    }

    /// The process named by `exec_id` (empty: init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_string(),
            })
    }

    /// Like [`Self::process`], but waits up to `timeout` for an exec that
    /// ExecProcess has not registered yet (its streams may come first).
    pub async fn process_eventually(
        &self,
        exec_id: &str,
        timeout: Duration,
    ) -> Result<Arc<Process>, ContainerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.exec_added.notified();
            match self.process(exec_id) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn cgroup(&self) -> Result<cgroup::Cgroup, ContainerError> {
        cgroup::Cgroup::open(&self.id, &self.cgroup_path)
    }
}

/// All containers of the sandbox.
#[derive(Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Arc<Container>>>,
    /// Serialises creates so a duplicate id is refused cleanly.
    creating: tokio::sync::Mutex<()>,
    pub oom: cgroup::OomEvents,
}

/// Pipes for the declared streams: (agent ends, process ends), plus the
/// read ends of output the host did not ask for, which the agent drains
/// and drops. Undeclared output cannot simply be `/dev/null`: libcontainer
/// 0.7 re-opens a `/dev/null` stdio fd inside the container read-only
/// (`reopen_dev_null`), so the process's writes would fail with EBADF.
struct Pipes {
    agent: [Option<OwnedFd>; 3],
    process: [Option<OwnedFd>; 3],
    discard: Vec<OwnedFd>,
}

impl Pipes {
    /// Drops whatever the process writes to undeclared stdout/stderr.
    fn spawn_discards(&mut self) {
        for fd in self.discard.drain(..) {
            tokio::spawn(process::discard_output(fd));
        }
    }
}

fn pipes(stdio: Stdio) -> Result<Pipes, ContainerError> {
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

/// `KEY_USR_SEARCH` (linux/key.h): the owner may find the keyring by name.
const KEY_USR_SEARCH: u32 = 0x0008_0000;

/// The session keyring of a container, as runc sets it up: every process
/// of the container (its init and every exec) joins the keyring
/// `_ses.<container id>`, created on the first join, so containers do not
/// share the agent's session keyring (libcontainer 0.7 does no keyring
/// set-up at all), and the keyring gets runc's extra permission bit
/// `KEY_USR_SEARCH` so that the next exec can join it by name.
///
/// Runs in the helper between fork and exec: raw syscalls on memory that
/// exists before the fork, no allocation, no locks. A kernel without keys
/// (ENOSYS) is not an error, as in runc.
fn join_session_keyring(name: &CStr) -> std::io::Result<()> {
    let keyctl = |op: u32, a: libc::c_ulong, b: libc::c_ulong, c: libc::c_ulong| {
        // SAFETY: keyctl(2) with plain integers or pointers into live
        // buffers (`name`, `buf` below) and their true lengths.
        let rc = unsafe { libc::syscall(libc::SYS_keyctl, op as libc::c_ulong, a, b, c) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    let id = match keyctl(
        libc::KEYCTL_JOIN_SESSION_KEYRING,
        name.as_ptr() as libc::c_ulong,
        0,
        0,
    ) {
        Ok(id) => id as libc::c_ulong,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(()),
        Err(e) => return Err(e),
    };
    // "type;uid;gid;perm;description": the perm field is the 4th, in hex.
    let mut buf = [0u8; 512];
    let len = keyctl(
        libc::KEYCTL_DESCRIBE,
        id,
        buf.as_mut_ptr() as libc::c_ulong,
        buf.len() as libc::c_ulong,
    )?;
    let desc = &buf[..(len as usize).min(buf.len())];
    let field = desc.split(|&b| b == b';').nth(3).unwrap_or_default();
    if field.is_empty() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut perm: u32 = 0;
    for &b in field {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        perm = perm.wrapping_shl(4) | u32::from(digit);
    }
    keyctl(
        libc::KEYCTL_SETPERM,
        id,
        libc::c_ulong::from(perm | KEY_USR_SEARCH),
        0,
    )?;
    Ok(())
}

fn to_stdio(fd: Option<OwnedFd>) -> std::process::Stdio {
    fd.map(std::process::Stdio::from)
        .unwrap_or_else(std::process::Stdio::null)
}

/// The last lines the helper logged, on one line: what libcontainer said
/// before it failed.
fn helper_log_tail(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.is_empty() {
        return None;
    }
    let tail = lines[lines.len().saturating_sub(5)..].join("; ");
    Some(tail.chars().take(1000).collect())
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
async fn run_helper(
    reaper: &Reaper,
    req: HelperRequest,
    process_fds: [Option<OwnedFd>; 3],
    op: &'static str,
) -> Result<(crate::reaper::ExitWatch, Option<OwnedFd>), ContainerError> {
    let helper_err = |message: String| ContainerError::Helper { op, message };
    let console = match &req.console_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            Some(
                UnixListener::bind(path).map_err(|source| ContainerError::Io {
                    what: "bind the console socket",
                    source,
                })?,
            )
        }
        None => None,
    };
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
            move_fd(theirs_fd, helper::RESULT_FD)
        });
    }
    let started = Instant::now();
    let (_child, helper_watch) = reaper.spawn(&mut cmd).map_err(|e| {
        helper_err(format!(
            "{} (the helper joins the session keyring {keyring} before it runs)",
            crate::error::chain(&e)
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

/// Accepts libcontainer's connection on the console socket and receives the
/// pty master it sends with SCM_RIGHTS. The connection is already queued.
async fn receive_pty(listener: UnixListener) -> Result<OwnedFd, ContainerError> {
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

impl Containers {
    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.map)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    pub async fn create(
        &self,
        config: &Config,
        reaper: &Reaper,
        mut req: CreateRequest,
    ) -> Result<(), ContainerError> {
        let _creating = self.creating.lock().await;
        if lock(&self.map).contains_key(&req.id) {
            return Err(ContainerError::AlreadyExists(req.id));
        }
        let state_root = config.resolve(Path::new(STATE_ROOT));
        let bundle = config.resolve(Path::new(BUNDLE_ROOT)).join(&req.id);
        let state_dir = state_root.join(&req.id);
        let io_err = |what| move |source| ContainerError::Io { what, source };
        // Leftovers of an earlier container with this id (removed or failed).
        let _ = std::fs::remove_dir_all(&state_dir);
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(&bundle).map_err(io_err("create the bundle directory"))?;
        std::fs::create_dir_all(&state_root).map_err(io_err("create the state directory"))?;
        // validate_create checked that the spec has a process.
        let capabilities = match req.spec.process().clone() {
            Some(mut process) => {
                if let Some(root) = req.spec.root() {
                    runc_default_home(&mut process, root.path());
                }
                let caps = runc_capabilities(process.capabilities().as_ref(), None);
                process.set_capabilities(Some(caps.clone()));
                req.spec.set_process(Some(process));
                caps
            }
            None => runc_capabilities(None, None),
        };
        let spec_json = serde_json::to_vec(&req.spec)
            .map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
        std::fs::write(bundle.join("config.json"), spec_json)
            .map_err(io_err("write config.json"))?;

        let process = Process::new("", req.stdio);
        let result = async {
            let mut pipes = pipes(req.stdio)?;
            pipes.spawn_discards();
            let helper_req = HelperRequest {
                op: HelperOp::Create {
                    bundle: bundle.clone(),
                },
                container_id: req.id.clone(),
                state_root: state_root.clone(),
                console_socket: req.stdio.terminal.then(|| bundle.join("console.sock")),
                log_path: bundle.join("create.log"),
            };
            let (watch, master) =
                run_helper(reaper, helper_req, pipes.process, "create the container").await?;
            let [i, o, e] = pipes.agent;
            process.set_fds(i, o, e);
            if let Some(master) = master {
                process.set_pty(master)?;
            }
            Ok::<_, ContainerError>(watch)
        }
        .await;
        let watch = match result {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&state_dir);
                let _ = std::fs::remove_dir_all(&bundle);
                if let Ok(cg) = cgroup::Cgroup::open(&req.id, &req.cgroup_path) {
                    cg.remove();
                }
                return Err(e);
            }
        };
        let container = Arc::new(Container {
            id: req.id.clone(),
            cgroup_path: req.cgroup_path.clone(),
            bundle,
            state_dir,
            state: Mutex::new(State::Created),
            init: process.clone(),
            execs: Mutex::new(HashMap::new()),
            exec_added: tokio::sync::Notify::new(),
            capabilities,
        });
        let weak = Arc::downgrade(&container);
        process.started(watch, move |_exit: Exit| {
            if let Some(c) = weak.upgrade() {
                *lock(&c.state) = State::Stopped;
            }
        });
        self.oom.watch(&container.id, &container.cgroup_path);
        lock(&self.map).insert(req.id.clone(), container);
        tracing::info!(container_id = %req.id, pid = ?process.pid(), "container created");
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<i32, ContainerError> {
        let c = self.get(id)?;
        c.check_state("start", &[State::Created])?;
        c.init.wait_streams(id, STREAM_CONNECT_TIMEOUT).await?;
        // Another StartContainer may have won while we waited.
        {
            let mut state = lock(&c.state);
            if *state != State::Created {
                return Err(ContainerError::State {
                    op: "start",
                    id: id.to_string(),
                    state: state.name(),
                });
            }
            *state = State::Running;
        }
        c.init.start_pumps();
        let state_dir = c.state_dir.clone();
        let started = tokio::task::spawn_blocking(move || {
            libcontainer::container::Container::load(state_dir)
                .and_then(|mut lc| lc.start())
                .map_err(|e| crate::error::chain(&e))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(message) = started {
            *lock(&c.state) = State::Created;
            return Err(ContainerError::Helper {
                op: "start the container",
                message,
            });
        }
        let pid = c.init.pid().unwrap_or(0);
        tracing::info!(container_id = %id, pid, "container started");
        Ok(pid)
    }

    pub async fn exec(
        &self,
        config: &Config,
        reaper: &Reaper,
        mut req: ExecRequest,
    ) -> Result<i32, ContainerError> {
        let c = self.get(&req.container_id)?;
        c.check_state("exec in", &[State::Running])?;
        let process = {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(ContainerError::ExecExists {
                    container_id: req.container_id.clone(),
                    exec_id: req.exec_id.clone(),
                });
            }
            let p = Process::new(&req.exec_id, req.stdio);
            execs.insert(req.exec_id.clone(), p.clone());
            p
        };
        c.exec_added.notify_waiters();
        let result = async {
            process
                .wait_streams(&req.container_id, STREAM_CONNECT_TIMEOUT)
                .await?;
            c.check_state("exec in", &[State::Running])?;
            let process_json = c.bundle.join(format!("exec-{}.json", req.exec_id));
            // The init's root (its pivot_root) is the container's: what
            // the exec's /etc/passwd will be.
            if let Some(pid) = c.init.pid() {
                runc_default_home(&mut req.process, Path::new(&format!("/proc/{pid}/root")));
            }
            let caps =
                runc_capabilities(req.process.capabilities().as_ref(), Some(&c.capabilities));
            req.process.set_capabilities(Some(caps));
            let json = serde_json::to_vec(&req.process)
                .map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
            std::fs::write(&process_json, json).map_err(|source| ContainerError::Io {
                what: "write the exec process file",
                source,
            })?;
            let mut pipes = pipes(req.stdio)?;
            pipes.spawn_discards();
            let helper_req = HelperRequest {
                op: HelperOp::Exec {
                    process_json: process_json.clone(),
                },
                container_id: req.container_id.clone(),
                state_root: config.resolve(Path::new(STATE_ROOT)),
                console_socket: req
                    .stdio
                    .terminal
                    .then(|| c.bundle.join(format!("exec-{}.console.sock", req.exec_id))),
                log_path: c.bundle.join(format!("exec-{}.log", req.exec_id)),
            };
            let outcome = run_helper(reaper, helper_req, pipes.process, "exec the process").await;
            let _ = std::fs::remove_file(&process_json);
            let (watch, master) = outcome?;
            let [i, o, e] = pipes.agent;
            process.set_fds(i, o, e);
            if let Some(master) = master {
                process.set_pty(master)?;
            }
            Ok::<_, ContainerError>(watch)
        }
        .await;
        let watch = match result {
            Ok(w) => w,
            Err(e) => {
                lock(&c.execs).remove(&req.exec_id);
                return Err(e);
            }
        };
        process.start_pumps();
        process.started(watch, |_| {});
        let pid = process.pid().unwrap_or(0);
        tracing::info!(container_id = %req.container_id, exec_id = %req.exec_id, pid, "exec started");
        Ok(pid)
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, ContainerError> {
        let p = self.get(id)?.process(exec_id)?;
        Ok(p.wait().await)
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or(ContainerError::InvalidSignal(signal))?;
        let c = self.get(id)?;
        let p = c.process(exec_id)?;
        if all {
            for pid in c.cgroup()?.pids()? {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        let exited = || ContainerError::Exited {
            container_id: id.to_string(),
            process: p.name(),
        };
        if p.exit().is_some() {
            return Err(exited());
        }
        let pid = p.pid().ok_or_else(exited)?;
        match nix::sys::signal::kill(Pid::from_raw(pid), sig) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ESRCH) => Err(exited()),
            Err(e) => Err(ContainerError::Io {
                what: "send the signal",
                source: e.into(),
            }),
        }
    }

    pub fn list(&self, id: &str) -> Result<Vec<(i32, String)>, ContainerError> {
        let c = self.get(id)?;
        let execs: HashMap<i32, String> = lock(&c.execs)
            .values()
            .filter_map(|p| p.pid().map(|pid| (pid, p.exec_id.clone())))
            .collect();
        let mut pids = c.cgroup()?.pids()?;
        pids.sort_unstable();
        Ok(pids
            .into_iter()
            .map(|pid| (pid, execs.get(&pid).cloned().unwrap_or_default()))
            .collect())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let p = self.get(id)?.process(exec_id)?;
        if !p.stdio.stdin {
            return Err(ContainerError::Precondition(format!(
                "the {} of container {id:?} has no stdin",
                p.name()
            )));
        }
        p.close_stdin();
        Ok(())
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ContainerError> {
        let p = self.get(id)?.process(exec_id)?;
        let (rows, cols) = match (u16::try_from(rows), u16::try_from(cols)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => {
                return Err(ContainerError::InvalidSpec(format!(
                    "pty size {rows}x{cols} exceeds 65535"
                )))
            }
        };
        p.resize(rows, cols).map_err(ContainerError::Precondition)
    }

    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        c.check_state("pause", &[State::Running])?;
        c.cgroup()?.freeze(true)?;
        *lock(&c.state) = State::Paused;
        tracing::info!(container_id = %id, "container paused");
        Ok(())
    }

    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        c.check_state("resume", &[State::Paused])?;
        c.cgroup()?.freeze(false)?;
        *lock(&c.state) = State::Running;
        tracing::info!(container_id = %id, "container resumed");
        Ok(())
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let resources = spec::parse_resources(resources_json)?;
        let c = self.get(id)?;
        c.check_state("update", &[State::Created, State::Running, State::Paused])?;
        c.cgroup()?.update(&resources)
    }

    pub fn stats(&self, id: &str) -> Result<cgroup::Stats, ContainerError> {
        self.get(id)?.cgroup()?.stats()
    }

    /// Kills what is left of the container (SIGKILL to its cgroup, thawed
    /// first), waits up to `timeout` for the init's exit, and removes the
    /// cgroup, the state and the bundle.
    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        if c.init.exit().is_none() {
            if let Ok(cg) = c.cgroup() {
                if c.state() == State::Paused {
                    let _ = cg.freeze(false);
                }
                for pid in cg.pids().unwrap_or_default() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            if let Some(pid) = c.init.pid() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if tokio::time::timeout(timeout, c.init.wait()).await.is_err() {
                return Err(ContainerError::Precondition(format!(
                    "container {id:?} did not exit within {timeout:?} of SIGKILL"
                )));
            }
        }
        lock(&self.map).remove(id);
        self.oom.unwatch(id);
        if let Ok(cg) = c.cgroup() {
            cg.remove();
        }
        let _ = std::fs::remove_dir_all(&c.state_dir);
        let _ = std::fs::remove_dir_all(&c.bundle);
        tracing::info!(container_id = %id, "container removed");
        Ok(())
    }
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

    #[test]
    fn home_defaults_to_slash_for_a_uid_without_passwd_entry() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        let process = |uid: u32, env: &[&str]| {
            let mut p = oci_spec::runtime::Process::default();
            p.set_user(oci_spec::runtime::User::default().set_uid(uid).clone());
            p.set_env(Some(env.iter().map(|e| e.to_string()).collect()));
            p
        };
        let home = |uid: u32, env: &[&str]| {
            let mut p = process(uid, env);
            runc_default_home(&mut p, root.path());
            p.env().clone().unwrap()
        };
        // Known users: left to libcontainer (their passwd home), as is a set HOME.
        assert_eq!(home(1000, &["PATH=/bin"]), ["PATH=/bin"]);
        assert_eq!(home(4242, &["HOME=/data"]), ["HOME=/data"]);
        // Unknown uid: runc's default, also for an empty HOME.
        assert_eq!(home(4242, &["PATH=/bin"]), ["PATH=/bin", "HOME=/"]);
        assert_eq!(home(4242, &["HOME=", "A=b"]), ["A=b", "HOME=/"]);
    }
}
