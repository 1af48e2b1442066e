//! Puts the vsock backend on the VMM event loop: one subscription, the
//! muxer's epoll fd (listener, timer and every host stream live inside it).
//! Queue notifications reach the device through the generic
//! [`VirtioEventHandler`](crate::devices::virtio::event_handler::VirtioEventHandler).

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Vsock;

/// The event-loop side of the vsock backend.
pub struct VsockEventHandler {
    device: Arc<Mutex<Vsock>>,
    fd: RawFd,
}

impl VsockEventHandler {
    /// Watches `device`'s backend fd.
    pub fn new(device: Arc<Mutex<Vsock>>) -> Self {
        let fd = device
            .lock()
            .expect("vsock device lock poisoned")
            .backend_fd();
        VsockEventHandler { device, fd }
    }
}

impl MutEventSubscriber for VsockEventHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::error!(device = "vsock", error = ?e, "failed to watch the vsock backend");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.device
            .lock()
            .expect("vsock device lock poisoned")
            .process_backend();
    }
}
