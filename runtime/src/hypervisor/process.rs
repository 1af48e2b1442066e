//! Spawning and reaping the processes of a VM, shared by the backends:
//! the VMM process (`qemu` or `boxlite-vmm`) and its helper daemons
//! (the vsock backend, one `virtiofsd` per share). Each process has its
//! stdout/stderr in `<sandbox>/<stem>.log` (a size-capped log, copied from a
//! pipe: [`super::capped_log`]) and its pid in `<stem>.pid` (for
//! [`super::cleanup_stale_processes`]); tap fds go to the VMM process only.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::time::Instant;

use super::capped_log::{LogDrain, LogPipe};
use super::{ExitReport, HypervisorError, Share};
use crate::cgroup::CgroupJoiner;
use boxlite_protocol::log_tail::last_line;
use boxlite_vmm_api::process::vm_pids;

/// How long a helper daemon gets to create its socket.
pub const HELPER_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long we wait for a killed process to be reaped.
pub const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long we wait, once a process has exited, for its last output to
/// reach its log (the pump copies what is left in the pipe).
pub const LOG_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// Set to the sandbox directory in the environment of every process the
/// runtime spawns for a sandbox, so that `/proc/<pid>/environ` tells whose
/// it is (for operators and the end-to-end tests' leak checks).
pub const SANDBOX_DIR_ENV: &str = "BOXLITE_SANDBOX_DIR";

/// The vhost-user socket of a share's virtiofsd, in the sandbox directory.
pub fn fs_socket_name(tag: &str) -> String {
    format!("fs-{tag}.sock")
}

/// virtiofsd's arguments for `share` on vhost-user socket `socket`.
pub fn virtiofsd_args(socket: &Path, share: &Share) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec![
        "--socket-path".into(),
        socket.to_path_buf().into_os_string(),
        "--shared-dir".into(),
        share.host_dir.clone().into_os_string(),
        // virtiofsd's namespace sandbox: its own mount, pid and network
        // namespaces, `pivot_root` into the share. The share is a slave of
        // the shim's `mounts/` view (the shim's `rootfs::prepare_share`),
        // and so is virtiofsd's copy of it: the rootfs and volumes the shim
        // mounts later still reach the guest. Its seccomp filter (the
        // default, `--seccomp=kill`) stays on.
        "--sandbox=namespace".into(),
        "--cache=auto".into(),
        "--announce-submounts".into(),
        // Container images carry file capabilities and SELinux labels.
        "--xattr".into(),
    ];
    if share.read_only {
        args.push("--readonly".into());
    }
    args
}

/// Kills (SIGKILL) and reaps every process, last first (the VMM is last,
/// so helpers never see a live frontend lose its backend), removes their
/// pid files and then `files` (sockets, lock files).
pub fn kill_and_reap(id: &str, procs: &mut Vec<Proc>, files: &[PathBuf]) {
    for p in procs.iter_mut().rev() {
        if p.poll().is_none() {
            tracing::debug!(sandbox_id = %id, pid = p.pid, "killing {}", p.role.describe());
            p.kill_and_reap();
        }
    }
    for p in procs.drain(..) {
        let _ = std::fs::remove_file(&p.pid_file);
    }
    for file in files {
        match std::fs::remove_file(file) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(socket = %file.display(), error = %e, "cannot remove socket")
            }
        }
    }
}

/// Which process a [`Proc`] is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    Vsock,
    Fs(String),
    Qemu,
    /// `boxlite-vmm` (builtin backend).
    Vmm,
}

impl Role {
    /// For messages.
    pub fn describe(&self) -> String {
        match self {
            Role::Vsock => "the vsock backend".into(),
            Role::Fs(tag) => format!("virtiofsd for share {tag:?}"),
            Role::Qemu => "qemu".into(),
            Role::Vmm => "boxlite-vmm".into(),
        }
    }

    /// Base name of its log and pid files.
    pub fn stem(&self) -> String {
        match self {
            Role::Vsock => "vsock-backend".into(),
            Role::Fs(tag) => format!("virtiofsd-{tag}"),
            Role::Qemu => "qemu".into(),
            Role::Vmm => "boxlite-vmm".into(),
        }
    }
}

/// A spawned process we own.
#[derive(Debug)]
pub struct Proc {
    pub role: Role,
    child: Child,
    pub pid: u32,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// The socket a helper creates when it is ready.
    pub socket: Option<PathBuf>,
    status: Option<ExitStatus>,
    /// The pump copying its stdout/stderr into `log`.
    log_drain: LogDrain,
}

impl Proc {
    /// The exit status, once the process has exited (reaps it).
    pub fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.status = status,
                Err(e) => tracing::warn!(pid = self.pid, error = %e, "waitpid failed"),
            }
        }
        self.status
    }

    /// The last line of its log, once it has exited: waits (bounded) for
    /// the pump to copy the last of its output first.
    pub fn last_log_line(&self) -> Option<String> {
        self.log_drain.wait(LOG_DRAIN_TIMEOUT);
        last_line(&self.log)
    }

    pub fn signal(&mut self, signal: Signal) {
        if self.poll().is_some() {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(self.pid).expect("pids fit in i32"));
        if let Err(e) = kill(pid, signal) {
            tracing::warn!(pid = self.pid, %signal, error = %e, "cannot signal {}", self.role.describe());
        }
    }

    /// SIGKILL and reap, its children first. A jailed `boxlite-vmm` runs the
    /// VM in its only child ([`boxlite_vmm_api::process`]): killed first,
    /// the child is reaped by its parent, which then ends by the same
    /// signal, so the VM is gone (taps, memory, cgroup membership) when this
    /// returns and no orphan is left for init to reap.
    pub fn kill_and_reap(&mut self) -> Option<ExitStatus> {
        if kill_children(self.pid) > 0 {
            let until = std::time::Instant::now() + REAP_TIMEOUT;
            while self.poll().is_none() && std::time::Instant::now() < until {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        self.signal(Signal::SIGKILL);
        self.reap_blocking(REAP_TIMEOUT)
    }

    /// Blocks until the process is reaped or `limit` passes. Only used after
    /// SIGKILL, when exit takes milliseconds.
    pub fn reap_blocking(&mut self, limit: Duration) -> Option<ExitStatus> {
        let until = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.poll() {
                return Some(status);
            }
            if std::time::Instant::now() >= until {
                tracing::error!(
                    pid = self.pid,
                    "{} did not exit after SIGKILL",
                    self.role.describe()
                );
                return None;
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

/// SIGKILLs the direct children of `parent` (a jailed `boxlite-vmm`'s VM
/// process, [`boxlite_vmm_api::process::vm_pids`]); returns how many there
/// were.
pub(crate) fn kill_children(parent: u32) -> usize {
    let children = vm_pids(parent);
    for child in &children {
        if let Ok(pid) = i32::try_from(*child) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    children.len()
}

/// Where a process goes: its output into `<dir>/<stem>.log` (at most `cap`
/// bytes), itself into the cgroup `cgroup` joins (the pod's), and whose
/// credentials it runs with (`user`; None: ours).
#[derive(Debug, Clone, Copy)]
pub struct ProcessPlace<'a> {
    pub dir: &'a Path,
    pub cap: u64,
    pub cgroup: &'a CgroupJoiner,
    pub user: Option<&'a RunAs>,
}

/// Credentials a process starts with instead of ours: a uid and gid, only
/// the supplementary `groups` (say the group of `/dev/kvm`), and no
/// capabilities (a non-root uid after exec keeps none); and, with
/// `own_namespaces`, network, ipc and uts namespaces of its own, empty
/// (for a process that needs none of the host's: every fd it uses is
/// inherited).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub own_namespaces: bool,
}

impl RunAs {
    /// Enters the new namespaces (if asked), then sets the calling
    /// process's groups, gid and uid (in that order: after the uid change
    /// it could do none of it). For the child between fork and exec: raw
    /// syscalls only, which are async-signal-safe and change just this
    /// (single-threaded) process.
    fn become_self(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_long| {
            if rc < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        if self.own_namespaces {
            let flags = libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            // SAFETY: unshare with flags only.
            check(unsafe { libc::syscall(libc::SYS_unshare, flags) })?;
        }
        // SAFETY: integer arguments, and a pointer to `groups.len()` gid_t
        // values that outlive the call.
        unsafe {
            check(libc::syscall(
                libc::SYS_setgroups,
                self.groups.len(),
                self.groups.as_ptr(),
            ))?;
            check(libc::syscall(
                libc::SYS_setresgid,
                self.gid,
                self.gid,
                self.gid,
            ))?;
            check(libc::syscall(
                libc::SYS_setresuid,
                self.uid,
                self.uid,
                self.uid,
            ))
        }
    }
}

/// Spawns one process with its output in a capped `<dir>/<stem>.log`, in
/// the place's cgroup from its first instruction, and writes its pid file
/// `<dir>/<stem>.pid`. `inherit_fds` (tap fds, the console pipe) are
/// handed to this child only.
pub fn spawn_process(
    id: &str,
    place: ProcessPlace<'_>,
    role: Role,
    binary: &Path,
    args: Vec<OsString>,
    socket: Option<PathBuf>,
    inherit_fds: Vec<RawFd>,
) -> Result<Proc, HypervisorError> {
    let dir = place.dir;
    let stem = role.stem();
    let log = dir.join(format!("{stem}.log"));
    let io_err = |op, path: &Path, error| HypervisorError::Io {
        id: id.to_owned(),
        op,
        path: path.to_owned(),
        error,
    };
    let pipe =
        LogPipe::create(&log, place.cap).map_err(|e| io_err("cannot create log file", &log, e))?;
    let dup = |e| io_err("cannot duplicate the log pipe", &log, e);
    let out = File::from(pipe.writer().try_clone().map_err(dup)?);
    let err = File::from(pipe.writer().try_clone().map_err(dup)?);
    let mut cmd = Command::new(binary);
    cmd.args(&args).stdin(Stdio::null()).stdout(out).stderr(err);
    // Every process of a sandbox can be told by its environment, whatever
    // its arguments name (QEMU's name only fds).
    cmd.env(SANDBOX_DIR_ENV, dir);
    let cgroup = place.cgroup.clone();
    let user = place.user.cloned();
    if !inherit_fds.is_empty() || !cgroup.is_empty() || user.is_some() {
        // SAFETY: runs in the child between fork and exec; it only calls
        // fcntl, open, write and close, which are async-signal-safe, on
        // fds the parent owns and keeps open until spawn returns, and on
        // paths prepared before the fork; and, for `user`, the raw
        // unshare, setgroups, setresgid and setresuid syscalls on data
        // moved into the closure before the fork ([`RunAs::become_self`]). Clearing FD_CLOEXEC here hands
        // the tap fds to this child only: in the parent they stay
        // close-on-exec, so no other child inherits them. Joining the
        // cgroup before exec means no instruction of the process, nor a
        // child it forks at once (the jailed VMM does), runs outside it.
        // The credentials change last: joining the cgroup needs root's.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &inherit_fds {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                cgroup.join()?;
                match &user {
                    Some(user) => user.become_self(),
                    None => Ok(()),
                }
            });
        }
    }
    tracing::debug!(sandbox_id = %id, binary = %binary.display(), ?args, "spawning {}", role.describe());
    let spawned = cmd.spawn();
    // The child has its copies now (or none): ours must close, so the pump
    // sees end of file when the child exits. `cmd` holds the other two.
    drop(cmd);
    let log_drain = pipe.into_drain();
    let child = spawned.map_err(|error| HypervisorError::Spawn {
        id: id.to_owned(),
        what: role.describe(),
        binary: binary.to_owned(),
        error,
    })?;
    let pid = child.id();
    let pid_file = dir.join(format!("{stem}.pid"));
    let mut p = Proc {
        role,
        child,
        pid,
        log,
        pid_file: pid_file.clone(),
        socket,
        status: None,
        log_drain,
    };
    if let Err(e) = std::fs::write(&pid_file, format!("{pid}\n")) {
        p.kill_and_reap();
        return Err(io_err("cannot write pid file", &pid_file, e));
    }
    Ok(p)
}

/// Waits until every process with a `socket` has created it; fails at
/// once if one exits first, or after [`HELPER_READY_TIMEOUT`].
pub async fn wait_for_sockets(id: &str, procs: &mut [Proc]) -> Result<(), HypervisorError> {
    let started = Instant::now();
    loop {
        let mut pending = false;
        for p in procs.iter_mut() {
            let Some(socket) = p.socket.clone() else {
                continue;
            };
            if socket.exists() {
                continue;
            }
            if let Some(status) = p.poll() {
                return Err(HypervisorError::HelperExited(Box::new(ExitReport {
                    id: id.to_owned(),
                    what: p.role.describe(),
                    pid: p.pid,
                    status,
                    log: p.log.clone(),
                    last_line: p.last_log_line(),
                    socket: Some(socket),
                    console_log: None,
                })));
            }
            if started.elapsed() >= HELPER_READY_TIMEOUT {
                return Err(HypervisorError::HelperTimeout {
                    id: id.to_owned(),
                    what: p.role.describe(),
                    socket,
                    waited: HELPER_READY_TIMEOUT,
                    log: p.log.clone(),
                });
            }
            pending = true;
        }
        if !pending {
            return Ok(());
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

pub fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
