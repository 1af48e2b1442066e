//! What a state file's body holds (docs/snapshot-design.md §3): the VM's
//! shape, every vCPU's and the VM's KVM state, the UART, each virtio
//! device (transport and device halves, in slot order) and what the memory
//! file holds.
//!
//! The body is JSON read with `deny_unknown_fields` everywhere, so a file
//! from another format version fails to parse instead of half-loading.
//! The KVM structs inside are stored as their raw bytes (kvm-bindings'
//! serde), which only this build's struct layout can read back: [`Abi`]
//! records each struct's size at save and restore refuses a build whose
//! sizes differ, rather than let the deserializer pad or truncate.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use super::memory_file::Region;
use crate::devices::legacy::serial::SerialSnap;
use crate::devices::virtio::mmio::state::TransportSnap;
use crate::devices::virtio::persist::DeviceSnap;
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm_state::VmState;

/// The state file's body.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    pub abi: Abi,
    pub vm: VmSection,
    /// One per vCPU, in id order.
    pub vcpus: Vec<VcpuState>,
    /// COM1; `None` for a VM without one.
    pub serial: Option<SerialSnap>,
    /// The virtio devices in slot order (the order they were attached,
    /// which fixes their MMIO windows and interrupt lines).
    pub devices: Vec<DeviceEntry>,
    pub memory: MemorySection,
}

/// The VM's shape, which a restore's config must match, and its KVM
/// state.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    pub vcpus: u8,
    pub memory_mib: u64,
    /// The RAM regions, as the memory file's header page has them.
    pub ram_regions: Vec<Region>,
    /// The VM-wide KVM state (PICs, IOAPIC, PIT, kvmclock).
    pub state: VmState,
}

/// One virtio device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// Its place on the MMIO bus (0 = the first window).
    pub slot: u32,
    /// Its kind as the config names it (`rng`, `block`, ...), for errors.
    pub kind: String,
    pub transport: TransportSnap,
    pub device: DeviceSnap,
}

/// What the paired memory file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    /// Bytes of guest RAM written (the rest of the file is holes).
    pub data_bytes: u64,
}

/// The size of every KVM struct the body stores as raw bytes, by name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Abi {
    pub kvm_struct_sizes: BTreeMap<String, usize>,
}

impl Abi {
    /// This build's sizes.
    pub fn current() -> Self {
        use std::mem::size_of;
        let sizes = [
            ("kvm_clock_data", size_of::<kvm_clock_data>()),
            ("kvm_cpuid_entry2", size_of::<kvm_cpuid_entry2>()),
            ("kvm_debugregs", size_of::<kvm_debugregs>()),
            ("kvm_irqchip", size_of::<kvm_irqchip>()),
            ("kvm_lapic_state", size_of::<kvm_lapic_state>()),
            ("kvm_mp_state", size_of::<kvm_mp_state>()),
            ("kvm_msr_entry", size_of::<kvm_msr_entry>()),
            ("kvm_pit_state2", size_of::<kvm_pit_state2>()),
            ("kvm_regs", size_of::<kvm_regs>()),
            ("kvm_sregs", size_of::<kvm_sregs>()),
            ("kvm_vcpu_events", size_of::<kvm_vcpu_events>()),
            ("kvm_xcrs", size_of::<kvm_xcrs>()),
            ("kvm_xsave", size_of::<kvm_xsave>()),
        ];
        Abi {
            kvm_struct_sizes: sizes
                .into_iter()
                .map(|(name, size)| (name.to_owned(), size))
                .collect(),
        }
    }
}

/// Why a state file's body was refused. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("{path}: the body is not a snapshot body of this format version: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path}: saved by a boxlite-vmm whose KVM structs differ from this one's ({what}): \
         recreate the snapshot with this build"
    )]
    Abi { path: PathBuf, what: String },
    #[error("{path}: {what}")]
    Inconsistent { path: PathBuf, what: String },
}

/// The body's bytes (JSON).
pub fn encode(body: &SnapshotBody) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(body)
}

/// Parses the body of the state file at `path` and checks it was saved
/// with this build's KVM struct layout and is consistent in itself.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<SnapshotBody, BodyError> {
    let body: SnapshotBody = serde_json::from_slice(bytes).map_err(|source| BodyError::Parse {
        path: path.to_path_buf(),
        source,
    })?;
    let here = Abi::current();
    if body.abi != here {
        let what = abi_difference(&body.abi, &here);
        return Err(BodyError::Abi {
            path: path.to_path_buf(),
            what,
        });
    }
    let inconsistent = |what: String| BodyError::Inconsistent {
        path: path.to_path_buf(),
        what,
    };
    if body.vcpus.len() != usize::from(body.vm.vcpus) {
        return Err(inconsistent(format!(
            "the VM has {} vCPUs but {} vCPU states are saved",
            body.vm.vcpus,
            body.vcpus.len()
        )));
    }
    for (i, v) in body.vcpus.iter().enumerate() {
        if usize::from(v.id) != i {
            return Err(inconsistent(format!("vCPU state {i} is for vCPU {}", v.id)));
        }
    }
    for (i, d) in body.devices.iter().enumerate() {
        if d.slot as usize != i {
            return Err(inconsistent(format!(
                "device {i} ({}) is saved for slot {}",
                d.kind, d.slot
            )));
        }
    }
    Ok(body)
}

/// The first struct whose size differs (or is missing on one side).
fn abi_difference(saved: &Abi, here: &Abi) -> String {
    let names = saved
        .kvm_struct_sizes
        .keys()
        .chain(here.kvm_struct_sizes.keys());
    for name in names {
        let (s, h) = (
            saved.kvm_struct_sizes.get(name),
            here.kvm_struct_sizes.get(name),
        );
        if s != h {
            let show = |v: Option<&usize>| v.map_or("absent".to_owned(), |n| format!("{n} bytes"));
            return format!("{name}: saved {}, here {}", show(s), show(h));
        }
    }
    "no difference".to_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::devices::virtio::mmio::state::{InterruptSnap, QueueSnap};

    fn vcpu(id: u8) -> VcpuState {
        VcpuState {
            id,
            cpuid: vec![kvm_cpuid_entry2::default()],
            mp_state: kvm_mp_state::default(),
            regs: kvm_regs {
                rip: 0x1000 + u64::from(id),
                ..Default::default()
            },
            sregs: kvm_sregs::default(),
            xsave: kvm_xsave::default(),
            xcrs: kvm_xcrs::default(),
            debugregs: kvm_debugregs::default(),
            lapic: Some(kvm_lapic_state::default()),
            tsc_khz: Some(2_000_000),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 42,
                ..Default::default()
            }],
            vcpu_events: kvm_vcpu_events::default(),
        }
    }

    fn queue() -> QueueSnap {
        QueueSnap {
            max_size: 256,
            next_avail: 3,
            next_used: 3,
            event_idx_enabled: false,
            size: 256,
            ready: true,
            desc_table: 0x1000,
            avail_ring: 0x2000,
            used_ring: 0x3000,
        }
    }

    fn body() -> SnapshotBody {
        SnapshotBody {
            abi: Abi::current(),
            vm: VmSection {
                vcpus: 2,
                memory_mib: 256,
                ram_regions: vec![Region {
                    guest_addr: 0,
                    size: 256 << 20,
                    file_offset: 0,
                }],
                state: VmState {
                    pic_master: kvm_irqchip::default(),
                    pic_slave: kvm_irqchip::default(),
                    ioapic: kvm_irqchip::default(),
                    pit: kvm_pit_state2::default(),
                    clock: kvm_clock_data::default(),
                },
            },
            vcpus: vec![vcpu(0), vcpu(1)],
            serial: Some(SerialSnap {
                baud_divisor_low: 1,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 1,
                line_control: 3,
                line_status: 0x60,
                modem_control: 8,
                modem_status: 0xb0,
                scratch: 0,
                in_buffer: vec![],
            }),
            devices: vec![DeviceEntry {
                slot: 0,
                kind: "rng".into(),
                transport: TransportSnap {
                    device_type: 4,
                    avail_features: 1 << 32,
                    features_select: 0,
                    acked_features: 1 << 32,
                    acked_features_select: 1,
                    unknown_features_acked: false,
                    queue_select: 0,
                    status: 0xf,
                    config_generation: 0,
                    interrupt: InterruptSnap {
                        status: 0,
                        needs_reset: false,
                        vring_always: false,
                    },
                    queues: vec![queue()],
                },
                device: DeviceSnap {
                    activated: true,
                    queues: vec![queue()],
                    balloon: None,
                },
            }],
            memory: MemorySection {
                data_bytes: 60 << 20,
            },
        }
    }

    fn json(body: &SnapshotBody) -> Value {
        serde_json::to_value(body).expect("to JSON")
    }

    fn decode_value(v: &Value) -> Result<SnapshotBody, BodyError> {
        decode(
            Path::new("/t/state"),
            &serde_json::to_vec(v).expect("bytes"),
        )
    }

    #[test]
    fn a_body_reads_back_as_it_was_written() {
        let b = body();
        let bytes = encode(&b).expect("encode");
        let back = decode(Path::new("/t/state"), &bytes).expect("decode");
        assert_eq!(json(&back), json(&b));
        assert_eq!(back.vcpus[1].regs.rip, 0x1001);
        assert_eq!(back.vcpus[0].msrs[0].data, 42);
    }

    #[test]
    fn a_body_from_other_kvm_structs_is_refused_by_name() {
        let mut v = json(&body());
        let here = Abi::current().kvm_struct_sizes["kvm_xsave"];
        v["abi"]["kvm_struct_sizes"]["kvm_xsave"] = Value::from(here + 4);
        let err = decode_value(&v).err().expect("refused").to_string();
        assert!(
            err.contains(&format!(
                "kvm_xsave: saved {} bytes, here {here} bytes",
                here + 4
            )),
            "{err}"
        );
        assert!(err.starts_with("/t/state: "), "{err}");
    }

    #[test]
    fn unknown_or_missing_fields_are_refused() {
        let mut extra = json(&body());
        extra["devices"][0]["device"]["num_pages"] = Value::from(1);
        let err = decode_value(&extra).err().expect("extra field").to_string();
        assert!(err.contains("unknown field `num_pages`"), "{err}");
        let mut missing = json(&body());
        missing["vm"]
            .as_object_mut()
            .expect("vm")
            .remove("ram_regions");
        let err = decode_value(&missing)
            .err()
            .expect("missing field")
            .to_string();
        assert!(err.contains("missing field `ram_regions`"), "{err}");
    }

    #[test]
    fn an_inconsistent_body_is_refused() {
        type Edit = fn(&mut Value);
        let cases: [(Edit, &str); 3] = [
            (
                |v| v["vm"]["vcpus"] = Value::from(3),
                "the VM has 3 vCPUs but 2 vCPU states are saved",
            ),
            (
                |v| v["vcpus"][1]["id"] = Value::from(0),
                "vCPU state 1 is for vCPU 0",
            ),
            (
                |v| v["devices"][0]["slot"] = Value::from(2),
                "device 0 (rng) is saved for slot 2",
            ),
        ];
        for (edit, want) in cases {
            let mut v = json(&body());
            edit(&mut v);
            let err = decode_value(&v).err().expect(want).to_string();
            assert_eq!(err, format!("/t/state: {want}"));
        }
    }

    /// Every field name in the body, as paths (`vcpus[].regs`), down to
    /// the KVM structs, which are stored as byte arrays.
    fn field_paths(v: &Value, path: &str, out: &mut Vec<String>) {
        match v {
            Value::Object(map) => {
                for (k, child) in map {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    out.push(p.clone());
                    field_paths(child, &p, out);
                }
            }
            Value::Array(items) => {
                if let Some(first) = items.first() {
                    field_paths(first, &format!("{path}[]"), out);
                }
            }
            _ => {}
        }
    }

    /// The body's schema, pinned. If this fails, the body changed: bump
    /// `FORMAT_VERSION` (snapshot/mod.rs), since restore accepts exactly
    /// one version, then update the list.
    #[test]
    fn the_body_schema_is_pinned_to_the_format_version() {
        assert_eq!(super::super::FORMAT_VERSION, 2);
        let mut paths = Vec::new();
        field_paths(&json(&body()), "", &mut paths);
        paths.retain(|p| !p.starts_with("abi.kvm_struct_sizes."));
        paths.sort();
        let want = [
            "abi",
            "abi.kvm_struct_sizes",
            "devices",
            "devices[].device",
            "devices[].device.activated",
            "devices[].device.balloon",
            "devices[].device.queues",
            "devices[].device.queues[].avail_ring",
            "devices[].device.queues[].desc_table",
            "devices[].device.queues[].event_idx_enabled",
            "devices[].device.queues[].max_size",
            "devices[].device.queues[].next_avail",
            "devices[].device.queues[].next_used",
            "devices[].device.queues[].ready",
            "devices[].device.queues[].size",
            "devices[].device.queues[].used_ring",
            "devices[].kind",
            "devices[].slot",
            "devices[].transport",
            "devices[].transport.acked_features",
            "devices[].transport.acked_features_select",
            "devices[].transport.avail_features",
            "devices[].transport.config_generation",
            "devices[].transport.device_type",
            "devices[].transport.features_select",
            "devices[].transport.interrupt",
            "devices[].transport.interrupt.needs_reset",
            "devices[].transport.interrupt.status",
            "devices[].transport.interrupt.vring_always",
            "devices[].transport.queue_select",
            "devices[].transport.queues",
            "devices[].transport.queues[].avail_ring",
            "devices[].transport.queues[].desc_table",
            "devices[].transport.queues[].event_idx_enabled",
            "devices[].transport.queues[].max_size",
            "devices[].transport.queues[].next_avail",
            "devices[].transport.queues[].next_used",
            "devices[].transport.queues[].ready",
            "devices[].transport.queues[].size",
            "devices[].transport.queues[].used_ring",
            "devices[].transport.status",
            "devices[].transport.unknown_features_acked",
            "memory",
            "memory.data_bytes",
            "serial",
            "serial.baud_divisor_high",
            "serial.baud_divisor_low",
            "serial.in_buffer",
            "serial.interrupt_enable",
            "serial.interrupt_identification",
            "serial.line_control",
            "serial.line_status",
            "serial.modem_control",
            "serial.modem_status",
            "serial.scratch",
            "vcpus",
            "vcpus[].cpuid",
            "vcpus[].debugregs",
            "vcpus[].id",
            "vcpus[].lapic",
            "vcpus[].mp_state",
            "vcpus[].msrs",
            "vcpus[].regs",
            "vcpus[].sregs",
            "vcpus[].tsc_khz",
            "vcpus[].vcpu_events",
            "vcpus[].xcrs",
            "vcpus[].xsave",
            "vm",
            "vm.memory_mib",
            "vm.ram_regions",
            "vm.ram_regions[].file_offset",
            "vm.ram_regions[].guest_addr",
            "vm.ram_regions[].size",
            "vm.state",
            "vm.state.clock",
            "vm.state.ioapic",
            "vm.state.pic_master",
            "vm.state.pic_slave",
            "vm.state.pit",
            "vm.vcpus",
        ];
        assert_eq!(
            paths, want,
            "the snapshot body's fields changed: bump FORMAT_VERSION, then update this list"
        );
    }
}
