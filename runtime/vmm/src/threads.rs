//! The one helper every VMM thread is spawned through.
//!
//! Every thread has a [`ThreadKind`]. The jail (next part) loads the seccomp
//! filter `seccomp-profiles/<arch>/<kind>.json` here, before the thread body
//! runs; today the helper names the thread, logs its start and end, and turns
//! a panic into a logged error.

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::thread::JoinHandle;

/// What a thread does; selects its seccomp filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The event loop: devices and (later) the control socket.
    Vmm,
    /// One virtual CPU.
    Vcpu,
    /// The control API, if it ever gets its own thread.
    Api,
}

impl ThreadKind {
    /// The name of the seccomp profile for this kind.
    pub fn as_str(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Api => "api",
        }
    }
}

/// Spawns a named thread of `kind` running `f`.
///
/// Linux limits thread names to 15 bytes; longer names are cut.
pub fn spawn_thread<F, T>(kind: ThreadKind, name: &str, f: F) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let mut short: String = name.chars().take(15).collect();
    if short.is_empty() {
        short = kind.as_str().to_string();
    }
    std::thread::Builder::new()
        .name(short.clone())
        .spawn(move || {
            tracing::debug!(thread = %short, kind = kind.as_str(), "thread started");
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
        })
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
}
