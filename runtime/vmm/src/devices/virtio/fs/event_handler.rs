//! Puts the virtio-fs backend watch on the VMM event loop: one
//! subscription, the device's epoll fd, which holds the vhost-user
//! connection once the driver has activated the device. Queue kicks and
//! used-buffer interrupts never pass through here (ioeventfd → virtiofsd →
//! irqfd).

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Fs;

/// The event-loop side of a virtio-fs device.
pub struct FsEventHandler {
    device: Arc<Mutex<Fs>>,
    fd: RawFd,
}

impl FsEventHandler {
    /// Watches `device`'s backend fd.
    pub fn new(device: Arc<Mutex<Fs>>) -> Self {
        let fd = device
            .lock()
            .expect("virtio-fs device lock poisoned")
            .backend_fd();
        FsEventHandler { device, fd }
    }
}

impl MutEventSubscriber for FsEventHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            tracing::error!(device = "fs", error = ?e, "failed to watch the virtiofsd connection");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.device
            .lock()
            .expect("virtio-fs device lock poisoned")
            .process_backend();
    }
}
