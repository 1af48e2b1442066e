//! The vsock data path over one RX and one TX queue, shared by the two
//! devices that own queues in different ways: the MMIO device of
//! `boxlite-vmm` (queues held by the VMM, interrupts through an irqfd) and
//! the vhost-user backend `boxlite-vsock` (queues in vhost-user vrings,
//! interrupts through the frontend's call eventfd).
//!
//! [`fill_rx`] and [`drain_tx`] move packets between a queue and the
//! [`Muxer`]; a [`VsockQueues`] adds the notification; [`kick`] runs both
//! until neither moves.

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::metrics::VsockMetrics;
use super::muxer::Muxer;
use super::packet::{parse_tx, RxPacket};
use super::{rate_limited, VsockError, RXQ, TXQ};
use crate::devices::virtio::VirtioError;

/// RX/TX passes per kick: TX can produce RX (RSTs, responses) and a full
/// RX backlog can hold TX back; a few rounds settle both.
const MAX_KICK_ROUNDS: usize = 8;

/// Fills RX chains while the muxer owes the guest packets; true if any
/// chain was used. When the muxer has nothing after all, the chain stays in
/// the queue for later.
pub fn fill_rx(
    muxer: &mut Muxer,
    metrics: &VsockMetrics,
    rxq: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    let mut used_any = false;
    while muxer.has_pending_rx() {
        let Some(mut chain) = rxq.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        let len = match RxPacket::parse(mem, &mut chain) {
            Ok(mut pkt) => match muxer.recv_pkt(&mut pkt) {
                Some(len) => len,
                None => {
                    rxq.go_to_previous_position();
                    break;
                }
            },
            Err(e) => {
                bad_chain(metrics, RXQ, &e);
                0
            }
        };
        rxq.add_used(mem, head, len)?;
        used_any = true;
    }
    Ok(used_any)
}

/// Hands every TX chain to the muxer (unless RX is backed up) and returns
/// it with length 0; true if any chain was used. A malformed chain fails
/// alone.
pub fn drain_tx(
    muxer: &mut Muxer,
    metrics: &VsockMetrics,
    txq: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    let mut used_any = false;
    while !muxer.tx_throttled() {
        let Some(mut chain) = txq.iter(mem)?.next() else {
            break;
        };
        let head = chain.head_index();
        match parse_tx(mem, &mut chain) {
            Ok(pkt) => muxer.send_pkt(&pkt.hdr, pkt.data.as_ref()),
            Err(e) => bad_chain(metrics, TXQ, &e),
        }
        txq.add_used(mem, head, 0)?;
        used_any = true;
    }
    Ok(used_any)
}

fn bad_chain(metrics: &VsockMetrics, queue: u16, e: &VsockError) {
    let n = VsockMetrics::add(&metrics.bad_chains, 1);
    if rate_limited(n) {
        tracing::warn!(device = "vsock", queue, error = %e, source = ?std::error::Error::source(e), "malformed descriptor chain returned with length 0");
    }
}

/// A device's RX and TX queues together with the way it tells the driver
/// about used buffers.
pub trait VsockQueues {
    /// [`fill_rx`], then a notification if the driver wants one.
    fn rx(&mut self, muxer: &mut Muxer, metrics: &VsockMetrics) -> Result<bool, VirtioError>;
    /// [`drain_tx`], then a notification if the driver wants one.
    fn tx(&mut self, muxer: &mut Muxer, metrics: &VsockMetrics) -> Result<bool, VirtioError>;
}

/// RX, then TX, until neither moves.
pub fn kick(
    queues: &mut impl VsockQueues,
    muxer: &mut Muxer,
    metrics: &VsockMetrics,
) -> Result<(), VirtioError> {
    for _ in 0..MAX_KICK_ROUNDS {
        let rx = queues.rx(muxer, metrics)?;
        let tx = queues.tx(muxer, metrics)?;
        let more_rx = rx && muxer.has_pending_rx();
        if !tx && !more_rx {
            break;
        }
    }
    Ok(())
}
