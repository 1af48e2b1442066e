//! The VMM's own pid namespace.
//!
//! `boxlite-vmm` forks once at start, before it opens anything: the child
//! becomes pid 1 of a new pid namespace and runs the VM; the parent (the
//! process the runtime spawned and tracks) only waits for it and exits as it
//! did. In its namespace the jailed VMM sees no other process, so no signal
//! it sends can reach one (the seccomp profile further allows `tgkill` only
//! with tgid 1, itself).
//!
//! The two are tied together both ways: the child dies with SIGKILL when the
//! parent dies (`PR_SET_PDEATHSIG`, checked against the race with a pipe
//! whose write end only the parent holds; the kernel clears the setting when
//! the child changes its uid, so [`ParentLink::rearm`] sets it again after
//! that), and the parent forwards SIGTERM,
//! SIGINT, SIGHUP and SIGQUIT to the child, which exits with 128 + the
//! signal (as its namespace's init it has to handle them to see them at
//! all), and re-raises the signal that killed the child (SIGSYS of a
//! seccomp kill stays visible to the runtime).
//! The parent closes every fd it inherited for the VM (console pipe,
//! taps) and keeps only CAP_KILL (the parent-death signal is permission-
//! checked like a kill, and the VM process runs as another uid) and runs
//! under its own seccomp profile (`reaper`): wait, signal, exit.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

use super::JailError;
use crate::threads::ThreadKind;

/// The child's pid (in the parent's namespace), for the signal forwarder.
static CHILD: AtomicI32 = AtomicI32::new(0);

/// Signals the parent passes on to the child.
const FORWARDED: [libc::c_int; 4] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// In the child: ends the process on a forwarded signal. As pid 1 of its
/// namespace it would otherwise ignore every signal it has no handler for
/// (the kernel's rule for a namespace's init), SIGTERM included.
extern "C" fn end_on_signal(sig: libc::c_int) {
    // SAFETY: _exit is async-signal-safe; nothing is left to clean up
    // that the kernel does not (fds, memory, taps).
    unsafe { libc::_exit(128 + sig) };
}

extern "C" fn forward(sig: libc::c_int) {
    let child = CHILD.load(Ordering::Relaxed);
    if child > 0 {
        // SAFETY: kill is async-signal-safe and takes plain integers.
        unsafe { libc::kill(child, sig) };
    }
}

fn os_err(what: &'static str) -> JailError {
    JailError::PidNamespace(what, io::Error::last_os_error())
}

/// The child's tie to its parent: the read end of a pipe whose only write
/// end the parent holds (a hang-up means the parent is gone).
#[derive(Debug)]
pub struct ParentLink {
    alive: OwnedFd,
}

impl ParentLink {
    /// Asks for SIGKILL when the parent dies, then checks it has not died
    /// already (exits at once if so). Needed again after every credential
    /// change, which clears the request.
    pub fn rearm(&self) -> Result<(), JailError> {
        // SAFETY: prctl with integers.
        if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) } != 0 {
            return Err(os_err("prctl(PR_SET_PDEATHSIG)"));
        }
        let mut pfd = libc::pollfd {
            fd: self.alive.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        if unsafe { libc::poll(&mut pfd, 1, 0) } != 0 {
            tracing::error!("the waiting parent is gone; the VMM ends");
            // SAFETY: nothing to clean up; nobody is waiting for us.
            unsafe { libc::_exit(crate::exit_code::JAIL_ERROR) };
        }
        Ok(())
    }
}

/// Forks into a new pid namespace. Returns in the child (pid 1 there); the
/// parent never returns. Call before any thread exists.
pub fn enter() -> Result<ParentLink, JailError> {
    // SAFETY: unshare with a flag only.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(os_err("unshare(CLONE_NEWPID)"));
    }
    let mut pipe = [0; 2];
    // SAFETY: `pipe` has room for the two fds.
    if unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe2"));
    }
    let [alive_r, alive_w] = pipe;
    // SAFETY: single-threaded here (main calls this first); the child
    // continues as a normal process.
    match unsafe { libc::fork() } {
        -1 => Err(os_err("fork")),
        0 => {
            // SAFETY: closing our copy of the write end.
            unsafe { libc::close(alive_w) };
            // SAFETY: `alive_r` is open and owned by nothing else.
            let alive = unsafe { OwnedFd::from_raw_fd(alive_r) };
            let link = ParentLink { alive };
            link.rearm()?;
            for sig in FORWARDED {
                // SAFETY: `end_on_signal` is async-signal-safe (one _exit).
                unsafe { libc::signal(sig, end_on_signal as *const () as libc::sighandler_t) };
            }
            Ok(link)
        }
        child => {
            // The parent holds nothing of the VM's (console pipe, taps):
            // every fd but stdio and the liveness pipe's write end closes.
            // SAFETY: close_range on fd numbers only; nothing else in this
            // process uses them from now on.
            unsafe {
                libc::syscall(libc::SYS_close_range, 3, alive_w - 1, 0);
                libc::syscall(libc::SYS_close_range, alive_w + 1, u32::MAX, 0);
            }
            reap(child)
        }
    }
}

/// The parent's whole life: forward signals, wait, exit as the child did.
fn reap(child: libc::pid_t) -> ! {
    CHILD.store(child, Ordering::Relaxed);
    for sig in FORWARDED {
        // SAFETY: `forward` is async-signal-safe (one kill).
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    tracing::debug!(
        child,
        "VMM runs in its own pid namespace; this process waits for it"
    );
    // No core dump when the child's signal is re-raised here.
    let _ = super::setrlimit("RLIMIT_CORE", libc::RLIMIT_CORE, 0, 0);
    // SAFETY: prctl with integers.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if let Err(e) = super::privileges::keep_only_kill() {
        tracing::warn!(error = %e, "the waiting parent keeps its capabilities");
    }
    if let Err(e) = crate::seccomp::apply(ThreadKind::Reaper) {
        tracing::error!(error = %e, "cannot filter the waiting parent; killing the VM");
        // SAFETY: integers only.
        unsafe { libc::kill(child, libc::SIGKILL) };
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(child, &mut status, 0) };
        if r == child {
            break;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // SAFETY: exiting; the child dies with us (PDEATHSIG).
            unsafe { libc::_exit(crate::exit_code::VMM_ERROR) };
        }
    }
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // SAFETY: restoring the default action, then raising it on ourselves.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            libc::raise(sig);
        }
        // SAFETY: the signal was ignored by default (not a killing one).
        unsafe { libc::_exit(128 + sig) };
    }
    // SAFETY: plain exit with the child's code.
    unsafe { libc::_exit(libc::WEXITSTATUS(status)) }
}
