//! Zombie reaping for PID 1, and exit statuses for whoever waits on a pid.
//!
//! On SIGCHLD the reaper calls `waitpid(-1, WNOHANG)` until no exited child
//! is left. Each reaped `(pid, status)` goes to the one [`ExitWatch`]
//! registered for that pid; exits nobody registered for (orphans re-parented
//! to PID 1, helper processes) are dropped and counted.
//!
//! Registering must happen before the child can be reaped, or a fast child's
//! status is lost. So a spawner takes the registry lock with
//! [`Reaper::lock_for_spawn`], forks, registers the new pid and only then
//! releases the lock; a reap pass holds the same lock while it calls
//! `waitpid`, so it cannot collect the child in between. [`Reaper::spawn`]
//! does this for a [`std::process::Command`].
//!
//! A container process is not the agent's child when it starts: the
//! container helper forks it, and it is re-parented to the agent (PID 1, or
//! a child subreaper in host mode) when the helper exits. The helper waits
//! for the agent to register the pid before it exits (container/helper/),
//! so the agent cannot reap such a process before someone waits for it. As
//! a safety net (a helper killed after reporting), the reaper also keeps the
//! last [`ORPHAN_EXITS_KEPT`] unclaimed exits for [`ORPHAN_EXIT_TTL`], and
//! [`SpawnGuard::register_since`] delivers one of them if it was reaped
//! after the caller's start time.
//!
//! Everything that starts a process in the agent must go through here, and
//! nothing may call `waitpid` on its own (no `Child::wait`, no
//! `tokio::process`): the reaper would steal the status, or the other way round.

use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("Failed to install the SIGCHLD handler")]
    SignalHandler(#[source] std::io::Error),
    #[error("Failed to spawn {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("exit status of pid {0} was lost: the reaper is gone")]
    Lost(i32),
}

/// A reaped child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitEvent {
    pub pid: i32,
    /// Exit code, or 128 + signal number when a signal killed it.
    pub status: i32,
    pub exited_at: SystemTime,
}

/// How many unclaimed exits are kept for a late registration.
pub const ORPHAN_EXITS_KEPT: usize = 1024;
/// How long an unclaimed exit is kept for a late registration.
pub const ORPHAN_EXIT_TTL: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Registry {
    waiting: HashMap<i32, oneshot::Sender<ExitEvent>>,
    /// Unclaimed exits, oldest first, with the time they were reaped.
    orphans: VecDeque<(Instant, ExitEvent)>,
}

/// The registry of pids someone waits for. Cheap to clone.
#[derive(Clone, Default)]
pub struct Reaper {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    registry: Mutex<Registry>,
    unclaimed: AtomicU64,
    reaped: AtomicU64,
}

/// Holds the registry lock while a child is spawned; see the module docs.
pub struct SpawnGuard<'a> {
    registry: MutexGuard<'a, Registry>,
}

impl SpawnGuard<'_> {
    /// Registers interest in `pid`'s exit. A second registration for the
    /// same pid replaces the first.
    pub fn register(&mut self, pid: i32) -> ExitWatch {
        let (tx, rx) = oneshot::channel();
        self.registry.waiting.insert(pid, tx);
        ExitWatch { pid, rx }
    }

    /// Registers interest in a process the agent did not fork itself (it
    /// was re-parented to the agent). If that pid was already reaped as an
    /// orphan after `since` (when the caller started the process), the
    /// watch gets that exit at once.
    pub fn register_since(&mut self, pid: i32, since: Instant) -> ExitWatch {
        let (tx, rx) = oneshot::channel();
        let found = self
            .registry
            .orphans
            .iter()
            .rposition(|(at, e)| e.pid == pid && *at >= since);
        match found.and_then(|i| self.registry.orphans.remove(i)) {
            Some((_, event)) => {
                let _ = tx.send(event);
            }
            None => {
                self.registry.waiting.insert(pid, tx);
            }
        }
        ExitWatch { pid, rx }
    }
}

/// Receives the exit of one registered pid.
#[derive(Debug)]
pub struct ExitWatch {
    pid: i32,
    rx: oneshot::Receiver<ExitEvent>,
}

impl ExitWatch {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Waits until the reaper collected the process.
    pub async fn wait(self) -> Result<ExitEvent, ReaperError> {
        self.rx.await.map_err(|_| ReaperError::Lost(self.pid))
    }
}

impl Reaper {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the registry lock for a spawn (see the module docs). Keep it
    /// short: reaping waits for it.
    pub fn lock_for_spawn(&self) -> SpawnGuard<'_> {
        SpawnGuard {
            registry: self
                .inner
                .registry
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        }
    }

    /// Spawns `cmd` and registers its pid under the lock. Never call
    /// `wait`/`try_wait` on the returned `Child`; use the watch.
    pub fn spawn(&self, cmd: &mut Command) -> Result<(Child, ExitWatch), ReaperError> {
        let mut guard = self.lock_for_spawn();
        let child = cmd.spawn().map_err(|source| ReaperError::Spawn {
            program: cmd.get_program().to_string_lossy().into_owned(),
            source,
        })?;
        let pid = i32::try_from(child.id()).unwrap_or(i32::MAX);
        let watch = guard.register(pid);
        Ok((child, watch))
    }

    /// Collects every exited child now; returns how many were reaped.
    pub fn reap(&self) -> usize {
        let mut registry = self
            .inner
            .registry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut count = 0;
        loop {
            let (pid, status) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _core)) => (pid.as_raw(), 128 + sig as i32),
                Ok(WaitStatus::StillAlive) => break,
                // Stops and continues are not asked for; nothing to collect.
                Ok(_) => continue,
                Err(Errno::EINTR) => continue,
                Err(Errno::ECHILD) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    break;
                }
            };
            count += 1;
            self.inner.reaped.fetch_add(1, Ordering::Relaxed);
            let event = ExitEvent {
                pid,
                status,
                exited_at: SystemTime::now(),
            };
            match registry.waiting.remove(&pid) {
                Some(tx) => {
                    tracing::debug!(pid, status, "reaped child");
                    // The watcher may have given up; the status is then dropped.
                    let _ = tx.send(event);
                }
                None => {
                    self.inner.unclaimed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(pid, status, "reaped unclaimed child");
                    let now = Instant::now();
                    let orphans = &mut registry.orphans;
                    while orphans.len() >= ORPHAN_EXITS_KEPT
                        || orphans
                            .front()
                            .is_some_and(|(at, _)| now.duration_since(*at) > ORPHAN_EXIT_TTL)
                    {
                        orphans.pop_front();
                    }
                    orphans.push_back((now, event));
                }
            }
        }
        count
    }

    /// Starts reaping on SIGCHLD in the current tokio runtime. Reaps once
    /// right away for children that exited before the handler existed.
    pub fn start(&self) -> Result<tokio::task::JoinHandle<()>, ReaperError> {
        let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::SignalHandler)?;
        let reaper = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                reaper.reap();
                if sigchld.recv().await.is_none() {
                    tracing::error!("SIGCHLD stream ended; zombies are no longer reaped");
                    return;
                }
            }
        }))
    }

    /// Exits reaped that nobody had registered for.
    pub fn unclaimed(&self) -> u64 {
        self.inner.unclaimed.load(Ordering::Relaxed)
    }

    /// All exits reaped so far.
    pub fn reaped(&self) -> u64 {
        self.inner.reaped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// `waitpid(-1)` collects every child of the test process, so tests that
    /// spawn children must not run at the same time.
    static CHILDREN: Mutex<()> = Mutex::new(());

    fn sh(script: &str) -> Command {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(script);
        c
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn wait(watch: ExitWatch) -> ExitEvent {
        tokio::time::timeout(Duration::from_secs(10), watch.wait())
            .await
            .expect("child exit was not delivered in time")
            .unwrap()
    }

    #[test]
    fn delivers_exit_codes_and_signal_deaths() {
        let _serial = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        runtime().block_on(async {
            let reaper = Reaper::new();
            let task = reaper.start().unwrap();
            let (_c1, ok) = reaper.spawn(&mut Command::new("/bin/true")).unwrap();
            let (_c2, three) = reaper.spawn(&mut sh("exit 3")).unwrap();
            let (_c3, killed) = reaper.spawn(&mut sh("kill -KILL $$")).unwrap();
            let (_c4, termed) = reaper.spawn(&mut sh("kill -TERM $$")).unwrap();
            let (_c5, slow) = reaper.spawn(&mut sh("sleep 0.2; exit 7")).unwrap();
            let pid = three.pid();
            let e = wait(three).await;
            assert_eq!((e.pid, e.status), (pid, 3));
            assert_eq!(wait(ok).await.status, 0);
            assert_eq!(wait(killed).await.status, 128 + 9);
            assert_eq!(wait(termed).await.status, 128 + 15);
            assert_eq!(wait(slow).await.status, 7);
            task.abort();
        });
    }

    #[test]
    #[allow(clippy::zombie_processes)] // the reaper under test collects it
    fn unregistered_children_are_reaped_and_dropped() {
        let _serial = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        runtime().block_on(async {
            let reaper = Reaper::new();
            let task = reaper.start().unwrap();
            let before = reaper.unclaimed();
            let child = sh("exit 5").spawn().unwrap();
            let pid = child.id();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while reaper.unclaimed() == before {
                assert!(tokio::time::Instant::now() < deadline, "orphan not reaped");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // Gone for good: no zombie left behind.
            assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
            task.abort();
        });
    }

    #[test]
    #[allow(clippy::zombie_processes)] // the reaper under test collects it
    fn registration_under_the_lock_wins_the_race() {
        let _serial = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        let reaper = Reaper::new();
        let mut guard = reaper.lock_for_spawn();
        let child = Command::new("/bin/true").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        // The child is a zombie by now; a concurrent reap pass must wait
        // for the registration instead of dropping its status.
        std::thread::sleep(Duration::from_millis(100));
        let r = reaper.clone();
        let reaping = std::thread::spawn(move || r.reap());
        std::thread::sleep(Duration::from_millis(50));
        let watch = guard.register(pid);
        drop(guard);
        assert_eq!(reaping.join().unwrap(), 1);
        let e = runtime().block_on(wait(watch));
        assert_eq!((e.pid, e.status), (pid, 0));
        assert_eq!(reaper.unclaimed(), 0);
    }

    #[test]
    #[allow(clippy::zombie_processes)] // the reaper under test collects it
    fn late_registration_gets_an_orphan_exit_reaped_after_since() {
        let _serial = CHILDREN.lock().unwrap_or_else(|p| p.into_inner());
        let reaper = Reaper::new();
        let before = Instant::now();
        let child = sh("exit 4").spawn().unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while reaper.reap() == 0 {
            assert!(Instant::now() < deadline, "child not reaped");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(reaper.unclaimed(), 1);
        // Registered with a start time after the reap: not delivered.
        let late = reaper
            .lock_for_spawn()
            .register_since(pid, Instant::now() + Duration::from_secs(1));
        drop(late);
        let watch = reaper.lock_for_spawn().register_since(pid, before);
        let e = runtime().block_on(wait(watch));
        assert_eq!((e.pid, e.status), (pid, 4));
    }

    #[test]
    fn watch_reports_a_lost_reaper() {
        let reaper = Reaper::new();
        let watch = reaper.lock_for_spawn().register(12345);
        drop(reaper);
        let e = runtime().block_on(watch.wait()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "exit status of pid 12345 was lost: the reaper is gone"
        );
    }
}
