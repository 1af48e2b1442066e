//! Per-thread-kind seccomp filters, compiled at build time.
//!
//! `build.rs` compiles `seccomp-profiles/x86_64/<kind>.json` (seccompiler
//! JSON: an allow-list whose mismatch action is `kill_process`) into BPF and
//! writes it as Rust arrays; this module turns them back into
//! [`seccompiler::BpfProgram`]s and loads them on the calling thread.
//! `threads::spawn_thread` loads the kind's filter in every new thread before
//! its body runs, and `builder::run_vm` loads the `vmm` filter on the event
//! loop thread before the first vCPU is resumed.

use crate::threads::ThreadKind;

mod generated {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// Errors of loading a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("No seccomp profile is compiled in for thread kind {0} on this architecture")]
    NoProfile(&'static str),
    #[error("Failed to load the seccomp filter for thread kind {0}")]
    Load(&'static str, #[source] seccompiler::Error),
}

fn raw(kind: ThreadKind) -> &'static [(u16, u8, u8, u32)] {
    match kind {
        ThreadKind::Vmm => generated::FILTER_VMM,
        ThreadKind::Vcpu => generated::FILTER_VCPU,
        ThreadKind::Reaper => generated::FILTER_REAPER,
        ThreadKind::VsockBackend => generated::FILTER_VSOCK,
    }
}

/// The syscalls the profile of `kind` allows (some only with given arguments).
pub fn allowed_syscalls(kind: ThreadKind) -> &'static [&'static str] {
    match kind {
        ThreadKind::Vmm => generated::SYSCALLS_VMM,
        ThreadKind::Vcpu => generated::SYSCALLS_VCPU,
        ThreadKind::Reaper => generated::SYSCALLS_REAPER,
        ThreadKind::VsockBackend => generated::SYSCALLS_VSOCK,
    }
}

/// The compiled BPF program of `kind`.
pub fn filter(kind: ThreadKind) -> Result<seccompiler::BpfProgram, SeccompError> {
    program(kind.as_str(), raw(kind))
}

fn program(
    name: &'static str,
    raw: &[(u16, u8, u8, u32)],
) -> Result<seccompiler::BpfProgram, SeccompError> {
    if raw.is_empty() {
        return Err(SeccompError::NoProfile(name));
    }
    Ok(raw
        .iter()
        .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
        .collect())
}

fn load(
    name: &'static str,
    prog: &seccompiler::BpfProgram,
    syscalls: usize,
) -> Result<(), SeccompError> {
    // Logged before, not after: once loaded, the filter may forbid the
    // `write` the log line needs (the reaper's does).
    tracing::debug!(kind = name, syscalls, "loading the seccomp filter");
    seccompiler::apply_filter(prog).map_err(|e| SeccompError::Load(name, e))
}

/// Loads the filter of `kind` on the calling thread (and sets
/// `no_new_privs`, which seccomp requires). Irreversible.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    load(kind.as_str(), &filter(kind)?, allowed_syscalls(kind).len())
}

/// The syscalls of the event loop of a VMM started with `snapshot_dir`:
/// the `vmm` profile's, plus `openat` (with exactly the flags that create
/// a new file, never through a symlink) and `ftruncate`, which the
/// `snapshot` op needs to write its two files (`seccomp-profiles/x86_64/
/// vmm-snapshots.json`).
pub fn snapshot_event_loop_syscalls() -> &'static [&'static str] {
    generated::SYSCALLS_VMM_SNAPSHOTS
}

/// Loads the event loop's filter on the calling thread: the `vmm` profile,
/// or its snapshot extension for a VMM started with `snapshot_dir`, so
/// that no other VMM may create a file at all.
pub fn apply_event_loop(snapshots: bool) -> Result<(), SeccompError> {
    if !snapshots {
        return apply(ThreadKind::Vmm);
    }
    let prog = program("vmm_snapshots", generated::FILTER_VMM_SNAPSHOTS)?;
    load("vmm_snapshots", &prog, snapshot_event_loop_syscalls().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_a_profile() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu] {
            let f = filter(kind).expect("profile");
            assert!(f.len() > 10, "{kind:?}");
            let names = allowed_syscalls(kind);
            for must in ["read", "write", "futex", "ioctl", "rt_sigreturn"] {
                assert!(names.contains(&must), "{kind:?} lacks {must}");
            }
            for never in NEVER {
                assert!(!names.contains(&never), "{kind:?} allows {never}");
            }
        }
    }

    /// Never allowed in a VMM or vsock backend thread. `socket` and
    /// `connect`: every connection is made before the jail.
    const NEVER: [&str; 9] = [
        "execve", "fork", "clone", "clone3", "ptrace", "openat", "mount", "socket", "connect",
    ];

    #[test]
    fn only_a_vmm_that_takes_snapshots_may_create_files() {
        let base = allowed_syscalls(ThreadKind::Vmm);
        let snapshots = snapshot_event_loop_syscalls();
        for s in base {
            assert!(snapshots.contains(s), "the extension lacks {s}");
        }
        let added: Vec<_> = snapshots.iter().filter(|s| !base.contains(s)).collect();
        assert_eq!(added, [&"ftruncate", &"openat"]);
        for never in NEVER.iter().filter(|n| **n != "openat") {
            assert!(!snapshots.contains(never), "the extension allows {never}");
        }
        // Under it, a new file is created; anything else openat could do
        // (here: open an existing file) is refused. Each in a child
        // process: a refused call kills the process that makes it.
        let dir = tempfile::tempdir().expect("tempdir");
        let path =
            std::ffi::CString::new(dir.path().join("new").into_os_string().into_encoded_bytes())
                .expect("path");
        let existing = std::ffi::CString::new("/etc/hostname").expect("path");
        // Built here: the forked child of this multi-threaded process must
        // not allocate.
        let prog = program("vmm_snapshots", generated::FILTER_VMM_SNAPSHOTS).expect("profile");
        let under_filter = |path: &std::ffi::CStr, flags: libc::c_int| {
            // SAFETY: fork in a test; the child only loads the filter (no
            // allocation), makes one syscall and exits, never returning
            // into the test harness.
            match unsafe { libc::fork() } {
                0 => {
                    let code = match seccompiler::apply_filter(&prog) {
                        // SAFETY: a raw openat with a NUL-terminated path.
                        Ok(()) => match unsafe {
                            libc::syscall(
                                libc::SYS_openat,
                                libc::AT_FDCWD,
                                path.as_ptr(),
                                flags,
                                0o600,
                            )
                        } {
                            fd if fd >= 0 => 0,
                            _ => 1,
                        },
                        Err(_) => 2,
                    };
                    // SAFETY: ends the child without running the parent's destructors.
                    unsafe { libc::_exit(code) }
                }
                pid => {
                    let mut status = 0;
                    // SAFETY: waits for our own child.
                    unsafe { libc::waitpid(pid, &mut status, 0) };
                    status
                }
            }
        };
        let create =
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW;
        let status = under_filter(&path, create);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "create: {status:#x}"
        );
        assert!(dir.path().join("new").exists());
        let status = under_filter(&existing, libc::O_RDONLY | libc::O_CLOEXEC);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "open for reading: {status:#x}"
        );
    }

    #[test]
    fn the_vsock_backend_may_make_threads_but_not_programs_or_files() {
        let names = allowed_syscalls(ThreadKind::VsockBackend);
        for must in ["clone3", "recvmsg", "mmap", "accept4"] {
            assert!(names.contains(&must), "vsock lacks {must}");
        }
        // No KVM, no disks, no files opened: guest memory and every other
        // fd arrive over the vhost-user socket.
        for never in NEVER.iter().filter(|n| **n != "clone3").chain(&[
            "kill",
            "fallocate",
            "pwrite64",
            "open",
            "creat",
        ]) {
            assert!(!names.contains(never), "vsock allows {never}");
        }
    }

    #[test]
    fn the_waiting_parent_may_only_wait_signal_and_exit() {
        let names = allowed_syscalls(ThreadKind::Reaper);
        for must in ["wait4", "kill", "exit_group", "rt_sigreturn"] {
            assert!(names.contains(&must), "reaper lacks {must}");
        }
        for never in NEVER.iter().chain(&["read", "write", "ioctl"]) {
            assert!(!names.contains(never), "reaper allows {never}");
        }
    }

    #[test]
    fn only_the_event_loop_may_punch_holes_in_guest_memory() {
        // virtio-balloon runs on the event loop (`vmm`); vCPU threads only
        // touch its config space.
        assert!(allowed_syscalls(ThreadKind::Vmm).contains(&"fallocate"));
        assert!(!allowed_syscalls(ThreadKind::Vcpu).contains(&"fallocate"));
        assert!(!allowed_syscalls(ThreadKind::Reaper).contains(&"fallocate"));
        // Under the vmm filter the balloon's discard goes through (a
        // refused one would kill the test process with SIGSYS).
        let ram = crate::vstate::memory::create_guest_memory(1 << 20).expect("memfd");
        let fd = std::os::fd::AsRawFd::as_raw_fd(ram.memfd.as_ref().expect("memfd"));
        let h = std::thread::spawn(move || {
            apply(ThreadKind::Vmm).expect("load");
            // SAFETY: punches one page of our own memfd.
            unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    0,
                    4096,
                )
            }
        });
        assert_eq!(h.join().expect("join"), 0);
    }

    #[test]
    fn a_filtered_thread_still_runs_allowed_syscalls() {
        // Only this thread is filtered; it ends right after.
        let h = std::thread::spawn(|| {
            apply(ThreadKind::Vcpu).expect("load");
            let v: Vec<u8> = vec![7; 1 << 20];
            v.iter().map(|&b| u64::from(b)).sum::<u64>()
        });
        assert_eq!(h.join().expect("join"), 7 << 20);
    }
}
