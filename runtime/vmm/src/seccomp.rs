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
    let raw = raw(kind);
    if raw.is_empty() {
        return Err(SeccompError::NoProfile(kind.as_str()));
    }
    Ok(raw
        .iter()
        .map(|&(code, jt, jf, k)| seccompiler::sock_filter { code, jt, jf, k })
        .collect())
}

/// Loads the filter of `kind` on the calling thread (and sets
/// `no_new_privs`, which seccomp requires). Irreversible.
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    let prog = filter(kind)?;
    seccompiler::apply_filter(&prog).map_err(|e| SeccompError::Load(kind.as_str(), e))?;
    tracing::debug!(
        kind = kind.as_str(),
        syscalls = allowed_syscalls(kind).len(),
        "seccomp filter loaded"
    );
    Ok(())
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
        let fd = std::os::fd::AsRawFd::as_raw_fd(&ram.memfd);
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
