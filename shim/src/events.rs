//! Task events for containerd, behind the [`EventSink`] trait.
//!
//! Production: [`ChannelSink`] puts events on a queue; a forwarder task
//! publishes them through containerd's ttrpc event service with a timeout
//! per event and logs failures, so a slow or absent containerd never fails
//! (or blocks) an RPC. Tests use [`RecordingSink`].
//!
//! Nothing containerd waits for is ever dropped: a lost `/tasks/exit`
//! leaves `ctr run` and the CRI waiting forever. The queue is therefore
//! unbounded, and what bounds it is that every event but one comes from the
//! shim's own state machine, at most a few per process the host asked for.
//! The exception is `/tasks/oom`, which the guest reports: a hostile or
//! buggy guest could send them without end. An OOM event for a container
//! that already has one waiting is coalesced into it (containerd learns
//! nothing more from the second), so OOM events add at most one queue entry
//! per container.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;

/// Budget for publishing one event.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

/// What the shim tells containerd. Ids are containerd's; `pid`s are guest pids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskEvent {
    Create {
        container_id: String,
        bundle: String,
        stdin: String,
        stdout: String,
        stderr: String,
        terminal: bool,
        pid: u32,
    },
    Start {
        container_id: String,
        pid: u32,
    },
    Exit {
        container_id: String,
        /// The container id for init, else the exec id (containerd's convention).
        id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
    Oom {
        container_id: String,
    },
    ExecAdded {
        container_id: String,
        exec_id: String,
    },
    ExecStarted {
        container_id: String,
        exec_id: String,
        pid: u32,
    },
    Paused {
        container_id: String,
    },
    Resumed {
        container_id: String,
    },
    Delete {
        container_id: String,
        pid: u32,
        exit_status: u32,
        exited_at: SystemTime,
    },
}

impl TaskEvent {
    /// containerd's topic for the event.
    pub fn topic(&self) -> &'static str {
        match self {
            TaskEvent::Create { .. } => "/tasks/create",
            TaskEvent::Start { .. } => "/tasks/start",
            TaskEvent::Exit { .. } => "/tasks/exit",
            TaskEvent::Oom { .. } => "/tasks/oom",
            TaskEvent::ExecAdded { .. } => "/tasks/exec-added",
            TaskEvent::ExecStarted { .. } => "/tasks/exec-started",
            TaskEvent::Paused { .. } => "/tasks/paused",
            TaskEvent::Resumed { .. } => "/tasks/resumed",
            TaskEvent::Delete { .. } => "/tasks/delete",
        }
    }
}

/// Where the shim sends events. Never blocks and never fails the caller.
pub trait EventSink: Send + Sync {
    fn send(&self, event: TaskEvent);
}

/// Publishes one event to containerd (the production implementation wraps
/// containerd-shim's `RemotePublisher`).
#[async_trait]
pub trait Publisher: Send + Sync + 'static {
    async fn publish(&self, event: TaskEvent) -> Result<(), String>;
}

/// The queue in front of a [`Publisher`] (see the module doc for why it
/// needs no bound).
pub struct ChannelSink {
    tx: mpsc::UnboundedSender<TaskEvent>,
    /// Containers with an OOM event in the queue, not yet taken by the
    /// forwarder.
    oom_queued: Arc<Mutex<HashSet<String>>>,
}

impl ChannelSink {
    /// Starts the forwarder task; it ends when the sink is dropped.
    pub fn spawn(publisher: Arc<dyn Publisher>, timeout: Duration) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<TaskEvent>();
        let oom_queued: Arc<Mutex<HashSet<String>>> = Arc::default();
        let taken = oom_queued.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                if let TaskEvent::Oom { container_id } = &event {
                    lock(&taken).remove(container_id);
                }
                let topic = event.topic();
                match tokio::time::timeout(timeout, publisher.publish(event)).await {
                    Ok(Ok(())) => tracing::debug!(topic, "event published"),
                    Ok(Err(e)) => tracing::warn!(topic, error = %e, "publishing event failed"),
                    Err(_) => tracing::warn!(
                        topic,
                        timeout_ms = timeout.as_millis() as u64,
                        "publishing event timed out"
                    ),
                }
            }
        });
        Self { tx, oom_queued }
    }
}

fn lock(set: &Mutex<HashSet<String>>) -> std::sync::MutexGuard<'_, HashSet<String>> {
    set.lock().unwrap_or_else(|p| p.into_inner())
}

impl EventSink for ChannelSink {
    fn send(&self, event: TaskEvent) {
        if let TaskEvent::Oom { container_id } = &event {
            if !lock(&self.oom_queued).insert(container_id.clone()) {
                tracing::debug!(container_id, "OOM event coalesced with the queued one");
                return;
            }
        }
        let topic = event.topic();
        if self.tx.send(event).is_err() {
            tracing::error!(topic, "event dropped: the forwarder is gone");
        }
    }
}

/// Keeps every event, for tests.
#[derive(Default)]
pub struct RecordingSink {
    events: Mutex<Vec<TaskEvent>>,
}

impl RecordingSink {
    pub fn events(&self) -> Vec<TaskEvent> {
        self.events.lock().expect("event list lock").clone()
    }

    pub fn topics(&self) -> Vec<&'static str> {
        self.events().iter().map(TaskEvent::topic).collect()
    }
}

impl EventSink for RecordingSink {
    fn send(&self, event: TaskEvent) {
        self.events.lock().expect("event list lock").push(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct SlowThenOk {
        seen: Mutex<Vec<&'static str>>,
    }

    #[async_trait]
    impl Publisher for SlowThenOk {
        async fn publish(&self, event: TaskEvent) -> Result<(), String> {
            let topic = event.topic();
            if topic == "/tasks/start" {
                // Longer than the forwarder's timeout: dropped, not blocking.
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            self.seen.lock().unwrap().push(topic);
            if topic == "/tasks/oom" {
                return Err("containerd said no".into());
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn forwarder_survives_slow_and_failing_publishes() {
        let publisher = Arc::new(SlowThenOk {
            seen: Mutex::new(Vec::new()),
        });
        let sink = ChannelSink::spawn(publisher.clone(), Duration::from_millis(100));
        let started = std::time::Instant::now();
        sink.send(TaskEvent::Start {
            container_id: "c".into(),
            pid: 1,
        });
        sink.send(TaskEvent::Oom {
            container_id: "c".into(),
        });
        sink.send(TaskEvent::Paused {
            container_id: "c".into(),
        });
        // send() never waits for the publisher.
        assert!(started.elapsed() < Duration::from_millis(50));
        for _ in 0..100 {
            if publisher.seen.lock().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            *publisher.seen.lock().unwrap(),
            ["/tasks/oom", "/tasks/paused"]
        );
    }

    /// Counts what it publishes; holds every publish until released.
    struct Gated {
        open: tokio::sync::Semaphore,
        seen: Mutex<Vec<TaskEvent>>,
    }

    #[async_trait]
    impl Publisher for Gated {
        async fn publish(&self, event: TaskEvent) -> Result<(), String> {
            self.open
                .acquire()
                .await
                .map_err(|e| e.to_string())?
                .forget();
            self.seen.lock().unwrap().push(event);
            Ok(())
        }
    }

    /// A flood of OOM events from the guest while containerd is slow must
    /// not push out an exit (the old bounded queue dropped everything past
    /// 256 events), and OOM events for a container already queued coalesce.
    #[tokio::test]
    async fn oom_flood_neither_drops_exits_nor_grows_the_queue() {
        let publisher = Arc::new(Gated {
            open: tokio::sync::Semaphore::new(0),
            seen: Mutex::new(Vec::new()),
        });
        let sink = ChannelSink::spawn(publisher.clone(), Duration::from_secs(3600));
        for _ in 0..10_000 {
            for c in ["a", "b"] {
                sink.send(TaskEvent::Oom {
                    container_id: c.into(),
                });
            }
        }
        let exit = TaskEvent::Exit {
            container_id: "a".into(),
            id: "a".into(),
            pid: 7,
            exit_status: 137,
            exited_at: SystemTime::UNIX_EPOCH,
        };
        sink.send(exit.clone());
        publisher.open.add_permits(1_000);
        for _ in 0..200 {
            if publisher.seen.lock().unwrap().contains(&exit) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // FIFO: with the exit published last, everything queued before it
        // has been published too, so `seen` is the whole queue.
        let seen = publisher.seen.lock().unwrap().clone();
        assert_eq!(seen.last(), Some(&exit), "{seen:?}");
        // The forwarder may have taken the first OOM event of "a" before it
        // blocked in the gate, so "a" can have been queued twice.
        let ooms = |c: &str| {
            seen.iter()
                .filter(|e| matches!(e, TaskEvent::Oom { container_id } if container_id == c))
                .count()
        };
        assert!((1..=2).contains(&ooms("a")), "{seen:?}");
        assert_eq!(ooms("b"), 1, "{seen:?}");
    }
}
