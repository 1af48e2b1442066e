//! Runs a virtio device's queues on the VMM event loop: each queue eventfd
//! (an ioeventfd, or signalled by the transport on an MMIO exit) is a
//! subscription whose token is the queue index. Only dispatch lives here;
//! the queue logic is in each device's `device.rs`.

use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice};

/// The event-loop side of one virtio device.
pub struct VirtioEventHandler {
    name: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
}

impl VirtioEventHandler {
    /// `queue_evts` are clones of the transport's queue eventfds.
    pub fn new(
        name: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Self {
        VirtioEventHandler {
            name,
            device,
            interrupt,
            queue_evts,
        }
    }

    /// Handles a notification of queue `index`.
    pub fn handle_queue(&mut self, index: u16) {
        let mut dev = self.device.lock().expect("virtio device lock poisoned");
        if !dev.is_activated() || self.interrupt.needs_reset() {
            return;
        }
        if let Err(e) = dev.process_queue(index) {
            tracing::warn!(device = %self.name, queue = index, error = %e, "virtio device failed; the driver must reset it");
            let _ = self.interrupt.signal_needs_reset();
        }
    }
}

impl MutEventSubscriber for VirtioEventHandler {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                tracing::error!(device = %self.name, queue = i, error = ?e, "failed to watch a queue eventfd");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let index = events.data();
        let Some(evt) = self.queue_evts.get(index as usize) else {
            return;
        };
        // Drain the counter; a spurious wakeup just finds an empty queue.
        let _ = evt.read();
        if let Ok(i) = u16::try_from(index) {
            self.handle_queue(i);
        }
    }
}
