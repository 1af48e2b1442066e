//! CPUID: KVM_GET_SUPPORTED_CPUID normalised per vCPU.
//!
//! Topology: one socket, one thread per core, `nvcpus` cores; APIC id = vCPU
//! index. The hypervisor bit is set and leaf 0x4000_0000 carries the KVM
//! signature so the guest's KVM paravirt code (kvmclock, PV EOI) finds us.

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

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 16].map(bits_for), [0, 1, 2, 2, 3, 4]);
    }
}
