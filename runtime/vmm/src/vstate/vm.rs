//! The KVM VM: memory slots, in-kernel irqchip and PIT, irqfd/ioeventfd.

use kvm_bindings::{
    kvm_enable_cap, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_CAP_PMU_CAPABILITY,
    KVM_CAP_X86_MSR_FILTER, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, KVM_PMU_CAP_DISABLE,
};
use kvm_ioctls::{
    Cap, Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd,
};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// VM errors. Each names the KVM step that failed, so a host KVM that
/// refuses a feature (nested kvm_pvm) is reported clearly.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("Failed to open /dev/kvm")]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("Failed to create the KVM VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    #[error("KVM lacks the required capability {0:?}")]
    MissingCap(Cap),
    #[error("KVM refused the TSS address")]
    SetTss(#[source] kvm_ioctls::Error),
    #[error("KVM refused the identity map address")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("KVM refused to create the in-kernel irqchip (set \"irqchip\": false for raw-image guests on hosts without it)")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM refused to create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("Memory slot {slot} at {addr:#x} (+{size:#x}) refused by KVM")]
    MemorySlot {
        slot: u32,
        addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Failed to read KVM's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    #[error("Failed to create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
}

/// One KVM VM.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    irqchip: bool,
}

impl Vm {
    /// Opens `/dev/kvm` and creates a VM; with `irqchip`, also the in-kernel
    /// IOAPIC/PIC/LAPIC and the PIT.
    pub fn new(irqchip: bool) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        for cap in [Cap::UserMemory, Cap::Ioeventfd, Cap::ImmediateExit] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        let vm = Vm { kvm, fd, irqchip };
        vm.hide_pmu();
        if irqchip {
            vm.setup_irqchip()?;
        }
        Ok(vm)
    }

    /// The KVM half of "no PMU" (the CPUID half is `cpuid::hide_pmu`), both
    /// before any vCPU exists, as KVM requires. Best effort: a host without
    /// either capability still boots the guest (logged).
    ///
    /// 1. KVM_CAP_PMU_CAPABILITY / KVM_PMU_CAP_DISABLE: no virtual PMU for
    ///    this VM even where the host has one, so the counters CPUID cannot
    ///    hide (AMD's legacy four) and RDPMC are not emulated either. Hosts
    ///    without a vPMU (kvm.enable_pmu off, or none to offer) do not
    ///    report the capability; nothing to turn off there.
    /// 2. An MSR filter denying the legacy AMD counter MSRs
    ///    (`msr::pmu_msr_filter`): without a vPMU KVM reads them as 0 and
    ///    drops writes, so Linux's probe wrote PERF_CTR3 and KVM logged
    ///    "Unhandled WRMSR(0xc0010007)" per boot. Denied, the probe's first
    ///    read faults and Linux gives up before writing anything.
    fn hide_pmu(&self) {
        let vpmu = match self
            .fd
            .check_extension_raw(u64::from(KVM_CAP_PMU_CAPABILITY))
        {
            r if r & KVM_PMU_CAP_DISABLE as i32 == 0 => "host KVM has no vPMU to disable",
            _ => {
                let cap = kvm_enable_cap {
                    cap: KVM_CAP_PMU_CAPABILITY,
                    args: [u64::from(KVM_PMU_CAP_DISABLE), 0, 0, 0],
                    ..Default::default()
                };
                match self.fd.enable_cap(&cap) {
                    Ok(()) => "disabled",
                    Err(e) => {
                        tracing::warn!(error = %e, "KVM refused to disable the vPMU");
                        "left on (refused)"
                    }
                }
            }
        };
        let filter = if self
            .fd
            .check_extension_raw(u64::from(KVM_CAP_X86_MSR_FILTER))
            <= 0
        {
            "unsupported by host KVM"
        } else {
            let (base, msr_count, bitmap) = crate::arch::x86_64::msr::pmu_msr_filter();
            let range = MsrFilterRange {
                flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
                base,
                msr_count,
                bitmap: &bitmap,
            };
            match self
                .fd
                .set_msr_filter(MsrFilterDefaultAction::ALLOW, &[range])
            {
                Ok(()) => "legacy AMD counter MSRs denied",
                Err(e) => {
                    tracing::warn!(error = %e, "KVM refused the PMU MSR filter");
                    "refused"
                }
            }
        };
        tracing::info!(vpmu, msr_filter = filter, "PMU hidden from the guest");
    }

    fn setup_irqchip(&self) -> Result<(), VmError> {
        for cap in [Cap::Irqchip, Cap::Irqfd, Cap::Pit2] {
            if !self.kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(VmError::SetIdentityMap)?;
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTss)?;
        self.fd.create_irq_chip().map_err(VmError::CreateIrqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(VmError::CreatePit)
    }

    /// Whether the in-kernel irqchip exists.
    pub fn has_irqchip(&self) -> bool {
        self.irqchip
    }

    /// The `/dev/kvm` handle the VM was created from.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Registers every region of `mem` as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| VmError::MemorySlot {
                    slot,
                    addr: region.start_addr().0,
                    size: region.len(),
                    source: kvm_ioctls::Error::new(libc::EFAULT),
                })?;
            let r = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: the mapping behind `host` is owned by `mem`, which the
            // caller keeps alive for as long as the VM exists (the builder
            // holds both until the VM is dropped).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(|source| VmError::MemorySlot {
                slot,
                addr: r.guest_phys_addr,
                size: r.memory_size,
                source,
            })?;
        }
        Ok(())
    }

    /// KVM_GET_SUPPORTED_CPUID.
    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(VmError::SupportedCpuid)
    }

    /// Creates vCPU `id`.
    pub fn create_vcpu(&self, id: u8) -> Result<VcpuFd, VmError> {
        self.fd
            .create_vcpu(u64::from(id))
            .map_err(|e| VmError::CreateVcpu(id, e))
    }
}
