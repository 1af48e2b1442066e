//! The VM's counters in one place, for the control socket's `metrics` op.
//!
//! Devices keep their own `Arc<…Metrics>` of atomics (`devices/virtio/*/metrics.rs`);
//! the builder registers a handle on each here, and [`VmMetrics::snapshot`]
//! reads them without locking any device into the contract crate's
//! [`Metrics`] (`boxlite_vmm_api::control`), whose JSON is
//! `{"vcpus": [{"id", "exits", …}], "devices": {"<name>": {"kind", "<event>": n, …}}}`.
//! Names follow `boxlite_<device>_<event>_total` when exported.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use boxlite_vmm_api::control::{
    BalloonCounters, BlockCounters, DeviceCounters, FsCounters, Metrics, NetCounters, RngCounters,
    VcpuCounters, VsockCounters,
};

use crate::devices::virtio::balloon::BalloonMetrics;
use crate::devices::virtio::block::BlockMetrics;
use crate::devices::virtio::fs::FsMetrics;
use crate::devices::virtio::net::NetMetrics;
use crate::devices::virtio::rng::device::RngMetrics;
use crate::devices::virtio::vsock::metrics::VsockMetrics;
use crate::vstate::vcpu::VcpuMetrics;

/// A handle on one device's counters.
#[derive(Clone, Debug)]
pub enum DeviceMetrics {
    Rng(Arc<RngMetrics>),
    Vsock(Arc<VsockMetrics>),
    Block(Arc<BlockMetrics>),
    Net(Arc<NetMetrics>),
    Fs(Arc<FsMetrics>),
    Balloon(Arc<BalloonMetrics>),
}

fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl DeviceMetrics {
    /// The counters now.
    pub fn snapshot(&self) -> DeviceCounters {
        match self {
            DeviceMetrics::Rng(m) => DeviceCounters::Rng(RngCounters {
                bytes: get(&m.bytes),
                requests: get(&m.requests),
                bad_chains: get(&m.bad_chains),
            }),
            DeviceMetrics::Vsock(m) => DeviceCounters::Vsock(VsockCounters {
                rx_bytes: get(&m.rx_bytes),
                tx_bytes: get(&m.tx_bytes),
                rx_packets: get(&m.rx_packets),
                tx_packets: get(&m.tx_packets),
                conns_opened: get(&m.conns_opened),
                conns_closed: get(&m.conns_closed),
                conns_refused: get(&m.conns_refused),
                rst_sent: get(&m.rst_sent),
                bad_chains: get(&m.bad_chains),
                dropped_packets: get(&m.dropped_packets),
                protocol_errors: get(&m.protocol_errors),
            }),
            DeviceMetrics::Block(m) => DeviceCounters::Block(BlockCounters {
                reads: get(&m.reads),
                writes: get(&m.writes),
                flushes: get(&m.flushes),
                get_ids: get(&m.get_ids),
                read_bytes: get(&m.read_bytes),
                write_bytes: get(&m.write_bytes),
                io_errors: get(&m.io_errors),
                unsupported: get(&m.unsupported),
                bad_chains: get(&m.bad_chains),
            }),
            DeviceMetrics::Net(m) => DeviceCounters::Net(NetCounters {
                rx_frames: get(&m.rx_frames),
                rx_bytes: get(&m.rx_bytes),
                rx_drops: get(&m.rx_drops),
                tx_frames: get(&m.tx_frames),
                tx_bytes: get(&m.tx_bytes),
                tx_drops: get(&m.tx_drops),
                bad_chains: get(&m.bad_chains),
                backend_errors: get(&m.backend_errors),
            }),
            DeviceMetrics::Fs(m) => DeviceCounters::Fs(FsCounters {
                activations: get(&m.activations),
                activation_failures: get(&m.activation_failures),
                backend_lost: get(&m.backend_lost),
            }),
            DeviceMetrics::Balloon(m) => DeviceCounters::Balloon(BalloonCounters {
                inflated_pages: get(&m.inflated_pages),
                deflated_pages: get(&m.deflated_pages),
                reports: get(&m.reports),
                reported_bytes: get(&m.reported_bytes),
                bad_chains: get(&m.bad_chains),
                bad_ranges: get(&m.bad_ranges),
                discard_errors: get(&m.discard_errors),
            }),
        }
    }
}

/// Every counter of one VM.
#[derive(Clone, Debug, Default)]
pub struct VmMetrics {
    /// `(name, counters)` per virtio device, in MMIO-slot order (`vsock0`, `block1`, …).
    pub devices: Vec<(String, DeviceMetrics)>,
    /// Per-vCPU exit counters, by vCPU index.
    pub vcpus: Vec<Arc<VcpuMetrics>>,
}

impl VmMetrics {
    /// All counters now.
    pub fn snapshot(&self) -> Metrics {
        let vcpus = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(id, m)| VcpuCounters {
                id: u32::try_from(id).unwrap_or(u32::MAX),
                exits: get(&m.exits),
                pio_exits: get(&m.pio_exits),
                mmio_exits: get(&m.mmio_exits),
                kicks: get(&m.kicks),
            })
            .collect();
        let devices = self
            .devices
            .iter()
            .map(|(name, d)| (name.clone(), d.snapshot()))
            .collect();
        Metrics { vcpus, devices }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_json_names_every_counter() {
        let blk = Arc::new(BlockMetrics::default());
        blk.reads.store(3, Ordering::Relaxed);
        let vs = Arc::new(VsockMetrics::default());
        vs.tx_bytes.store(42, Ordering::Relaxed);
        let cpu = Arc::new(VcpuMetrics::default());
        cpu.exits.store(7, Ordering::Relaxed);
        let balloon = Arc::new(BalloonMetrics::default());
        balloon.reported_bytes.store(4 << 20, Ordering::Relaxed);
        balloon.bad_ranges.store(2, Ordering::Relaxed);
        let m = VmMetrics {
            devices: vec![
                ("vsock0".into(), DeviceMetrics::Vsock(vs)),
                ("block1".into(), DeviceMetrics::Block(blk)),
                ("balloon2".into(), DeviceMetrics::Balloon(balloon)),
            ],
            vcpus: vec![cpu],
        };
        // Checked on the JSON: the names are what scrapers see.
        let j = serde_json::to_value(m.snapshot()).expect("json");
        assert_eq!(j["vcpus"][0]["exits"], 7);
        assert_eq!(j["devices"]["block1"]["reads"], 3);
        assert_eq!(j["devices"]["block1"]["kind"], "block");
        assert_eq!(j["devices"]["vsock0"]["tx_bytes"], 42);
        assert_eq!(j["devices"]["vsock0"]["conns_opened"], 0);
        assert_eq!(j["devices"]["balloon2"]["kind"], "balloon");
        assert_eq!(j["devices"]["balloon2"]["reported_bytes"], 4 << 20);
        assert_eq!(j["devices"]["balloon2"]["bad_ranges"], 2);
        assert_eq!(j["devices"]["balloon2"]["inflated_pages"], 0);
    }
}
