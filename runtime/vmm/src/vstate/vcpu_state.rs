//! A vCPU's whole KVM state, read from a stopped vCPU and written into a
//! fresh one: the vCPU part of snapshot and restore
//! (docs/snapshot-design.md §5.1 step 4, §5.2 step 7).
//!
//! The order of the KVM calls matters, and is the one KVM's API and
//! Firecracker's experience call for:
//! - save: `MP_STATE` first (reading it lets KVM accept pending INIT/SIPI
//!   events, which may change the other state), then registers, FPU/XSAVE,
//!   XCRs, debug registers, LAPIC, TSC rate, CPUID, MSRs, and the pending
//!   exception/interrupt/NMI state (`VCPU_EVENTS`) last, since the reads
//!   before it may still touch it;
//! - restore: CPUID first (which MSRs and features are valid depends on
//!   it), `MP_STATE`, `REGS` (which clears pending exceptions, so it comes
//!   before `VCPU_EVENTS`), `SREGS` (it carries the APIC base, so before the
//!   LAPIC), XSAVE, XCRs, debug registers, the LAPIC (before the MSRs: the
//!   TSC deadline only sticks with the LAPIC in deadline mode), the MSRs
//!   with `IA32_TSC_DEADLINE` alone after the rest (it is relative to the
//!   restored TSC), and `VCPU_EVENTS` last.
//!
//! The vCPU must not be inside an instruction: a vCPU that last exited for
//! port or MMIO I/O completes it on its next `KVM_RUN`, so the caller runs
//! it once with `immediate_exit` set first ([`complete_pending_io`]).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};
use serde::{Deserialize, Serialize};

/// `IA32_TSC_DEADLINE`: restored on its own, after `IA32_TSC`.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// KVM's MSRs that it reads in any VM but writes only with an in-kernel
/// LAPIC (`MSR_KVM_ASYNC_PF_INT`: the async page fault interrupt vector).
const NEED_IN_KERNEL_LAPIC: [u32; 1] = [0x4b56_4d06];

/// Everything KVM holds for one vCPU. The KVM structs serialize as their
/// raw bytes (kvm-bindings' `serde` feature).
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    /// The CPUID the vCPU runs with, as KVM has it installed.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    /// None when the VM has no in-kernel irqchip (raw-image guests).
    pub lapic: Option<kvm_lapic_state>,
    /// The guest's TSC rate; None where KVM cannot tell it.
    pub tsc_khz: Option<u32>,
    pub msrs: Vec<kvm_msr_entry>,
    pub vcpu_events: kvm_vcpu_events,
}

/// A KVM call on a vCPU failed. Each names the vCPU and the call.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    #[error("vCPU {id}: {call} failed")]
    Kvm {
        id: u8,
        call: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: {call} handled {done} of {total} MSRs (first refused: {first:#x})")]
    Msrs {
        id: u8,
        call: &'static str,
        done: usize,
        total: usize,
        first: u32,
    },
    #[error("vCPU {id}: {what}")]
    Invalid { id: u8, what: String },
}

fn kvm(id: u8, call: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Kvm { id, call, source }
}

/// Completes an instruction the vCPU left half done at its last exit (port
/// or MMIO I/O): one `KVM_RUN` with `immediate_exit` set, which finishes
/// it and returns `EINTR` before the guest runs another instruction.
pub fn complete_pending_io(id: u8, fd: &mut VcpuFd) -> Result<(), VcpuStateError> {
    fd.set_kvm_immediate_exit(1);
    let result = fd.run().map(|_| ());
    fd.set_kvm_immediate_exit(0);
    match result {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(e) => Err(kvm(id, "KVM_RUN with immediate_exit")(e)),
        Ok(()) => Err(VcpuStateError::Invalid {
            id,
            what: "KVM_RUN with immediate_exit ran the guest instead of returning EINTR".into(),
        }),
    }
}

/// The MSRs of this host's KVM that a vCPU of this VM can read: KVM's
/// list of MSRs to save, less those it refuses here (a feature the CPUID or
/// the host does not have). `fd` is any vCPU of the VM, with its CPUID set.
/// KVM's list holds at most 256 (`KVM_MAX_MSR_ENTRIES`), so one `Msrs`
/// carries them all. Without an in-kernel irqchip, the MSRs KVM could
/// not write back on restore are left out too.
pub fn saveable_msrs(
    kvm_fd: &Kvm,
    id: u8,
    fd: &VcpuFd,
    irqchip: bool,
) -> Result<Vec<u32>, VcpuStateError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm(id, "KVM_GET_MSR_INDEX_LIST"))?;
    let mut left: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|index| irqchip || !NEED_IN_KERNEL_LAPIC.contains(index))
        .collect();
    let mut readable = Vec::with_capacity(left.len());
    // KVM_GET_MSRS stops at the first MSR it refuses and says how many it
    // read: keep those, drop the refused one, ask again for the rest.
    while !left.is_empty() {
        let mut msrs = msrs_for(id, left.iter().copied())?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(kvm(id, "KVM_GET_MSRS"))?
            .min(left.len());
        readable.extend_from_slice(&left[..n]);
        left.drain(..(n + 1).min(left.len()));
    }
    Ok(readable)
}

/// KVM's MSR list holding `entries`.
fn msr_list(id: u8, entries: &[kvm_msr_entry]) -> Result<Msrs, VcpuStateError> {
    Msrs::from_entries(entries).map_err(|e| VcpuStateError::Invalid {
        id,
        what: format!("{} MSRs do not fit KVM's list: {e:?}", entries.len()),
    })
}

/// KVM's MSR list for reading the MSRs `indices`.
fn msrs_for(id: u8, indices: impl Iterator<Item = u32>) -> Result<Msrs, VcpuStateError> {
    let entries: Vec<kvm_msr_entry> = indices
        .map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    msr_list(id, &entries)
}

impl VcpuState {
    /// Reads the state of vCPU `id` (stopped, with no instruction pending)
    /// and the MSRs `msr_indices` ([`saveable_msrs`]).
    pub fn save(
        id: u8,
        fd: &VcpuFd,
        msr_indices: &[u32],
        irqchip: bool,
    ) -> Result<Self, VcpuStateError> {
        let mp_state = fd.get_mp_state().map_err(kvm(id, "KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(kvm(id, "KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(kvm(id, "KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(kvm(id, "KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(kvm(id, "KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(kvm(id, "KVM_GET_DEBUGREGS"))?;
        let lapic = if irqchip {
            Some(fd.get_lapic().map_err(kvm(id, "KVM_GET_LAPIC"))?)
        } else {
            None
        };
        // KVM_GET_TSC_KHZ needs KVM_CAP_GET_TSC_KHZ; without it the rate
        // is unknown and restore cannot compare it (it then trusts the host).
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm(id, "KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let mut msrs = msrs_for(id, msr_indices.iter().copied())?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm(id, "KVM_GET_MSRS"))?;
        if read != msr_indices.len() {
            return Err(VcpuStateError::Msrs {
                id,
                call: "KVM_GET_MSRS",
                done: read,
                total: msr_indices.len(),
                first: msr_indices[read.min(msr_indices.len() - 1)],
            });
        }
        let vcpu_events = fd
            .get_vcpu_events()
            .map_err(kvm(id, "KVM_GET_VCPU_EVENTS"))?;
        Ok(Self {
            id,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            tsc_khz,
            msrs: msrs.as_slice().to_vec(),
            vcpu_events,
        })
    }

    /// Writes this state into `fd`, a vCPU just created in a VM set up like
    /// the one it was saved from (irqchip or not, the same memory), with
    /// the CPUID it was saved with.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let cpuid = CpuId::from_entries(&self.cpuid).map_err(|e| VcpuStateError::Invalid {
            id: self.id,
            what: format!(
                "{} CPUID entries do not fit KVM's list: {e:?}",
                self.cpuid.len()
            ),
        })?;
        self.restore_with_cpuid(fd, &cpuid)
    }

    /// [`VcpuState::restore`] with `cpuid` set instead of the saved one:
    /// the CPUID the VMM set when the saved vCPU booted, which the restore
    /// has checked is what KVM reports for both.
    pub fn restore_with_cpuid(&self, fd: &VcpuFd, cpuid: &CpuId) -> Result<(), VcpuStateError> {
        let id = self.id;
        fd.set_cpuid2(cpuid).map_err(kvm(id, "KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(kvm(id, "KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(kvm(id, "KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs)
            .map_err(kvm(id, "KVM_SET_SREGS"))?;
        // SAFETY: KVM reads a 4096-byte legacy XSAVE area unless the VM was
        // granted dynamic XSTATE features (AMX, through
        // ARCH_REQ_XCOMP_GUEST_PERM), which boxlite-vmm never requests; a
        // kvm_xsave is exactly that area.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(kvm(id, "KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(kvm(id, "KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(kvm(id, "KVM_SET_DEBUGREGS"))?;
        if let Some(lapic) = &self.lapic {
            fd.set_lapic(lapic).map_err(kvm(id, "KVM_SET_LAPIC"))?;
        }
        let (deadline, rest): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = self
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        for batch in [rest, deadline] {
            if batch.is_empty() {
                continue;
            }
            let msrs = msr_list(id, &batch)?;
            let written = fd.set_msrs(&msrs).map_err(kvm(id, "KVM_SET_MSRS"))?;
            if written != batch.len() {
                return Err(VcpuStateError::Msrs {
                    id,
                    call: "KVM_SET_MSRS",
                    done: written,
                    total: batch.len(),
                    first: batch[written.min(batch.len() - 1)].index,
                });
            }
        }
        fd.set_vcpu_events(&self.vcpu_events)
            .map_err(kvm(id, "KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}
