//! The OOM-kill watcher behind GetOOMEvent.
//!
//! Each watched container's cgroup counts its OOM kills (`oom_kill` in
//! memory.events on v2, memory.oom_control on v1). On cgroup v2 — the
//! guest — the kernel raises a "file modified" event on memory.events
//! whenever one of its counters changes, so the watcher sleeps in inotify
//! and an idle sandbox costs no wake-ups (a timer in the guest is a VM exit,
//! and under nested virtualisation an expensive one). On v1, where
//! memory.oom_control raises no inotify event, it polls; only the agent's
//! host-mode tests run there.
//!
//! Two more looks close the window between a kill and the watcher's wake-up:
//! [`OomReporter::report_new_kill`] when a container's process exits (before
//! the exit is published) and [`OomEvents::unwatch`] when it is removed.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;

use super::cgroup::{is_v2, memory_events_file, read_memory_events};

/// How often the v1 fallback reads the containers' OOM-kill counters.
pub const OOM_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// One watched container: its cgroup, the kills already reported, and its
/// inotify watch (v2).
struct Watched {
    cgroup_path: PathBuf,
    kills_seen: u64,
    watch: Option<WatchDescriptor>,
}

type WatchedMap = Arc<Mutex<HashMap<String, Watched>>>;

/// tokio's `AsyncFd` wants `AsRawFd`, which nix's `Inotify` lacks.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// How the watcher learns of new kills; fixed on first use.
enum Wakeup {
    Inotify(Arc<AsyncFd<InotifyFd>>),
    Poll,
}

/// OOM kills per container; GetOOMEvent takes them one by one.
pub struct OomEvents {
    watched: WatchedMap,
    tx: mpsc::UnboundedSender<String>,
    rx: tokio::sync::Mutex<mpsc::UnboundedReceiver<String>>,
    wakeup: OnceLock<Wakeup>,
}

/// Reports a container's OOM kill as soon as one of its processes exits,
/// before the exit is published: the watcher may not have woken yet, and
/// once the host has the exit, `ctr run --rm` deletes the container and the
/// shim drops events for containers it no longer has.
#[derive(Clone)]
pub struct OomReporter {
    watched: WatchedMap,
    tx: mpsc::UnboundedSender<String>,
}

impl OomReporter {
    /// Queues an OOM event for `id` if its cgroup counted a kill since the
    /// last look (the kernel counts it before the killed task exits).
    pub fn report_new_kill(&self, id: &str) {
        report_new_kills(&self.watched, &self.tx, Some(id));
    }
}

impl Default for OomEvents {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        OomEvents {
            watched: Arc::default(),
            tx,
            rx: tokio::sync::Mutex::new(rx),
            wakeup: OnceLock::new(),
        }
    }
}

fn oom_kills(cgroup_path: &Path) -> u64 {
    read_memory_events(cgroup_path)
        .get("oom_kill")
        .copied()
        .unwrap_or(0)
}

fn lock(watched: &WatchedMap) -> std::sync::MutexGuard<'_, HashMap<String, Watched>> {
    watched.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads the counters of `only` (or of every watched container) and queues
/// an event for each container whose count grew.
fn report_new_kills(watched: &WatchedMap, tx: &mpsc::UnboundedSender<String>, only: Option<&str>) {
    let mut killed = Vec::new();
    for (id, w) in lock(watched).iter_mut() {
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let now = oom_kills(&w.cgroup_path);
        if now > w.kills_seen {
            w.kills_seen = now;
            killed.push(id.clone());
        }
    }
    for id in killed {
        tracing::info!(container_id = %id, "OOM kill");
        let _ = tx.send(id);
    }
}

impl OomEvents {
    /// Starts watching a container (and the watcher task, on first use;
    /// needs a tokio runtime). Called before the container's process can
    /// run, so the baseline read here counts no kill of its own.
    pub fn watch(&self, id: &str, cgroup_path: &Path) {
        let watch = match self.wakeup() {
            Wakeup::Inotify(fd) => {
                let file = memory_events_file(cgroup_path);
                match fd.get_ref().0.add_watch(&file, AddWatchFlags::IN_MODIFY) {
                    Ok(wd) => Some(wd),
                    Err(errno) => {
                        // No memory controller in this cgroup: no counter
                        // to read either, so no kill can be reported.
                        tracing::warn!(
                            container_id = %id,
                            file = %file.display(),
                            %errno,
                            "cannot watch the OOM-kill counter; OOM kills of this container will not be reported"
                        );
                        None
                    }
                }
            }
            Wakeup::Poll => None,
        };
        // Read after the watch is in place: a change from here on wakes
        // the watcher.
        let kills_seen = oom_kills(cgroup_path);
        lock(&self.watched).insert(
            id.to_string(),
            Watched {
                cgroup_path: cgroup_path.to_path_buf(),
                kills_seen,
                watch,
            },
        );
    }

    /// Stops watching a container. A kill since the last look is reported
    /// first: a container OOM-killed and removed before the watcher woke
    /// must not lose its event.
    pub fn unwatch(&self, id: &str) {
        report_new_kills(&self.watched, &self.tx, Some(id));
        let removed = lock(&self.watched).remove(id);
        if let (
            Some(Watched {
                watch: Some(wd), ..
            }),
            Some(Wakeup::Inotify(fd)),
        ) = (removed, self.wakeup.get())
        {
            // Fails with EINVAL once the cgroup is gone (the kernel dropped
            // the watch itself): nothing left to undo then.
            let _ = fd.get_ref().0.rm_watch(wd);
        }
    }

    /// A handle for the exit paths: see [`OomReporter`].
    pub fn reporter(&self) -> OomReporter {
        OomReporter {
            watched: self.watched.clone(),
            tx: self.tx.clone(),
        }
    }

    /// Long-polls the next OOM kill.
    pub async fn next(&self) -> Option<String> {
        self.rx.lock().await.recv().await
    }

    /// The watcher's wake-up source, and the watcher task, made on first use.
    fn wakeup(&self) -> &Wakeup {
        self.wakeup.get_or_init(|| {
            let watched = self.watched.clone();
            let tx = self.tx.clone();
            let inotify = is_v2().then(open_inotify);
            match inotify {
                Some(Ok(fd)) => {
                    let fd = Arc::new(fd);
                    tokio::spawn(follow_inotify(fd.clone(), watched, tx));
                    Wakeup::Inotify(fd)
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "inotify unavailable; polling the OOM-kill counters");
                    tokio::spawn(poll(watched, tx));
                    Wakeup::Poll
                }
                None => {
                    tokio::spawn(poll(watched, tx));
                    Wakeup::Poll
                }
            }
        })
    }
}

/// A non-blocking inotify instance registered with tokio's reactor.
fn open_inotify() -> std::io::Result<AsyncFd<InotifyFd>> {
    let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
    // SAFETY: `InotifyFd` owns the inotify descriptor (an `OwnedFd` inside
    // nix's `Inotify`) and always returns that one; it is closed only when
    // the `AsyncFd` drops it.
    unsafe { AsyncFd::register_with_interest(InotifyFd(inotify), Interest::READABLE) }
        .map_err(std::io::Error::from)
}

/// Wakes on any watched memory.events change and rereads the counters (a
/// sandbox has few containers; the event says only that some counter moved).
async fn follow_inotify(
    fd: Arc<AsyncFd<InotifyFd>>,
    watched: WatchedMap,
    tx: mpsc::UnboundedSender<String>,
) {
    loop {
        let mut ready = match fd.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                tracing::error!(error = %e, "OOM watcher: inotify failed; OOM kills are now found only when a process exits");
                return;
            }
        };
        match ready.try_io(|fd| fd.get_ref().0.read_events().map_err(std::io::Error::from)) {
            Ok(Ok(_events)) => report_new_kills(&watched, &tx, None),
            Ok(Err(e)) => {
                tracing::error!(error = %e, "OOM watcher: reading inotify events failed; OOM kills are now found only when a process exits");
                return;
            }
            // Spurious readiness: try_io cleared it; wait again.
            Err(_would_block) => {}
        }
    }
}

async fn poll(watched: WatchedMap, tx: mpsc::UnboundedSender<String>) {
    loop {
        tokio::time::sleep(OOM_POLL_INTERVAL).await;
        report_new_kills(&watched, &tx, None);
    }
}
