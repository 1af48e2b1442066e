//! How big a sandbox's VM is: from what the pod asks, within what the
//! config and the host allow.
//!
//! The pod's figures come, in this order, from
//! 1. the CRI plugin's sandbox annotations (`io.kubernetes.cri.sandbox-cpu-quota`,
//!    `…-cpu-period`, `…-memory`): the kubelet's pod-level limits, the sum
//!    of its containers' plus nothing else;
//! 2. the resources of the container that boots the VM, when it is its own
//!    sandbox (`ctr run --cpu-quota 200000 --cpu-period 100000 --memory-limit 1073741824`);
//!
//! and where neither gives a figure, the config's `guest.vcpus` /
//! `guest.memory_mib` stand. vCPUs are the quota over the period, rounded
//! up; memory is the limit plus `guest.reserved_memory_mib`, what the guest
//! kernel, the agent and its initramfs root need, so that a container
//! limited to 1 GiB can use 1 GiB. A VM is at least 1 vCPU and
//! [`MIN_MEMORY_MIB`]; a pod that needs more than `guest.max_vcpus` /
//! `guest.max_memory_mib`, or more than the host has, is refused with the
//! figures, not silently capped.
//!
//! Both can grow within what the VM is built with. It is built with as many
//! vCPUs as `guest.max_vcpus` and the host allow and boots with only the
//! pod's online (`maxcpus=`); the shim brings more online when an update
//! asks for more CPU. It is built with `guest.memory_headroom_mib` more
//! memory than the pod's, held by the balloon from boot; the shim lowers
//! the balloon's target when an update asks for more memory
//! (docs/resources.md).

use std::collections::HashMap;

use crate::config::{GuestConfig, MIN_MEMORY_MIB};

/// CRI annotations on the sandbox container: the pod's CPU quota and period
/// (µs) and memory limit (bytes), from the kubelet's pod-level resources.
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

const MIB: u64 = 1 << 20;

/// What the pod asks for; None where it sets no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodResources {
    /// CPU quota and period in µs (both needed to make a CPU count).
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    /// Memory limit in bytes.
    pub memory_limit: Option<i64>,
    /// Where the figures came from, for messages.
    pub source: &'static str,
}

impl PodResources {
    /// The CRI plugin's sandbox annotations, if it set any limit.
    pub fn from_cri_annotations(annotations: &HashMap<String, String>) -> Option<Self> {
        let get = |k: &str| {
            annotations
                .get(k)
                .and_then(|v| v.trim().parse::<i64>().ok())
        };
        let r = PodResources {
            cpu_quota: get(CRI_SANDBOX_CPU_QUOTA),
            cpu_period: get(CRI_SANDBOX_CPU_PERIOD).and_then(|p| u64::try_from(p).ok()),
            memory_limit: get(CRI_SANDBOX_MEMORY),
            source: "the pod's limits (CRI sandbox annotations)",
        };
        (r.vcpus().is_some() || r.memory_mib().is_some()).then_some(r)
    }

    /// CPUs the quota allows, rounded up; None when unlimited.
    pub fn vcpus(&self) -> Option<u64> {
        match (self.cpu_quota, self.cpu_period) {
            (Some(q), Some(p)) if q > 0 && p > 0 => Some((q as u64).div_ceil(p)),
            _ => None,
        }
    }

    /// The memory limit in MiB, rounded up; None when unlimited.
    pub fn memory_mib(&self) -> Option<u64> {
        // runc and the kubelet write "unlimited" as -1 or 0, and some as
        // the largest page-aligned i64: nothing a VM could be.
        self.memory_limit
            .filter(|l| *l > 0 && *l < i64::MAX / 2)
            .map(|l| (l as u64).div_ceil(MIB))
    }
}

/// What this host can give one VM.
#[derive(Debug, Clone, Copy)]
pub struct HostCapacity {
    pub cpus: u64,
    /// `MemTotal`: no VM may be larger.
    pub memory_mib: u64,
    /// `MemAvailable`: what a new VM may still touch without pushing the
    /// host towards its OOM killer.
    pub available_mib: u64,
}

impl HostCapacity {
    /// Online CPUs, `MemTotal` and `MemAvailable`.
    pub fn of_this_host() -> Self {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let field = |name: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(u64::MAX, |kib| kib / 1024)
        };
        HostCapacity {
            cpus,
            memory_mib: field("MemTotal:"),
            available_mib: field("MemAvailable:"),
        }
    }
}

/// The host has too little memory left to boot one more VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this host has {available_mib} MiB of memory available; booting a VM takes \
     {boot_mib} MiB (guest.reserved_memory_mib) and runtime.host_memory_floor_mib = \
     {floor_mib} MiB must stay free"
)]
pub struct HostMemoryLow {
    pub available_mib: u64,
    pub boot_mib: u64,
    pub floor_mib: u64,
}

/// Refuses a boot that would leave the host less than `floor_mib` of
/// available memory: the guest touches about `guest.reserved_memory_mib`
/// as it boots (the rest of its memory only as its containers use it, and
/// the pod's cgroup bounds that), so this is the figure known up front. A
/// clear error here instead of the host's OOM killer later, when many
/// sandboxes start at once on a full node.
pub fn check_host_memory(
    guest: &GuestConfig,
    host: HostCapacity,
    floor_mib: u64,
) -> Result<(), HostMemoryLow> {
    let boot_mib = u64::from(guest.reserved_memory_mib);
    if host.available_mib < boot_mib.saturating_add(floor_mib) {
        return Err(HostMemoryLow {
            available_mib: host.available_mib,
            boot_mib,
            floor_mib,
        });
    }
    Ok(())
}

/// How many MiB of guest memory take one MiB of the guest kernel's page
/// records (64 bytes per 4 KiB page).
const PAGE_RECORDS_PER_MIB: u32 = 4096 / 64;

/// A VM's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    /// vCPUs online at boot (`maxcpus=` on the guest command line).
    pub vcpus: u32,
    /// vCPUs the VM is built with: room to grow into
    /// ([`VmSize::present_vcpus`]).
    pub present_vcpus: u32,
    /// The guest's memory at boot: the pod's limit plus `reserved_mib`.
    pub memory_mib: u32,
    /// The memory the VM is built with: `memory_mib` plus the headroom the
    /// balloon holds from boot (`guest.memory_headroom_mib`, within
    /// `guest.max_memory_mib` and the host's memory), which an update
    /// asking for more memory hands to the guest.
    pub present_memory_mib: u32,
    /// Of the guest's memory, what the guest itself takes: the config's
    /// `guest.reserved_memory_mib`, plus its page records of the headroom
    /// (1/64 of it). A container limit of L needs L plus this, before and
    /// after the headroom is given.
    pub reserved_mib: u32,
}

impl VmSize {
    /// The vCPUs a VM of `vcpus` online is built with: as many as the
    /// config and the host allow, so that a pod whose CPU grows
    /// (`UpdateContainerResources`) can be given them by bringing them
    /// online in the guest — no vCPU hot-plug is needed. An offline vCPU
    /// costs the host a sleeping thread.
    pub fn with_headroom(vcpus: u32, guest: &GuestConfig, host: HostCapacity) -> VmSize {
        let room = u64::from(guest.max_vcpus)
            .min(host.cpus)
            .max(u64::from(vcpus));
        VmSize {
            vcpus,
            present_vcpus: u32::try_from(room).unwrap_or(vcpus),
            memory_mib: 0,
            present_memory_mib: 0,
            reserved_mib: guest.reserved_memory_mib,
        }
    }

    /// The memory a VM whose guest boots with `memory_mib` is built with:
    /// that plus `guest.memory_headroom_mib`, as far as
    /// `guest.max_memory_mib` and the host's memory allow. The headroom
    /// costs the host only the guest kernel's record of each page (about
    /// 1.6%) until an update gives it to the guest.
    pub fn present_memory(memory_mib: u32, guest: &GuestConfig, host: HostCapacity) -> u32 {
        let room = u64::from(memory_mib)
            .saturating_add(guest.memory_headroom_mib.into())
            .min(guest.max_memory_mib.into())
            .min(host.memory_mib)
            .max(memory_mib.into());
        u32::try_from(room).unwrap_or(memory_mib)
    }
}

/// A pod this node cannot hold.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin} ask for {asked} {what}, more than {limit_name} allows ({limit})")]
pub struct TooBig {
    pub origin: &'static str,
    pub asked: u64,
    pub what: &'static str,
    pub limit_name: String,
    pub limit: u64,
}

/// The VM's size for `pod` (see the module doc). `fixed` names the figures
/// an `io.boxlite.*` annotation set explicitly: those stand as they are.
pub fn size_vm(
    guest: &GuestConfig,
    host: HostCapacity,
    pod: &PodResources,
    fixed: Fixed,
) -> Result<VmSize, TooBig> {
    let mut size = VmSize {
        vcpus: guest.vcpus,
        present_vcpus: guest.vcpus,
        memory_mib: guest.memory_mib,
        present_memory_mib: guest.memory_mib,
        reserved_mib: guest.reserved_memory_mib,
    };
    if let (Some(cpus), false) = (pod.vcpus(), fixed.vcpus) {
        check(
            pod,
            cpus,
            "vCPUs",
            "guest.max_vcpus",
            guest.max_vcpus.into(),
        )?;
        check(pod, cpus, "vCPUs", "this host's online CPUs", host.cpus)?;
        size.vcpus = u32::try_from(cpus.max(1)).expect("checked against max_vcpus");
    }
    if let (Some(limit), false) = (pod.memory_mib(), fixed.memory) {
        let vm = (limit + u64::from(guest.reserved_memory_mib)).max(MIN_MEMORY_MIB.into());
        let what = "MiB of VM memory (the limit plus guest.reserved_memory_mib)";
        check(
            pod,
            vm,
            what,
            "guest.max_memory_mib",
            guest.max_memory_mib.into(),
        )?;
        check(pod, vm, what, "this host's memory", host.memory_mib)?;
        size.memory_mib = u32::try_from(vm).expect("checked against max_memory_mib");
    }
    size.present_vcpus = VmSize::with_headroom(size.vcpus, guest, host).present_vcpus;
    size.present_memory_mib = VmSize::present_memory(size.memory_mib, guest, host);
    // The guest kernel keeps a 64-byte record of every 4 KiB page it is
    // given, the balloon's included (1/64 of it), and keeps it in the
    // memory it boots with: that much of the headroom is the guest's from
    // boot, so the pod still gets its limit plus the reserve.
    let records = (size.present_memory_mib - size.memory_mib).div_ceil(PAGE_RECORDS_PER_MIB);
    size.memory_mib += records;
    size.reserved_mib += records;
    Ok(size)
}

/// Which figures an explicit `io.boxlite.guest.*` annotation fixed.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fixed {
    pub vcpus: bool,
    pub memory: bool,
}

fn check(
    pod: &PodResources,
    asked: u64,
    what: &'static str,
    limit_name: &str,
    limit: u64,
) -> Result<(), TooBig> {
    if asked > limit {
        return Err(TooBig {
            origin: pod.source,
            asked,
            what,
            limit_name: limit_name.to_owned(),
            limit,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOST: HostCapacity = HostCapacity {
        cpus: 8,
        memory_mib: 32768,
        available_mib: 1024,
    };

    fn pod(quota: Option<i64>, period: Option<u64>, memory: Option<i64>) -> PodResources {
        PodResources {
            cpu_quota: quota,
            cpu_period: period,
            memory_limit: memory,
            source: "the test pod's limits",
        }
    }

    fn guest() -> GuestConfig {
        GuestConfig::default()
    }

    #[test]
    fn no_limits_keep_the_config_defaults() {
        let size = size_vm(&guest(), HOST, &PodResources::default(), Fixed::default()).unwrap();
        // Built with every vCPU the host has (8 < max_vcpus 16), 1 online.
        assert_eq!(
            size,
            VmSize {
                vcpus: 1,
                present_vcpus: 8,
                memory_mib: 512,
                present_memory_mib: 512,
                reserved_mib: 128,
            }
        );
        // -1 and 0 are "unlimited" in OCI and CRI.
        let unlimited = pod(Some(-1), Some(100_000), Some(0));
        assert_eq!(
            size_vm(&guest(), HOST, &unlimited, Fixed::default()).unwrap(),
            size
        );
    }

    #[test]
    fn headroom_is_added_within_max_memory_and_the_host() {
        let mut g = guest();
        g.memory_headroom_mib = 512;
        let p = pod(None, None, Some(256 << 20));
        let size = size_vm(&g, HOST, &p, Fixed::default()).unwrap();
        // 256 + 128 of the reserve, + 8 for the page records of the 512
        // the balloon holds (they live in the guest's own memory).
        assert_eq!((size.memory_mib, size.present_memory_mib), (392, 896));
        assert_eq!(size.reserved_mib, 136, "the records stay the guest's");
        // No limit: the config's size, with the headroom too.
        let size = size_vm(&g, HOST, &PodResources::default(), Fixed::default()).unwrap();
        assert_eq!((size.memory_mib, size.present_memory_mib), (520, 1024));
        // Clamped by max_memory_mib, then by the host; never below the
        // guest's own memory.
        g.max_memory_mib = 600;
        let size = size_vm(&g, HOST, &p, Fixed::default()).unwrap();
        assert_eq!((size.memory_mib, size.present_memory_mib), (388, 600));
        g.max_memory_mib = 65536;
        let small_host = HostCapacity {
            memory_mib: 700,
            ..HOST
        };
        assert_eq!(VmSize::present_memory(384, &g, small_host), 700);
        assert_eq!(VmSize::present_memory(800, &g, small_host), 800);
        g.memory_headroom_mib = 0;
        assert_eq!(VmSize::present_memory(384, &g, HOST), 384);
    }

    #[test]
    fn limits_size_the_vm_with_the_guest_reserve_on_top() {
        let g = guest();
        let p = pod(Some(200_000), Some(100_000), Some(1 << 30));
        let size = size_vm(&g, HOST, &p, Fixed::default()).unwrap();
        assert_eq!(
            size,
            VmSize {
                vcpus: 2,
                present_vcpus: 8,
                memory_mib: 1024 + g.reserved_memory_mib,
                present_memory_mib: 1024 + g.reserved_memory_mib,
                reserved_mib: g.reserved_memory_mib,
            }
        );
        let mut small_max = g.clone();
        small_max.max_vcpus = 4;
        assert_eq!(
            size_vm(&small_max, HOST, &p, Fixed::default())
                .unwrap()
                .present_vcpus,
            4
        );
        // Half a CPU is one vCPU; a tiny limit still gets a bootable VM.
        let small = pod(Some(50_000), Some(100_000), Some(1 << 20));
        let size = size_vm(&g, HOST, &small, Fixed::default()).unwrap();
        assert_eq!(size.vcpus, 1);
        assert_eq!(
            size.memory_mib,
            (1 + g.reserved_memory_mib).max(MIN_MEMORY_MIB)
        );
    }

    #[test]
    fn an_explicit_annotation_wins_over_the_pods_limits() {
        let mut g = guest();
        g.vcpus = 3;
        let p = pod(Some(200_000), Some(100_000), Some(1 << 30));
        let fixed = Fixed {
            vcpus: true,
            memory: false,
        };
        assert_eq!(size_vm(&g, HOST, &p, fixed).unwrap().vcpus, 3);
    }

    #[test]
    fn a_pod_bigger_than_the_config_or_the_host_is_refused_with_figures() {
        let g = guest();
        let err = size_vm(
            &g,
            HOST,
            &pod(Some(1_700_000), Some(100_000), None),
            Fixed::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the test pod's limits ask for 17 vCPUs, more than guest.max_vcpus allows (16)"
        );
        let err = size_vm(
            &g,
            HOST,
            &pod(Some(900_000), Some(100_000), None),
            Fixed::default(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "the test pod's limits ask for 9 vCPUs, more than this host's online CPUs allows (8)"
        );
        let err =
            size_vm(&g, HOST, &pod(None, None, Some(80 << 30)), Fixed::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "the test pod's limits ask for {} MiB of VM memory (the limit plus guest.reserved_memory_mib), \
                 more than guest.max_memory_mib allows ({})",
                80 * 1024 + g.reserved_memory_mib,
                g.max_memory_mib
            )
        );
        let err =
            size_vm(&g, HOST, &pod(None, None, Some(40 << 30)), Fixed::default()).unwrap_err();
        assert!(
            err.to_string()
                .ends_with("more than this host's memory allows (32768)"),
            "{err}"
        );
    }

    #[test]
    fn a_boot_that_would_leave_the_host_below_its_floor_is_refused() {
        let g = guest();
        check_host_memory(&g, HOST, 1024 - u64::from(g.reserved_memory_mib)).unwrap();
        let err = check_host_memory(&g, HOST, 1024).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "this host has 1024 MiB of memory available; booting a VM takes {} MiB \
                 (guest.reserved_memory_mib) and runtime.host_memory_floor_mib = 1024 MiB must stay free",
                g.reserved_memory_mib
            )
        );
    }

    #[test]
    fn cri_annotations_are_read_when_they_set_a_limit() {
        let a: HashMap<String, String> = [
            (CRI_SANDBOX_CPU_QUOTA, "150000"),
            (CRI_SANDBOX_CPU_PERIOD, "100000"),
            (CRI_SANDBOX_MEMORY, "268435456"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let r = PodResources::from_cri_annotations(&a).unwrap();
        assert_eq!((r.vcpus(), r.memory_mib()), (Some(2), Some(256)));
        let none: HashMap<String, String> =
            [(CRI_SANDBOX_MEMORY.to_owned(), "0".to_owned())].into();
        assert_eq!(PodResources::from_cri_annotations(&none), None);
    }
}
