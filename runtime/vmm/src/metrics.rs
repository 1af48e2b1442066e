//! The VM's counters in one place, for the control socket's `metrics` op.
//!
//! Devices keep their own `Arc<…Metrics>` of atomics (`devices/virtio/*/metrics.rs`);
//! the builder registers a handle on each here, and [`VmMetrics::to_json`]
//! reads them without locking any device. Names follow
//! `boxlite_<device>_<event>_total`: the JSON is
//! `{"vcpus": [{"id", "exits", …}], "devices": {"<name>": {"kind", "<event>": n, …}}}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};

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
}

fn get(c: &AtomicU64) -> Value {
    Value::from(c.load(Ordering::Relaxed))
}

impl DeviceMetrics {
    /// The device kind, as in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceMetrics::Rng(_) => "rng",
            DeviceMetrics::Vsock(_) => "vsock",
            DeviceMetrics::Block(_) => "block",
            DeviceMetrics::Net(_) => "net",
            DeviceMetrics::Fs(_) => "fs",
        }
    }

    /// The counters as a JSON object (plus `"kind"`).
    pub fn to_json(&self) -> Value {
        let fields: Vec<(&str, &AtomicU64)> = match self {
            DeviceMetrics::Rng(m) => vec![
                ("bytes", &m.bytes),
                ("requests", &m.requests),
                ("bad_chains", &m.bad_chains),
            ],
            DeviceMetrics::Vsock(m) => vec![
                ("rx_bytes", &m.rx_bytes),
                ("tx_bytes", &m.tx_bytes),
                ("rx_packets", &m.rx_packets),
                ("tx_packets", &m.tx_packets),
                ("conns_opened", &m.conns_opened),
                ("conns_closed", &m.conns_closed),
                ("conns_refused", &m.conns_refused),
                ("rst_sent", &m.rst_sent),
                ("bad_chains", &m.bad_chains),
                ("dropped_packets", &m.dropped_packets),
                ("protocol_errors", &m.protocol_errors),
            ],
            DeviceMetrics::Block(m) => vec![
                ("reads", &m.reads),
                ("writes", &m.writes),
                ("flushes", &m.flushes),
                ("get_ids", &m.get_ids),
                ("read_bytes", &m.read_bytes),
                ("write_bytes", &m.write_bytes),
                ("io_errors", &m.io_errors),
                ("unsupported", &m.unsupported),
                ("bad_chains", &m.bad_chains),
            ],
            DeviceMetrics::Net(m) => vec![
                ("rx_frames", &m.rx_frames),
                ("rx_bytes", &m.rx_bytes),
                ("rx_drops", &m.rx_drops),
                ("tx_frames", &m.tx_frames),
                ("tx_bytes", &m.tx_bytes),
                ("tx_drops", &m.tx_drops),
                ("bad_chains", &m.bad_chains),
                ("backend_errors", &m.backend_errors),
            ],
            DeviceMetrics::Fs(m) => vec![
                ("activations", &m.activations),
                ("activation_failures", &m.activation_failures),
                ("backend_lost", &m.backend_lost),
            ],
        };
        let mut o = Map::new();
        o.insert("kind".into(), Value::from(self.kind()));
        for (k, c) in fields {
            o.insert(k.into(), get(c));
        }
        Value::Object(o)
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
    /// All counters as JSON.
    pub fn to_json(&self) -> Value {
        let vcpus: Vec<Value> = self
            .vcpus
            .iter()
            .enumerate()
            .map(|(id, m)| {
                json!({
                    "id": id,
                    "exits": get(&m.exits),
                    "pio_exits": get(&m.pio_exits),
                    "mmio_exits": get(&m.mmio_exits),
                    "kicks": get(&m.kicks),
                })
            })
            .collect();
        let mut devices = Map::new();
        for (name, d) in &self.devices {
            devices.insert(name.clone(), d.to_json());
        }
        json!({ "vcpus": vcpus, "devices": devices })
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
        let m = VmMetrics {
            devices: vec![
                ("vsock0".into(), DeviceMetrics::Vsock(vs)),
                ("block1".into(), DeviceMetrics::Block(blk)),
            ],
            vcpus: vec![cpu],
        };
        let j = m.to_json();
        assert_eq!(j["vcpus"][0]["exits"], 7);
        assert_eq!(j["devices"]["block1"]["reads"], 3);
        assert_eq!(j["devices"]["block1"]["kind"], "block");
        assert_eq!(j["devices"]["vsock0"]["tx_bytes"], 42);
        assert_eq!(j["devices"]["vsock0"]["conns_opened"], 0);
    }
}
