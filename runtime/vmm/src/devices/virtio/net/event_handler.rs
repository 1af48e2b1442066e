//! Puts the net backend on the VMM event loop: the backend fd (readable →
//! RX) and the device's wake eventfd. Queue notifications reach the device
//! through the generic
//! [`VirtioEventHandler`](crate::devices::virtio::event_handler::VirtioEventHandler).
//!
//! The backend fd is polled level-triggered while the guest has RX
//! buffers; when it has none, the fd is taken off the loop (otherwise a
//! waiting frame would spin it) until the device signals the wake eventfd.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::RxState;
use super::Net;

const TOKEN_BACKEND: u32 = 0;
const TOKEN_WAKE: u32 = 1;

/// The event-loop side of the net backend.
pub struct NetEventHandler {
    device: Arc<Mutex<Net>>,
    backend_fd: RawFd,
    wake_fd: RawFd,
    backend_watched: bool,
}

impl NetEventHandler {
    /// Watches `device`'s backend fd and wake eventfd.
    pub fn new(device: Arc<Mutex<Net>>) -> Self {
        let (backend_fd, wake_fd) = {
            let d = device.lock().expect("net device lock poisoned");
            (d.backend_fd(), d.wake_evt().as_raw_fd())
        };
        NetEventHandler {
            device,
            backend_fd,
            wake_fd,
            backend_watched: false,
        }
    }

    /// Whether the backend fd is on the loop (tests).
    pub fn backend_watched(&self) -> bool {
        self.backend_watched
    }

    fn backend_events(&self) -> Events {
        Events::with_data_raw(self.backend_fd, TOKEN_BACKEND, EventSet::IN)
    }

    fn watch_backend(&mut self, ops: &mut EventOps) {
        if self.backend_watched {
            return;
        }
        match ops.add(self.backend_events()) {
            Ok(()) => self.backend_watched = true,
            Err(e) => {
                tracing::error!(device = "net", error = ?e, "failed to watch the net backend")
            }
        }
    }

    fn unwatch_backend(&mut self, ops: &mut EventOps) {
        if !self.backend_watched {
            return;
        }
        match ops.remove(self.backend_events()) {
            Ok(()) => self.backend_watched = false,
            Err(e) => {
                tracing::error!(device = "net", error = ?e, "failed to stop watching the net backend")
            }
        }
    }
}

impl MutEventSubscriber for NetEventHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data_raw(
            self.wake_fd,
            TOKEN_WAKE,
            EventSet::IN,
        )) {
            tracing::error!(device = "net", error = ?e, "failed to watch the net wake eventfd");
        }
        self.watch_backend(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TOKEN_BACKEND => {
                let state = self
                    .device
                    .lock()
                    .expect("net device lock poisoned")
                    .process_backend_rx();
                if state == RxState::Blocked {
                    self.unwatch_backend(ops);
                }
            }
            TOKEN_WAKE => {
                {
                    let mut d = self.device.lock().expect("net device lock poisoned");
                    let _ = d.wake_evt().read();
                    d.process_wake();
                }
                self.watch_backend(ops);
            }
            _ => {}
        }
    }
}
