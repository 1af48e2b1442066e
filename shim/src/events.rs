//! Task events for containerd, behind the [`EventSink`] trait.
//!
//! Production: [`ChannelSink`] puts events on a bounded channel; a forwarder
//! task publishes them through containerd's ttrpc event service with a
//! timeout per event and logs failures, so a slow or absent containerd never
//! fails (or blocks) an RPC. Tests use [`RecordingSink`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use tokio::sync::mpsc;

/// Events queued before new ones are dropped (and logged).
pub const EVENT_QUEUE: usize = 256;
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

/// A bounded queue in front of a [`Publisher`].
pub struct ChannelSink {
    tx: mpsc::Sender<TaskEvent>,
}

impl ChannelSink {
    /// Starts the forwarder task; it ends when the sink is dropped.
    pub fn spawn(publisher: Arc<dyn Publisher>, timeout: Duration) -> Self {
        let (tx, mut rx) = mpsc::channel::<TaskEvent>(EVENT_QUEUE);
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
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
        Self { tx }
    }
}

impl EventSink for ChannelSink {
    fn send(&self, event: TaskEvent) {
        let topic = event.topic();
        if let Err(e) = self.tx.try_send(event) {
            tracing::error!(topic, error = %e, "event dropped: queue full or forwarder gone");
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
}
