//! CPUID: KVM_GET_SUPPORTED_CPUID normalised for the VM, then per vCPU.
//!
//! [`normalize_vm`] (once per VM): no performance-monitoring unit is
//! advertised (see [`hide_pmu`]), and the paravirtual clock leaves say what
//! KVM can actually keep (see [`ClockPolicy`]).
//!
//! [`normalize`] (per vCPU): topology is one socket, one thread per core,
//! `nvcpus` cores; APIC id = vCPU index. The hypervisor bit is set and leaf
//! 0x4000_0000 carries the KVM signature so the guest's KVM paravirt code
//! (kvmclock, PV EOI) finds us.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// CPUID errors.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("Failed to add CPUID leaf {0:#x}: the entry list is full")]
    Full(u32),
}

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_KVM_FEATURES: u32 = 0x4000_0001;

const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_POWER: u32 = 0x8000_0007;

const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:ECX.TSC_DEADLINE_TIMER. KVM's in-kernel LAPIC always emulates the
/// TSC-deadline mode (KVM_CAP_TSC_DEADLINE_TIMER) but KVM_GET_SUPPORTED_CPUID
/// leaves the bit clear for the VMM to set (QEMU, Firecracker and Cloud
/// Hypervisor all do). Without it Linux calibrates the LAPIC timer against
/// the PIT; found booting Linux 6.1 in the nested test host, where that
/// calibration failed ("APIC timer disabled due to verification failure"),
/// the guest fell back to the PIT, and an idle guest was never woken again.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
const EDX_HTT: u32 = 1 << 28;
const KVM_SIGNATURE: &[u8; 12] = b"KVMKVMKVM\0\0\0";

const TOPO_LEVEL_SMT: u32 = 1;
const TOPO_LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (ceil(log2(n))).
fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

// --- Performance monitoring -------------------------------------------------
//
// boxlite-vmm gives its guests no PMU. KVM's virtual PMU (when the host has
// one and `kvm.enable_pmu` is on) costs an exit per counter access, leaks
// host-side timing, and nothing we run in a pod needs hardware counters; a
// guest that finds none uses software perf events ("PMU not available due to
// virtualization"). Newer host kernels report more of the PMU through
// KVM_GET_SUPPORTED_CPUID (PerfCtrExtCore and PerfMonV2 since Linux 6.2, for
// example), so every enumeration Linux's perf code reads is cleared here
// rather than relying on what this host's KVM happens to report.
//
// CPUID alone cannot hide AMD's four legacy counters (K7 PERF_CTL0-3 /
// PERF_CTR0-3, MSRs 0xc001_0000-7): they have no CPUID bit. Linux's
// amd_pmu_init() uses them on every AMD family >= 6 without the core
// extension, and check_hw_exists() then writes PERF_CTR3 to see whether the
// counter holds the value. On a host without a vPMU that write is what KVM
// logged as "Unhandled WRMSR(0xc0010007) = 0xffff" for every guest boot.
// The VM-level half of hiding the PMU is therefore in `vstate::vm`
// (KVM_CAP_PMU_CAPABILITY and an MSR filter on exactly those MSRs).

/// CPUID.1:ECX.PDCM: IA32_PERF_CAPABILITIES (MSR 0x345) exists. Linux's
/// Intel perf driver reads it for the LBR format and PEBS; with no PMU there
/// is nothing to describe, and KVM only backs the MSR with a vPMU.
const ECX_PDCM: u32 = 1 << 15;
/// Leaf 0xA: Intel architectural performance monitoring (version, counter
/// count and width, fixed counters). All zero means version 0: Linux then
/// sets no ARCH_PERFMON, falls back to the P6 driver, which refuses every
/// CPU model made since the Pentium M, and never probes a counter MSR.
const LEAF_ARCH_PERFMON: u32 = 0xa;
/// CPUID.8000_0001:ECX.IBS: AMD instruction-based sampling (perf/amd/ibs.c
/// reads its MSRs and an APIC LVT offset when set).
const ECX_EXT_IBS: u32 = 1 << 10;
/// CPUID.8000_0001:ECX.PerfCtrExtCore: six core counters at MSRs
/// 0xc001_0200-0xc001_020b. With it Linux's AMD driver uses (and probes)
/// those instead of the legacy four.
const ECX_EXT_PERFCTR_CORE: u32 = 1 << 23;
/// CPUID.8000_0001:ECX.PerfCtrExtNB: northbridge / data-fabric counters
/// (perf/amd/uncore.c).
const ECX_EXT_PERFCTR_NB: u32 = 1 << 24;
/// CPUID.8000_0001:ECX.PerfCtrExtLLC: last-level-cache counters
/// (perf/amd/uncore.c).
const ECX_EXT_PERFCTR_LLC: u32 = 1 << 28;
/// Leaf 0x8000_0022: AMD PerfMonV2 (EAX bit 0), LBRv2, and the number of
/// core and northbridge counters. Zero: no PerfMonV2, no counters.
const LEAF_AMD_PERFMON_V2: u32 = 0x8000_0022;

/// Clears every PMU enumeration in `cpuid`; see the section comment above.
pub fn hide_pmu(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => e.ecx &= !ECX_PDCM,
            LEAF_ARCH_PERFMON | LEAF_AMD_PERFMON_V2 => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_EXT_FEATURES => {
                e.ecx &=
                    !(ECX_EXT_IBS | ECX_EXT_PERFCTR_CORE | ECX_EXT_PERFCTR_NB | ECX_EXT_PERFCTR_LLC)
            }
            _ => {}
        }
    }
}

// --- Time: TSC and kvmclock --------------------------------------------------

/// KVM_FEATURE_CLOCKSOURCE (kvmclock at the old MSRs 0x11/0x12).
const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
/// KVM_FEATURE_CLOCKSOURCE2 (kvmclock at MSRs 0x4b56_4d00/01).
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
/// KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: the guest may believe
/// PVCLOCK_TSC_STABLE_BIT when KVM sets it in a kvmclock update.
const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
/// CPUID.4000_0001:EDX.KVM_HINTS_REALTIME: "vCPUs are never preempted".
const KVM_HINTS_REALTIME: u32 = 1 << 0;
/// CPUID.8000_0007:EDX.InvariantTSC (Linux: CONSTANT_TSC + NONSTOP_TSC).
const EDX_INVARIANT_TSC: u32 = 1 << 8;

/// What the guest is told about time.
///
/// - **kvmclock** (leaf 0x4000_0001): CLOCKSOURCE and CLOCKSOURCE2 as KVM
///   reports them, and CLOCKSOURCE_STABLE_BIT whenever kvmclock is offered.
///   The bit does not itself claim a stable TSC: it lets the guest believe
///   PVCLOCK_TSC_STABLE_BIT in each kvmclock update, and KVM sets that flag
///   only while it runs its "master clock" (host clocksource is the TSC and
///   every vCPU's TSC is in sync). When KVM cannot, the flag is absent and
///   the guest keeps its cross-CPU monotonicity guard. KVM itself reports
///   the bit; we set it deliberately so a host that drops it does not turn
///   off the guest's stable sched_clock where KVM can provide one.
/// - **KVM_HINTS_REALTIME** is always cleared (KVM does not report it; this
///   makes it deliberate): it tells the guest its vCPUs are dedicated and
///   never preempted, so Linux drops PV spinlocks and PV TLB flushes and
///   may load the polling idle driver. boxlite vCPUs share host CPUs with
///   other pods; a preempted lock holder would then be spun on.
/// - **Invariant TSC** (0x8000_0007 EDX bit 8) only when KVM reports it
///   *and* the host itself keeps time with its TSC ([`ClockPolicy::from_host`]).
///   A Linux guest that sees invariant TSC (and TSC_ADJUST) rates kvm-clock
///   below the TSC and switches its clocksource watchdog off for the TSC:
///   it trusts the TSC completely. That is right on a server whose TSC is
///   the host clocksource; on a host that marked its TSC unstable (or never
///   used it, as in our nested TCG test host) KVM has no master clock, the
///   guest's TSC and kvm-clock drift apart, and an unwatched guest TSC goes
///   wrong silently. Without the bit the guest keeps kvm-clock as its
///   clocksource and only watches the TSC.
/// - **No TSC-frequency leaf** (0x4000_0010) and no KVM_SET_TSC_KHZ: the
///   vCPUs' TSC runs at the host rate (scaling needs hardware TSC scaling
///   and only matters for migration, which we do not do), and a Linux guest
///   with kvmclock takes the TSC frequency from kvmclock's scale factors
///   (kvm_get_tsc_khz, marking it TSC_KNOWN_FREQ) instead of calibrating;
///   Linux reads 0x4000_0010 only under a VMware signature. Intel's 0x15 /
///   0x16 pass through as KVM reports them (unused by a kvmclock guest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClockPolicy {
    /// Keep CPUID.8000_0007:EDX.InvariantTSC if KVM reports it.
    pub invariant_tsc: bool,
}

/// Where the host kernel names its clocksource.
pub const HOST_CLOCKSOURCE_PATH: &str =
    "/sys/devices/system/clocksource/clocksource0/current_clocksource";

impl ClockPolicy {
    /// The policy for a host whose current clocksource is `clocksource`
    /// (None: unknown, e.g. no sysfs): invariant TSC only on a TSC host.
    /// `tsc-early` does not count: it is the provisional TSC clocksource of
    /// a host's first seconds, before the refined calibration and before
    /// the clocksource watchdog has had a chance to mark the TSC unstable.
    pub fn for_host_clocksource(clocksource: Option<&str>) -> Self {
        ClockPolicy {
            invariant_tsc: clocksource.map(str::trim) == Some("tsc"),
        }
    }

    /// Reads [`HOST_CLOCKSOURCE_PATH`] (before the jail).
    pub fn from_host() -> (Self, Option<String>) {
        let cs = std::fs::read_to_string(HOST_CLOCKSOURCE_PATH)
            .ok()
            .map(|s| s.trim().to_owned());
        (Self::for_host_clocksource(cs.as_deref()), cs)
    }
}

/// Applies `policy` to the kvmclock and TSC leaves; see [`ClockPolicy`].
pub fn normalize_clock(cpuid: &mut CpuId, policy: ClockPolicy) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_KVM_FEATURES => {
                if e.eax & (KVM_FEATURE_CLOCKSOURCE | KVM_FEATURE_CLOCKSOURCE2) != 0 {
                    e.eax |= KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;
                }
                e.edx &= !KVM_HINTS_REALTIME;
            }
            LEAF_EXT_POWER if !policy.invariant_tsc => e.edx &= !EDX_INVARIANT_TSC,
            _ => {}
        }
    }
}

/// Whether `cpuid` tells the guest its TSC is invariant.
pub fn advertises_invariant_tsc(cpuid: &CpuId) -> bool {
    cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == LEAF_EXT_POWER && e.edx & EDX_INVARIANT_TSC != 0)
}

/// The VM-wide part: [`hide_pmu`] and [`normalize_clock`].
pub fn normalize_vm(cpuid: &mut CpuId, policy: ClockPolicy) {
    hide_pmu(cpuid);
    normalize_clock(cpuid, policy);
}

/// Normalises `cpuid` for vCPU `vcpu_id` of `nvcpus`.
pub fn normalize(cpuid: &mut CpuId, vcpu_id: u8, nvcpus: u8) -> Result<(), CpuidError> {
    let id = u32::from(vcpu_id);
    let n = u32::from(nvcpus.max(1));
    let mut have_signature = false;
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (n << 16);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE => {
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax =
                    (e.eax & 0x0000_3fff) | ((sharing & 0xfff) << 14) | (((n - 1) & 0x3f) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                e.edx = id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPO_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = bits_for(n);
                        e.ebx = n;
                        e.ecx = (TOPO_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            LEAF_HYPERVISOR => {
                set_signature(e);
                have_signature = true;
            }
            _ => {}
        }
    }
    if !have_signature {
        let mut e = kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            ..Default::default()
        };
        set_signature(&mut e);
        cpuid
            .push(e)
            .map_err(|_| CpuidError::Full(LEAF_HYPERVISOR))?;
    }
    Ok(())
}

fn set_signature(e: &mut kvm_cpuid_entry2) {
    let word = |i: usize| {
        u32::from_le_bytes([
            KVM_SIGNATURE[i],
            KVM_SIGNATURE[i + 1],
            KVM_SIGNATURE[i + 2],
            KVM_SIGNATURE[i + 3],
        ])
    };
    e.eax = e.eax.max(LEAF_KVM_FEATURES);
    e.ebx = word(0);
    e.ecx = word(4);
    e.edx = word(8);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0000_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_topology_and_signature() {
        let mut c = CpuId::from_entries(&[
            entry(0x1, 0),
            kvm_cpuid_entry2 {
                function: 0x4,
                eax: 3 << 5,
                ..Default::default()
            },
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
        ])
        .expect("cpuid");
        normalize(&mut c, 2, 3).expect("normalize");
        let s = c.as_slice();
        assert_eq!(s[0].ebx >> 24, 2);
        assert_eq!((s[0].ebx >> 16) & 0xff, 3);
        assert_eq!(s[0].ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(s[0].ecx & ECX_HYPERVISOR, 0);
        assert_ne!(s[0].ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(s[0].edx & EDX_HTT, 0);
        assert_eq!(s[1].eax >> 26, 2);
        assert_eq!((s[1].eax >> 14) & 0xfff, 2);
        assert_eq!((s[2].ebx, s[2].edx, s[2].ecx >> 8), (1, 2, 1));
        assert_eq!((s[3].eax, s[3].ebx, s[3].ecx >> 8), (2, 3, 2));
        assert_eq!(s[4].ecx >> 8, 0);
        let sig = s
            .iter()
            .find(|e| e.function == LEAF_HYPERVISOR)
            .expect("sig");
        let mut bytes = Vec::new();
        for w in [sig.ebx, sig.ecx, sig.edx] {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        assert_eq!(&bytes, KVM_SIGNATURE);
    }

    fn full(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: !0,
            ebx: !0,
            ecx: !0,
            edx: !0,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .expect("leaf")
    }

    /// A supported-CPUID table with every bit set in the leaves we touch and
    /// in a few we must not.
    fn all_ones() -> CpuId {
        CpuId::from_entries(&[
            full(0x1, 0),
            full(0x7, 0),
            full(LEAF_ARCH_PERFMON, 0),
            full(LEAF_KVM_FEATURES, 0),
            full(LEAF_EXT_FEATURES, 0),
            full(LEAF_EXT_POWER, 0),
            full(0x8000_0008, 0),
            full(LEAF_AMD_PERFMON_V2, 0),
        ])
        .expect("cpuid")
    }

    #[test]
    fn pmu_leaf1_pdcm_cleared_rest_kept() {
        let mut c = all_ones();
        hide_pmu(&mut c);
        let e = find(&c, 0x1, 0);
        assert_eq!(e.ecx, !ECX_PDCM);
        assert_eq!((e.eax, e.ebx, e.edx), (!0, !0, !0));
    }

    #[test]
    fn pmu_intel_arch_perfmon_leaf_zeroed() {
        let mut c = all_ones();
        hide_pmu(&mut c);
        let e = find(&c, LEAF_ARCH_PERFMON, 0);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
    }

    #[test]
    fn pmu_amd_ext_counter_bits_cleared_rest_kept() {
        let mut c = all_ones();
        hide_pmu(&mut c);
        let e = find(&c, LEAF_EXT_FEATURES, 0);
        for bit in [10, 23, 24, 28] {
            assert_eq!(e.ecx & (1 << bit), 0, "8000_0001 ECX bit {bit}");
        }
        assert_eq!(e.ecx | (1 << 10) | (1 << 23) | (1 << 24) | (1 << 28), !0);
        assert_eq!((e.eax, e.ebx, e.edx), (!0, !0, !0));
    }

    #[test]
    fn pmu_amd_perfmon_v2_leaf_zeroed() {
        let mut c = all_ones();
        hide_pmu(&mut c);
        let e = find(&c, LEAF_AMD_PERFMON_V2, 0);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
    }

    #[test]
    fn pmu_hiding_leaves_other_leaves_alone() {
        let mut c = all_ones();
        hide_pmu(&mut c);
        for leaf in [0x7, LEAF_KVM_FEATURES, LEAF_EXT_POWER, 0x8000_0008] {
            assert_eq!(find(&c, leaf, 0), full(leaf, 0), "leaf {leaf:#x}");
        }
    }

    #[test]
    fn pmu_hiding_on_a_table_without_the_leaves_is_a_no_op() {
        let mut c = CpuId::from_entries(&[full(0x0, 0), full(0x8000_0000, 0)]).expect("cpuid");
        hide_pmu(&mut c);
        assert_eq!(c.as_slice(), &[full(0x0, 0), full(0x8000_0000, 0)]);
    }

    fn kvm_leaf(eax: u32, edx: u32) -> CpuId {
        CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: LEAF_KVM_FEATURES,
            eax,
            edx,
            ..Default::default()
        }])
        .expect("cpuid")
    }

    const ON_TSC: ClockPolicy = ClockPolicy {
        invariant_tsc: true,
    };
    const OFF_TSC: ClockPolicy = ClockPolicy {
        invariant_tsc: false,
    };

    #[test]
    fn kvmclock_gets_the_stable_bit_and_keeps_other_features() {
        // CLOCKSOURCE2, NOP_IO_DELAY (1), PV_EOI (6), PV_UNHALT (7)
        let features = KVM_FEATURE_CLOCKSOURCE2 | (1 << 1) | (1 << 6) | (1 << 7);
        let mut c = kvm_leaf(features, KVM_HINTS_REALTIME | (1 << 5));
        normalize_clock(&mut c, OFF_TSC);
        let e = find(&c, LEAF_KVM_FEATURES, 0);
        assert_eq!(e.eax, features | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT);
        assert_eq!(e.edx, 1 << 5, "REALTIME cleared, other hints kept");
    }

    #[test]
    fn no_stable_bit_without_kvmclock() {
        let mut c = kvm_leaf(1 << 6, 0);
        normalize_clock(&mut c, ON_TSC);
        assert_eq!(find(&c, LEAF_KVM_FEATURES, 0).eax, 1 << 6);
    }

    #[test]
    fn invariant_tsc_kept_only_by_policy() {
        for (policy, want) in [(ON_TSC, !0), (OFF_TSC, !EDX_INVARIANT_TSC)] {
            let mut c = all_ones();
            normalize_clock(&mut c, policy);
            let e = find(&c, LEAF_EXT_POWER, 0);
            assert_eq!(e.edx, want, "{policy:?}");
            assert_eq!(advertises_invariant_tsc(&c), policy.invariant_tsc);
            assert_eq!((e.eax, e.ebx, e.ecx), (!0, !0, !0));
        }
    }

    #[test]
    fn policy_from_host_clocksource() {
        let p = |cs| ClockPolicy::for_host_clocksource(cs).invariant_tsc;
        assert!(p(Some("tsc\n")));
        assert!(!p(Some("tsc-early")));
        assert!(!p(Some("kvm-clock")));
        assert!(!p(Some("hpet")));
        assert!(!p(Some("refined-jiffies")));
        assert!(!p(None));
    }

    #[test]
    fn normalize_vm_does_both() {
        let mut c = all_ones();
        normalize_vm(&mut c, OFF_TSC);
        assert_eq!(find(&c, LEAF_ARCH_PERFMON, 0).eax, 0);
        assert_eq!(find(&c, LEAF_EXT_POWER, 0).edx & EDX_INVARIANT_TSC, 0);
        assert_eq!(find(&c, LEAF_KVM_FEATURES, 0).edx & KVM_HINTS_REALTIME, 0);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 16].map(bits_for), [0, 1, 2, 2, 3, 4]);
    }
}
