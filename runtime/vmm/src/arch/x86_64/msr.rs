//! Model-specific registers set before the first instruction.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// AMD's legacy ("K7") performance counters: PERF_CTL0-3 at 0xc001_0000-3
/// and PERF_CTR0-3 at 0xc001_0004-7. They predate CPUID enumeration, so
/// CPUID cannot hide them (see `cpuid::hide_pmu`): Linux's AMD perf driver
/// uses them on any family >= 6, and its check_hw_exists() writes PERF_CTR3
/// (0xc001_0007) to see whether a counter is there.
pub const AMD_LEGACY_PMU_MSRS: std::ops::Range<u32> = 0xc001_0000..0xc001_0008;

/// The guest-MSR filter that completes hiding the PMU: one range over
/// [`AMD_LEGACY_PMU_MSRS`], reads and writes, every bit 0 (= deny), as
/// (base, count, bitmap). KVM answers a denied guest access with #GP (we do
/// not ask for user-space MSR exits). Linux's probe reads PERF_CTL0 with
/// rdmsrl_safe first, takes the fault as "PMU not available due to
/// virtualization" and never writes a counter; everything else the filter
/// does not name stays allowed (default action).
pub fn pmu_msr_filter() -> (u32, u32, Vec<u8>) {
    let count = AMD_LEGACY_PMU_MSRS.end - AMD_LEGACY_PMU_MSRS.start;
    (
        AMD_LEGACY_PMU_MSRS.start,
        count,
        vec![0u8; count.div_ceil(8) as usize],
    )
}

/// MSR errors.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    #[error("Failed to build the MSR list")]
    Build(#[source] vmm_sys_util::fam::Error),
    #[error("Failed to set MSRs")]
    Set(#[source] kvm_ioctls::Error),
    #[error("KVM set only {set} of {wanted} boot MSRs")]
    Partial { set: usize, wanted: usize },
}

/// The boot MSR values (index, data).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Writes the boot MSRs; all of them must be accepted.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set != entries.len() {
        return Err(MsrError::Partial {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pmu_filter_denies_exactly_the_legacy_amd_counters() {
        let (base, count, bitmap) = pmu_msr_filter();
        assert_eq!((base, count), (0xc001_0000, 8));
        assert!(base <= 0xc001_0007 && 0xc001_0007 < base + count);
        assert_eq!(bitmap, vec![0u8], "one byte, every MSR denied");
        // Nothing the guest needs at boot is in the range: not the boot
        // MSRs, not MSR_K7_HWCR (0xc001_0015) or the SYSCFG/TOM MSRs.
        for m in boot_msr_entries() {
            assert!(!AMD_LEGACY_PMU_MSRS.contains(&m.index), "{:#x}", m.index);
        }
        for m in [0xc001_0010, 0xc001_0015, 0xc001_001a, 0xc001_0200] {
            assert!(!AMD_LEGACY_PMU_MSRS.contains(&m), "{m:#x}");
        }
    }

    #[test]
    fn boot_msrs_enable_mtrr_write_back() {
        let e = boot_msr_entries();
        let mtrr = e
            .iter()
            .find(|m| m.index == MSR_MTRR_DEF_TYPE)
            .expect("mtrr");
        assert_eq!(mtrr.data, 0x806);
        assert!(Msrs::from_entries(&e).is_ok());
    }
}
