//! Running work inside a pod's network namespace.
//!
//! `setns(2)` moves only the calling thread, and a netlink socket or a tap
//! stays bound to the namespace of the thread that created it. So netns work
//! never runs on a tokio worker (which would then serve every other task from
//! the pod's namespace): each job gets a fresh std thread that joins the
//! netns, runs a current-thread runtime for rtnetlink, creates its sockets
//! and taps there, and hands the results back before exiting.

use std::fs::File;
use std::future::Future;
use std::io;
use std::path::Path;

use nix::sched::{setns, CloneFlags};

/// Why a job could not run in the netns.
#[derive(Debug)]
pub(crate) struct EnterError {
    /// "open the network namespace", "enter the network namespace", ...
    pub action: &'static str,
    pub error: io::Error,
}

impl EnterError {
    /// The namespace is gone: its file no longer exists (the pod was
    /// removed, or the process behind /proc/<pid>/ns/net exited), or the
    /// path no longer names a namespace (its bind mount was undone and the
    /// plain file left behind).
    pub fn netns_is_gone(&self) -> bool {
        match self.action {
            OPEN => self.error.kind() == io::ErrorKind::NotFound,
            ENTER => self.error.raw_os_error() == Some(libc::EINVAL),
            _ => false,
        }
    }
}

const OPEN: &str = "open the network namespace";
const ENTER: &str = "enter the network namespace";

/// Runs `job` to completion on a new thread inside the netns at `netns`
/// and returns its output.
pub(crate) async fn run_in_netns<T, F, Fut>(netns: &Path, job: F) -> Result<T, EnterError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let path = netns.to_owned();
    std::thread::Builder::new()
        .name("boxlite-netns".into())
        .spawn(move || {
            // The receiver only goes away if the caller stopped waiting.
            let _ = tx.send(run_here(&path, job));
        })
        .map_err(|error| EnterError {
            action: "start the netns thread",
            error,
        })?;
    rx.await.unwrap_or_else(|_| {
        Err(EnterError {
            action: "finish the work in the netns",
            error: io::Error::other("the netns thread panicked"),
        })
    })
}

/// The netns thread's body: join the namespace, then run `job` on a
/// runtime of this thread's own.
fn run_here<T, F, Fut>(path: &Path, job: F) -> Result<T, EnterError>
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T>,
{
    let ns = File::open(path).map_err(|error| EnterError {
        action: OPEN,
        error,
    })?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|e| EnterError {
        action: ENTER,
        error: io::Error::from_raw_os_error(e as i32),
    })?;
    // enable_io: rtnetlink's socket is registered with the runtime's reactor.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|error| EnterError {
            action: "start a runtime in the netns thread",
            error,
        })?;
    Ok(rt.block_on(job()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_netns_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let err = run_in_netns(&dir.path().join("nope"), || async {})
            .await
            .unwrap_err();
        assert_eq!(err.action, OPEN);
        assert!(err.netns_is_gone());
    }

    #[tokio::test]
    async fn plain_file_is_not_a_netns() {
        // setns on a regular file fails with EINVAL whatever our privileges.
        let file = tempfile::NamedTempFile::new().unwrap();
        let err = run_in_netns(file.path(), || async {}).await.unwrap_err();
        assert_eq!(err.action, ENTER, "{err:?}");
        assert!(err.netns_is_gone(), "{err:?}");
    }

    #[tokio::test]
    async fn own_netns_runs_the_job_on_another_thread() {
        let caller = std::thread::current().id();
        let ran_on = run_in_netns(Path::new("/proc/self/ns/net"), || async {
            std::thread::current().id()
        })
        .await;
        match ran_on {
            Ok(id) => assert_ne!(id, caller),
            // Joining even our own netns needs CAP_SYS_ADMIN.
            Err(e) => assert_eq!(e.error.raw_os_error(), Some(libc::EPERM), "{e:?}"),
        }
    }

    #[tokio::test]
    async fn panicking_job_is_an_error() {
        let err = run_in_netns(Path::new("/proc/self/ns/net"), || async {
            panic!("job failed");
        })
        .await
        .unwrap_err();
        // Without CAP_SYS_ADMIN the job never runs: EPERM instead.
        assert!(
            err.error.to_string().contains("panicked")
                || err.error.raw_os_error() == Some(libc::EPERM),
            "{err:?}"
        );
    }
}
