//! A virtio device's own state in a snapshot (docs/snapshot-design.md
//! §5.3): whether the driver had started it, and its copies of the queues
//! with the positions it has reached in the rings (`next_avail`,
//! `next_used`), which the transport does not know.
//!
//! The transport's half (status, features, ring addresses, interrupt) is
//! `mmio::state`. Restore goes transport first, then device: the transport
//! hands the device the context it would have built at DRIVER_OK, and
//! [`restored_context`] swaps in the saved queues after checking them
//! against what the transport restored and against guest memory.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};

use super::mmio::state::QueueSnap;
use super::ActivateContext;

/// What a device saves of itself: its queues, which is all of rng, block,
/// net (its offloads follow from the acked features, its MAC and tap
/// from the config) and vsock (whose host connections cannot be saved: a
/// restored one starts without them and tells the guest so); the balloon
/// adds its sizes. The vhost-user fs is not snapshotted yet: its
/// `save_state` refuses ([`DeviceStateError::Unsupported`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSnap {
    /// Whether the driver had started the device (DRIVER_OK).
    pub activated: bool,
    /// The device's queues, in device order; empty when not activated.
    pub queues: Vec<QueueSnap>,
    /// The balloon's sizes; None for every other device.
    pub balloon: Option<BalloonSnap>,
}

/// A balloon's config space, in 4 KiB pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonSnap {
    /// The host's target the driver last saw (`num_pages`).
    pub num_pages: u32,
    /// What the driver said the balloon holds (`actual`).
    pub actual: u32,
}

impl DeviceSnap {
    /// The state of a device holding `queues`, or of one not activated.
    pub fn of_queues<'a>(queues: Option<impl IntoIterator<Item = &'a Queue>>) -> Self {
        match queues {
            Some(qs) => DeviceSnap {
                activated: true,
                queues: qs.into_iter().map(|q| q.state().into()).collect(),
                balloon: None,
            },
            None => DeviceSnap {
                activated: false,
                queues: Vec::new(),
                balloon: None,
            },
        }
    }
}

/// Why a device state was not saved or does not fit the device. The caller
/// names the device (its slot and kind).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceStateError {
    #[error("snapshots of this device are not supported yet")]
    Unsupported,
    #[error("the snapshot's device was {}, its transport is {}", started(*saved), started(*transport))]
    Activation { saved: bool, transport: bool },
    #[error("the snapshot's device holds {saved} queues, the device has {here}")]
    QueueCount { saved: usize, here: usize },
    #[error("queue {index}: {what}")]
    Queue { index: usize, what: String },
    #[error("the snapshot's device state has no {0} section")]
    Missing(&'static str),
    /// The device's backend (virtiofsd) could not be stopped, started or
    /// saved from; the message says which and why.
    #[error("{0}")]
    Backend(String),
}

fn started(activated: bool) -> &'static str {
    if activated {
        "started"
    } else {
        "not started"
    }
}

/// The context a device restored from `snap` activates with: `ctx` (what
/// the restored transport built, `None` if its driver had not set
/// DRIVER_OK) with each queue replaced by the saved one, positions
/// included. `None` for a device that was not started.
///
/// Each saved queue must be the one the transport restored (size, ring
/// addresses, readiness: the snapshot is one file, so a mismatch means it
/// was tampered with or is corrupt) and, if ready, valid in guest memory.
pub fn restored_context(
    snap: &DeviceSnap,
    ctx: Option<ActivateContext>,
) -> Result<Option<ActivateContext>, DeviceStateError> {
    let mut ctx = match (snap.activated, ctx) {
        (false, None) => return Ok(None),
        (true, Some(ctx)) => ctx,
        (saved, ctx) => {
            return Err(DeviceStateError::Activation {
                saved,
                transport: ctx.is_some(),
            })
        }
    };
    if snap.queues.len() != ctx.queues.len() {
        return Err(DeviceStateError::QueueCount {
            saved: snap.queues.len(),
            here: ctx.queues.len(),
        });
    }
    let mut queues = Vec::with_capacity(snap.queues.len());
    for (index, (saved, configured)) in snap.queues.iter().zip(&ctx.queues).enumerate() {
        let bad = |what: String| DeviceStateError::Queue { index, what };
        let queue = Queue::try_from(QueueState::from(saved)).map_err(|e| bad(e.to_string()))?;
        let mut theirs = QueueSnap::from(configured.state());
        // The positions are the device's own; the rest is the driver's,
        // which the transport holds too.
        theirs.next_avail = saved.next_avail;
        theirs.next_used = saved.next_used;
        theirs.event_idx_enabled = saved.event_idx_enabled;
        if &theirs != saved {
            return Err(bad(format!(
                "the device's saved queue {saved:?} is not the transport's {theirs:?}"
            )));
        }
        if queue.ready() && !queue.is_valid(&ctx.mem) {
            return Err(bad(
                "its size or ring addresses are invalid in guest memory".into(),
            ));
        }
        queues.push(queue);
    }
    ctx.queues = queues;
    Ok(Some(ctx))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::devices::virtio::mmio::state::TransportSnap;
    use crate::devices::virtio::mmio::{reg, MmioTransport};
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::{
        guest_memory, mmio_negotiate, mmio_write, mock_transport, test_interrupt, GuestQueue,
        F_WRITE,
    };
    use crate::devices::virtio::{status, VirtioDevice, VirtioError};

    const QUEUE_SIZE: u16 = 16;
    const QUEUE_AT: u64 = 0x1000;

    fn rng_transport(mem: &GuestMemoryMmap) -> (MmioTransport, Arc<Mutex<Rng>>) {
        let rng = Arc::new(Mutex::new(Rng::new(None).expect("urandom")));
        let t = MmioTransport::new(rng.clone(), mem.clone(), test_interrupt()).expect("transport");
        (t, rng)
    }

    /// The driver's side: features, queue 0 at `q`'s rings, DRIVER_OK.
    fn drive(t: &mut MmioTransport, q: &GuestQueue) {
        mmio_negotiate(t);
        let (desc, avail, used) = q.addrs();
        mmio_write(t, reg::QUEUE_NUM, u32::from(QUEUE_SIZE));
        mmio_write(t, reg::QUEUE_DESC_LOW, desc as u32);
        mmio_write(t, reg::QUEUE_AVAIL_LOW, avail as u32);
        mmio_write(t, reg::QUEUE_USED_LOW, used as u32);
        mmio_write(t, reg::QUEUE_READY, 1);
        mmio_write(
            t,
            reg::STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    /// Makes a 32-byte request in descriptor `head` and has `rng` serve it.
    fn request(q: &mut GuestQueue, rng: &Mutex<Rng>, head: u16) {
        q.write_desc(head, 0x10_0000 + u64::from(head) * 0x100, 32, F_WRITE, 0);
        q.publish(head);
        rng.lock()
            .expect("rng lock")
            .process_queue(0)
            .expect("process");
    }

    /// Saves both halves through JSON, as the state file carries them.
    fn saved(t: &MmioTransport) -> (TransportSnap, DeviceSnap) {
        let json = serde_json::to_string(&(t.save_state(), t.save_device_state().expect("save")))
            .expect("to JSON");
        serde_json::from_str(&json).expect("from JSON")
    }

    #[test]
    fn a_restored_rng_goes_on_from_the_saved_ring_positions() {
        let mem = guest_memory();
        let mut q = GuestQueue::new(&mem, QUEUE_SIZE, QUEUE_AT);
        let (mut a, rng_a) = rng_transport(&mem);
        drive(&mut a, &q);
        request(&mut q, &rng_a, 0);
        request(&mut q, &rng_a, 1);
        assert_eq!(q.used_idx(), 2);
        let (transport, device) = saved(&a);
        assert!(device.activated);
        assert_eq!(device.queues[0].next_avail, 2);
        assert_eq!(device.queues[0].next_used, 2);

        let (mut b, rng_b) = rng_transport(&mem);
        b.restore_state(&transport).expect("transport");
        b.restore_device_state(&device).expect("device");
        assert!(rng_b.lock().expect("rng lock").is_activated());
        request(&mut q, &rng_b, 2);
        // Chain 2 went into used slot 2: a device that restarted from
        // position 0 would have served the old chains again, into slot 0.
        assert_eq!(q.used_idx(), 3);
        assert_eq!(q.used_elem(2), (2, 32));
        assert_eq!(b.save_device_state().expect("save").queues[0].next_avail, 3);
    }

    #[test]
    fn a_device_the_driver_had_not_started_stays_unstarted() {
        let mem = guest_memory();
        let (mut a, _) = rng_transport(&mem);
        mmio_negotiate(&mut a);
        let (transport, device) = saved(&a);
        assert_eq!(
            device,
            DeviceSnap {
                activated: false,
                queues: vec![],
                balloon: None,
            }
        );
        let (mut b, rng_b) = rng_transport(&mem);
        b.restore_state(&transport).expect("transport");
        b.restore_device_state(&device).expect("device");
        assert!(!rng_b.lock().expect("rng lock").is_activated());
    }

    #[test]
    fn a_device_state_that_does_not_fit_its_transport_is_refused() {
        let mem = guest_memory();
        let mut q = GuestQueue::new(&mem, QUEUE_SIZE, QUEUE_AT);
        let (mut a, rng_a) = rng_transport(&mem);
        drive(&mut a, &q);
        request(&mut q, &rng_a, 0);
        let (transport, device) = saved(&a);
        type Edit = fn(&mut DeviceSnap);
        let cases: [(Edit, &str); 4] = [
            (
                |d| {
                    d.activated = false;
                    d.queues.clear();
                },
                "the snapshot's device was not started, its transport is started",
            ),
            (
                |d| d.queues.push(d.queues[0].clone()),
                "the snapshot's device holds 2 queues, the device has 1",
            ),
            (
                |d| d.queues[0].used_ring += 0x100,
                "queue 0: the device's saved queue",
            ),
            (|d| d.queues[0].size = 7, "queue 0: "),
        ];
        for (edit, want) in cases {
            let mut bad = device.clone();
            edit(&mut bad);
            let (mut b, rng_b) = rng_transport(&mem);
            b.restore_state(&transport).expect("transport");
            let err = b.restore_device_state(&bad).expect_err(want);
            match err {
                VirtioError::State(e) => assert!(e.to_string().starts_with(want), "{e}"),
                other => panic!("{want}: {other}"),
            }
            assert!(!rng_b.lock().expect("rng lock").is_activated(), "{want}");
        }
        // And the other way: a started device into an unstarted transport.
        let (mut c, _) = rng_transport(&mem);
        let err = c
            .restore_device_state(&device)
            .expect_err("unstarted transport");
        assert!(
            err.to_string()
                .contains("the snapshot's device was started, its transport is not started"),
            "{err}"
        );
    }

    #[test]
    fn a_device_without_snapshot_support_says_so() {
        let (t, _) = mock_transport();
        let err = t.save_device_state().expect_err("mock device");
        assert!(
            matches!(err, VirtioError::State(DeviceStateError::Unsupported)),
            "{err}"
        );
    }
}
