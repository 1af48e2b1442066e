//! The one helper every VMM thread is spawned through.
//!
//! Every thread has a [`ThreadKind`]. When the jail is on
//! ([`enable_seccomp`]), [`spawn_thread`] loads the kind's seccomp filter
//! (`seccomp-profiles/<arch>/<kind>.json`, compiled in by `build.rs`) as the
//! first thing the new thread does, before its body runs, and waits for the
//! outcome: a filter that fails to load fails the spawn, and the caller
//! treats that as fatal. The helper also names the thread, logs its start
//! and end, and turns a panic into a logged error.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::sync_channel;
use std::thread::JoinHandle;

/// What a thread does; selects its seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: devices and the control socket (the main thread).
    Vmm,
    /// One virtual CPU (also runs device activation and reset, which
    /// happen on MMIO writes: vhost-user connect for virtio-fs, tap offloads).
    Vcpu,
    /// The parent left in the host's pid namespace, which only waits for
    /// the VMM (`jail::pidns`); not a thread of the VMM itself.
    Reaper,
    /// Every thread of the `boxlite-vsock` vhost-user backend: one filter,
    /// loaded on its main thread before the vhost-user threads exist, which
    /// inherit it.
    VsockBackend,
}

impl ThreadKind {
    /// The name of the seccomp profile for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Reaper => "reaper",
            ThreadKind::VsockBackend => "vsock",
        }
    }
}

static SECCOMP: AtomicBool = AtomicBool::new(false);

/// From now on every thread spawned through [`spawn_thread`] loads its
/// kind's seccomp filter. Set by the jail; never cleared.
pub fn enable_seccomp() {
    SECCOMP.store(true, Ordering::SeqCst);
}

/// Whether new threads get a seccomp filter.
pub fn seccomp_enabled() -> bool {
    SECCOMP.load(Ordering::SeqCst)
}

/// Spawns a named thread of `kind` running `f`, with the kind's seccomp
/// filter loaded first when the jail is on.
///
/// Linux limits thread names to 15 bytes; longer names are cut.
pub fn spawn_thread<F, T>(kind: ThreadKind, name: &str, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_with_filter(kind, name, seccomp_enabled(), f)
}

fn spawn_with_filter<F, T>(
    kind: ThreadKind,
    name: &str,
    seccomp: bool,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let mut short: String = name.chars().take(15).collect();
    if short.is_empty() {
        short = kind.as_str().to_string();
    }
    let (ready_tx, ready_rx) = sync_channel::<Result<(), String>>(1);
    let handle = std::thread::Builder::new()
        .name(short.clone())
        .spawn(move || {
            if seccomp {
                // Invariant: nothing of `f` runs before the filter is on.
                if let Err(e) = crate::seccomp::apply(kind) {
                    let msg = boxlite_protocol::error_chain::chain(&e);
                    let _ = ready_tx.send(Err(msg.clone()));
                    panic!("{msg}");
                }
            }
            let _ = ready_tx.send(Ok(()));
            drop(ready_tx);
            tracing::debug!(thread = %short, kind = kind.as_str(), seccomp, "thread started");
            match catch_unwind(AssertUnwindSafe(f)) {
                Ok(v) => {
                    tracing::debug!(thread = %short, "thread finished");
                    v
                }
                Err(panic) => {
                    tracing::error!(thread = %short, kind = kind.as_str(), "thread panicked");
                    resume_unwind(panic)
                }
            }
        })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(msg)) => {
            let _ = handle.join();
            Err(std::io::Error::other(msg))
        }
        Err(_) => {
            let _ = handle.join();
            Err(std::io::Error::other(
                "the new thread died before it started",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_gets_its_name_and_returns_value() {
        let h = spawn_thread(ThreadKind::Vcpu, "vcpu0", || {
            std::thread::current().name().map(str::to_string)
        })
        .expect("spawn");
        assert_eq!(h.join().expect("join").as_deref(), Some("vcpu0"));
    }

    #[test]
    fn long_names_are_cut_and_panics_propagate() {
        let h = spawn_thread(ThreadKind::Vmm, "a-very-long-thread-name", || -> () {
            assert_eq!(std::thread::current().name(), Some("a-very-long-thr"));
            panic!("boom")
        })
        .expect("spawn");
        assert!(h.join().is_err());
    }

    #[test]
    fn a_filtered_thread_runs_its_body_under_the_filter() {
        let h = spawn_with_filter(ThreadKind::Vcpu, "filtered", true, || {
            // Seccomp mode 2 (filter) shows in /proc, but opening it is
            // forbidden now; prctl(PR_GET_SECCOMP) is not in the profile
            // either, so just prove allowed work still runs.
            (0..1000u64).sum::<u64>()
        })
        .expect("spawn");
        assert_eq!(h.join().expect("join"), 499_500);
    }
}
