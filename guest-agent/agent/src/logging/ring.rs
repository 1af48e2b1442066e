//! The agent's in-memory log: a bounded ring of recent lines plus the live
//! subscribers of the log stream.
//!
//! Publishing never blocks: each subscriber has a bounded queue, and a line
//! that does not fit is dropped for that subscriber and counted; its stream
//! then says how many lines it missed. Nothing here may log through
//! `tracing` (that would re-enter the hub).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

/// Bytes of log text the ring keeps.
pub const RING_CAPACITY: usize = 256 * 1024;
/// Lines queued per subscriber before its lines are dropped.
pub const SUBSCRIBER_QUEUE: usize = 1024;
/// Log stream connections served at once.
pub const MAX_SUBSCRIBERS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("log stream refused: {MAX_SUBSCRIBERS} readers are already connected")]
    TooManySubscribers,
}

/// The ring and its subscribers.
pub struct LogHub {
    capacity: usize,
    inner: Mutex<HubInner>,
}

#[derive(Default)]
struct HubInner {
    lines: VecDeque<Arc<str>>,
    bytes: usize,
    /// Lines pushed out of the ring since the start.
    evicted: u64,
    subscribers: Vec<Subscriber>,
}

struct Subscriber {
    tx: mpsc::Sender<Arc<str>>,
    dropped: Arc<AtomicU64>,
}

/// What a new log stream reader gets: the ring content at the moment it
/// subscribed, then every later line through `rx`.
pub struct Subscription {
    pub backlog: Vec<Arc<str>>,
    /// Lines that had already left the ring before `backlog`.
    pub evicted: u64,
    pub rx: mpsc::Receiver<Arc<str>>,
    /// Lines dropped for this reader since it last looked (swap to 0).
    pub dropped: Arc<AtomicU64>,
}

impl LogHub {
    pub fn new(capacity: usize) -> Self {
        LogHub {
            capacity: capacity.max(1),
            inner: Mutex::new(HubInner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HubInner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds one log record (normally a line ending in `\n`).
    pub fn publish(&self, text: &str) {
        if text.is_empty() {
            return;
        }
        let line: Arc<str> = Arc::from(cut_to(text, self.capacity));
        let mut inner = self.lock();
        inner.bytes += line.len();
        inner.lines.push_back(line.clone());
        while inner.bytes > self.capacity {
            match inner.lines.pop_front() {
                Some(old) => {
                    inner.bytes -= old.len();
                    inner.evicted += 1;
                }
                None => break,
            }
        }
        inner
            .subscribers
            .retain(|sub| match sub.tx.try_send(line.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    sub.dropped.fetch_add(1, Ordering::Relaxed);
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    /// Snapshots the ring and registers a live subscriber in one step, so
    /// the reader sees every line exactly once.
    pub fn subscribe(&self) -> Result<Subscription, RingError> {
        let mut inner = self.lock();
        inner.subscribers.retain(|s| !s.tx.is_closed());
        if inner.subscribers.len() >= MAX_SUBSCRIBERS {
            return Err(RingError::TooManySubscribers);
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        inner.subscribers.push(Subscriber {
            tx,
            dropped: dropped.clone(),
        });
        Ok(Subscription {
            backlog: inner.lines.iter().cloned().collect(),
            evicted: inner.evicted,
            rx,
            dropped,
        })
    }

    /// The ring content as one string (tests, debugging).
    pub fn contents(&self) -> String {
        self.lock().lines.iter().map(|l| &**l).collect()
    }
}

/// `text` cut to at most `max` bytes on a char boundary.
fn cut_to(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut cut = max;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    &text[..cut]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_lines_within_capacity() {
        let hub = LogHub::new(20);
        for i in 0..10 {
            hub.publish(&format!("line {i}\n")); // 7 bytes each
        }
        assert_eq!(hub.contents(), "line 8\nline 9\n");
        let sub = hub.subscribe().unwrap();
        assert_eq!(sub.evicted, 8);
        assert_eq!(sub.backlog.len(), 2);
    }

    #[test]
    fn oversized_lines_are_cut_on_a_char_boundary() {
        let hub = LogHub::new(5);
        hub.publish("ééééé\n");
        assert_eq!(hub.contents(), "éé");
    }

    #[test]
    fn subscriber_gets_backlog_then_live_lines_exactly_once() {
        let hub = LogHub::new(RING_CAPACITY);
        hub.publish("early\n");
        let mut sub = hub.subscribe().unwrap();
        hub.publish("live\n");
        assert_eq!(
            sub.backlog.iter().map(|l| &**l).collect::<String>(),
            "early\n"
        );
        assert_eq!(&*sub.rx.try_recv().unwrap(), "live\n");
        assert!(sub.rx.try_recv().is_err());
    }

    #[test]
    fn slow_subscriber_drops_and_counts_without_blocking() {
        let hub = LogHub::new(RING_CAPACITY);
        let mut slow = hub.subscribe().unwrap();
        let total = SUBSCRIBER_QUEUE + 25;
        for i in 0..total {
            hub.publish(&format!("{i}\n"));
        }
        assert_eq!(slow.dropped.swap(0, Ordering::Relaxed), 25);
        let mut got = 0;
        while slow.rx.try_recv().is_ok() {
            got += 1;
        }
        assert_eq!(got, SUBSCRIBER_QUEUE);
        // Room again: new lines flow.
        hub.publish("after\n");
        assert_eq!(&*slow.rx.try_recv().unwrap(), "after\n");
    }

    #[test]
    fn closed_subscribers_are_forgotten_and_the_count_is_bounded() {
        let hub = LogHub::new(RING_CAPACITY);
        let subs: Vec<_> = (0..MAX_SUBSCRIBERS)
            .map(|_| hub.subscribe().unwrap())
            .collect();
        assert!(matches!(
            hub.subscribe(),
            Err(RingError::TooManySubscribers)
        ));
        drop(subs);
        hub.publish("x\n");
        assert!(hub.subscribe().is_ok());
    }
}
