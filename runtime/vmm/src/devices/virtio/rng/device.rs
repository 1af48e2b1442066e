//! virtio-rng queue logic: pure functions over guest memory and the queue.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryMmap};

use super::{RngError, DEFAULT_SOURCE, MAX_REQUEST_BYTES, QUEUE_SIZE};
use crate::devices::virtio::{
    device_type, single_queue_lifecycle, SingleQueue, VirtioDevice, VirtioError, VIRTIO_F_VERSION_1,
};

/// Counters (`boxlite_rng_<event>_total`).
#[derive(Debug, Default)]
pub struct RngMetrics {
    /// Bytes of entropy written to the guest.
    pub bytes: AtomicU64,
    /// Chains served.
    pub requests: AtomicU64,
    /// Malformed chains returned with length 0.
    pub bad_chains: AtomicU64,
}

/// The virtio-rng device.
pub struct Rng {
    source: File,
    active: Option<SingleQueue>,
    /// Per-device counters.
    pub metrics: Arc<RngMetrics>,
}

impl Rng {
    /// A device reading from `source` (default `/dev/urandom`).
    pub fn new(source: Option<&Path>) -> Result<Self, RngError> {
        let path = source.unwrap_or(Path::new(DEFAULT_SOURCE));
        let source = File::open(path).map_err(|e| RngError::Open(path.to_path_buf(), e))?;
        Ok(Rng {
            source,
            active: None,
            metrics: Arc::new(RngMetrics::default()),
        })
    }

    /// Serves every available chain; true if any was returned to the guest.
    pub fn process_requests(&mut self) -> Result<bool, VirtioError> {
        let Some(active) = self.active.as_mut() else {
            return Ok(false);
        };
        let mut used_any = false;
        loop {
            let chain = match active.queue.iter(&active.mem) {
                Ok(mut it) => it.next(),
                Err(e) => return Err(VirtioError::Queue(e)),
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = match serve_chain(&mut self.source, &active.mem, chain) {
                Ok(n) => {
                    self.metrics.requests.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .bytes
                        .fetch_add(u64::from(n), Ordering::Relaxed);
                    n
                }
                Err(RngError::Source(e)) => return Err(VirtioError::Backend(e)),
                Err(e) => {
                    let n = self.metrics.bad_chains.fetch_add(1, Ordering::Relaxed);
                    if n < 10 || n % 1000 == 0 {
                        tracing::warn!(device = "rng", error = %e, "malformed descriptor chain returned with length 0");
                    }
                    0
                }
            };
            active
                .queue
                .add_used(&active.mem, head, len)
                .map_err(VirtioError::Queue)?;
            used_any = true;
        }
        if used_any {
            active
                .interrupt
                .notify_used(&mut active.queue, &active.mem)?;
        }
        Ok(used_any)
    }
}

/// Fills the chain's write-only buffers, at most MAX_REQUEST_BYTES in all.
/// Every buffer is checked in full against guest memory before use.
fn serve_chain(
    source: &mut File,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<u32, RngError> {
    let head = chain.head_index();
    // Validate the whole chain first: a bad chain writes nothing.
    let mut plan = Vec::new();
    let mut total: u32 = 0;
    for desc in chain {
        if !desc.is_write_only() {
            return Err(RngError::ReadOnlyDescriptor { head });
        }
        let (addr, len) = (desc.addr(), desc.len());
        if len > 0 && mem.get_slice(addr, len as usize).is_err() {
            return Err(RngError::BadBuffer {
                head,
                addr: addr.0,
                len,
            });
        }
        let take = len.min(MAX_REQUEST_BYTES - total);
        total = total
            .checked_add(take)
            .ok_or(RngError::LengthOverflow { head })?;
        if take > 0 {
            plan.push((addr, take));
        }
        if total == MAX_REQUEST_BYTES {
            break;
        }
    }
    let mut buf = vec![0u8; total as usize];
    source.read_exact(&mut buf).map_err(RngError::Source)?;
    let mut off = 0usize;
    for (addr, len) in plan {
        let end = off + len as usize;
        mem.write_slice(&buf[off..end], addr)
            .map_err(|_| RngError::BadBuffer {
                head,
                addr: addr.0,
                len,
            })?;
        off = end;
    }
    Ok(total)
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no config space.
        data.fill(0);
    }

    single_queue_lifecycle!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        activate_ctx, guest_memory, test_interrupt, GuestQueue, F_NEXT, F_WRITE, GUEST_MEM_SIZE,
    };
    use crate::devices::virtio::Interrupt;
    use vm_memory::GuestAddress;

    struct Rig {
        rng: Rng,
        mem: GuestMemoryMmap,
        irq: Arc<Interrupt>,
    }

    fn rig(q: &GuestQueue) -> Rig {
        let mem = q.mem().clone();
        let irq = test_interrupt();
        let mut rng = Rng::new(None).expect("urandom");
        rng.activate(activate_ctx(
            &mem,
            vec![q.queue()],
            &irq,
            VIRTIO_F_VERSION_1,
        ))
        .expect("activate");
        Rig { rng, mem, irq }
    }

    #[test]
    fn fills_write_only_buffers() {
        let mem = guest_memory();
        let mut q = GuestQueue::new(&mem, 16, 0x1000);
        q.write_desc(0, 0x10_0000, 64, F_WRITE | F_NEXT, 1);
        q.write_desc(1, 0x10_1000, 32, F_WRITE, 0);
        q.publish(0);
        let mut r = rig(&q);
        assert!(r.rng.process_requests().expect("process"));
        assert_eq!(q.used_idx(), 1);
        assert_eq!(q.used_elem(0), (0, 96));
        let mut buf = [0u8; 64];
        r.mem
            .read_slice(&mut buf, GuestAddress(0x10_0000))
            .expect("read");
        assert_ne!(buf, [0u8; 64], "random bytes written");
        assert_ne!(r.irq.status() & crate::devices::virtio::INT_VRING, 0);
        assert_eq!(r.rng.metrics.bytes.load(Ordering::Relaxed), 96);
        // Nothing more to do.
        assert!(!r.rng.process_requests().expect("idle"));
    }

    #[test]
    fn oversized_request_is_capped() {
        let mem = guest_memory();
        let mut q = GuestQueue::new(&mem, 16, 0x1000);
        q.write_desc(0, 0x10_0000, 0x20_0000, F_WRITE, 0);
        q.publish(0);
        let mut r = rig(&q);
        r.rng.process_requests().expect("process");
        assert_eq!(q.used_elem(0), (0, MAX_REQUEST_BYTES));
    }

    #[test]
    fn hostile_chains_fail_alone() {
        let mem = guest_memory();
        let mut q = GuestQueue::new(&mem, 16, 0x1000);
        // 0: read-only descriptor.
        q.write_desc(0, 0x10_0000, 16, 0, 0);
        q.publish(0);
        // 1: buffer beyond guest memory.
        q.write_desc(1, GUEST_MEM_SIZE - 8, 16, F_WRITE, 0);
        q.publish(1);
        // 2: address overflow.
        q.write_desc(2, u64::MAX - 4, 16, F_WRITE, 0);
        q.publish(2);
        // 3: a chain that loops on itself (3 -> 3 -> ...).
        q.write_desc(3, 0x10_0000, 4, F_WRITE | F_NEXT, 3);
        q.publish(3);
        // 4: next index beyond the queue.
        q.write_desc(4, 0x10_0000, 4, F_WRITE | F_NEXT, 200);
        q.publish(4);
        // 5: a good one after all that.
        q.write_desc(5, 0x10_2000, 8, F_WRITE, 0);
        q.publish(5);
        let mut r = rig(&q);
        assert!(r.rng.process_requests().expect("queue survives"));
        assert_eq!(q.used_idx(), 6);
        assert_eq!(q.used_elem(0), (0, 0));
        assert_eq!(q.used_elem(1), (1, 0));
        assert_eq!(q.used_elem(2), (2, 0));
        // The loop ends after queue-size descriptors (TTL), capped in length.
        let (id, len) = q.used_elem(3);
        assert_eq!(id, 3);
        assert!(len <= 16 * 4, "loop served {len}");
        assert_eq!(q.used_elem(4).0, 4);
        assert_eq!(q.used_elem(5), (5, 8));
        assert_eq!(r.rng.metrics.bad_chains.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn avail_index_too_far_ahead_is_a_device_error() {
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 16, 0x1000);
        q.set_avail_idx(100);
        let mut r = rig(&q);
        assert!(matches!(
            r.rng.process_requests(),
            Err(VirtioError::Queue(_))
        ));
    }

    #[test]
    fn head_index_out_of_range_does_not_panic() {
        let mem = guest_memory();
        let mut q = GuestQueue::new(&mem, 16, 0x1000);
        q.publish(999);
        let mut r = rig(&q);
        let _ = r.rng.process_requests();
    }

    #[test]
    fn inactive_device_and_bad_queue_index() {
        let mut rng = Rng::new(None).expect("urandom");
        assert!(!rng.process_requests().expect("inactive"));
        assert!(matches!(
            rng.process_queue(1),
            Err(VirtioError::BadQueueIndex(1))
        ));
        assert!(matches!(
            rng.write_config(0, &[1]),
            Err(VirtioError::ReadOnlyConfig { .. })
        ));
        let mut b = [7u8; 4];
        rng.read_config(0x1000, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn missing_source_is_an_error() {
        assert!(matches!(
            Rng::new(Some(Path::new("/nonexistent/entropy"))),
            Err(RngError::Open(..))
        ));
    }
}
