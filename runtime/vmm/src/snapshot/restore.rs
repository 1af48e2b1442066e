//! A VM rebuilt from a snapshot at start-up (docs/snapshot-design.md
//! §5.2): the checks and the pieces the builder puts together.
//!
//! - [`load`] reads the state file (bounded), checks it against the
//!   config (vCPUs, memory, the device kinds slot by slot) and makes the
//!   guest's RAM from the memory file, mapped copy-on-write (`private`) or
//!   copied into fresh memfd RAM (`copy`).
//! - [`check_cpuid`] compares the CPUID a vCPU was saved with against the
//!   one this host would give it at boot: a guest that probed features at
//!   boot must not find them gone.
//! - [`match_tsc_rate`] makes a restored vCPU's TSC tick at the saved
//!   rate, or refuses where KVM cannot scale it.
//!
//! The files come from a root-owned directory, but every byte is still
//! treated as untrusted input: lengths are bounded before anything is
//! allocated, the body is parsed strictly, and what goes to KVM or a
//! device is checked by them (`VcpuState::restore`, the transports).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::{Path, PathBuf};

use kvm_bindings::kvm_cpuid_entry2;
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::{Address as _, GuestMemoryBackend as _, GuestMemoryRegion as _};

use super::body::{self, BodyError, SnapshotBody};
use super::ram::{self, RamFileError};
use super::state_file::{self, StateFileError, StateHeader, HEADER_LEN, MAX_BODY_LEN};
use crate::arch::x86_64::layout::ram_ranges;
use crate::config::{DeviceConfig, MemoryMode, RestoreConfig, VmConfig};
use crate::vstate::memory::{create_guest_memory, GuestRam, MemoryError};

/// The largest state file [`load`] reads: header, the largest body, trailer.
const MAX_STATE_FILE: u64 = HEADER_LEN as u64 + MAX_BODY_LEN + 4;

/// The TSC rate difference a restored guest is left to live with, in
/// parts per million (NTP-grade clocks drift about this much). Beyond it,
/// KVM scales the guest's TSC to the saved rate or the restore is refused.
pub const TSC_TOLERANCE_PPM: u64 = 250;

/// Why a snapshot could not be restored. Each names the file or the part
/// of the VM at fault.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("restore.state {path}: {what}")]
    StateRead {
        path: PathBuf,
        what: String,
        #[source]
        source: Option<std::io::Error>,
    },
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    #[error(transparent)]
    Body(#[from] BodyError),
    #[error(transparent)]
    Ram(#[from] RamFileError),
    #[error("restore: cannot create guest memory for the copy")]
    Memory(#[from] MemoryError),
    /// The snapshot and the config describe different VMs.
    #[error("restore: {0}")]
    Mismatch(String),
    #[error("restore: CPU mismatch on vCPU {vcpu}: {what}")]
    Cpu { vcpu: u8, what: String },
    #[error(
        "restore: vCPU {vcpu}'s TSC ran at {saved_khz} kHz when it was saved, this host's runs \
         at {here_khz} kHz, and {why}"
    )]
    TscRate {
        vcpu: u8,
        saved_khz: u32,
        here_khz: u32,
        why: String,
    },
}

impl RestoreError {
    /// Whether this is a problem with the files or the config (exit code
    /// 1) rather than with this host or its KVM (exit code 4).
    pub fn is_input_error(&self) -> bool {
        !matches!(
            self,
            RestoreError::Memory(_) | RestoreError::Cpu { .. } | RestoreError::TscRate { .. }
        )
    }
}

/// A snapshot read and checked, with the guest's RAM made from it.
pub struct Loaded {
    pub header: StateHeader,
    pub body: SnapshotBody,
    pub ram: GuestRam,
    /// How the RAM was made: `Private` or `Copy` (never `Auto`).
    pub memory_mode: MemoryMode,
}

/// Reads the state file of `restore`, checks it against `cfg` and makes
/// the guest's RAM from the memory file.
pub fn load(cfg: &VmConfig, restore: &RestoreConfig) -> Result<Loaded, RestoreError> {
    let path = &restore.state;
    let bytes = read_bounded(path)?;
    let (header, body_bytes) = state_file::decode(path, &bytes)?;
    let body = body::decode(path, body_bytes)?;
    check_against_config(cfg, &header, &body)?;
    let memory_mode = resolve_memory_mode(cfg, restore.memory_mode);
    let ram = match memory_mode {
        MemoryMode::Private => GuestRam {
            mem: ram::map_private(&restore.memory, header.id)?,
            memfd: None,
        },
        _ => {
            let ram = create_guest_memory(cfg.memory_bytes())?;
            ram::copy_into(&restore.memory, header.id, &ram)?;
            ram
        }
    };
    // The memory file's own region table must be the layout this VMM
    // gives a guest of this size, which the state body recorded too.
    let mapped: Vec<(u64, u64)> = ram
        .mem
        .iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect();
    let layout = ram_ranges(cfg.memory_bytes());
    let recorded: Vec<(u64, u64)> = body
        .vm
        .ram_regions
        .iter()
        .map(|r| (r.guest_addr, r.size))
        .collect();
    if mapped != layout || recorded != layout {
        return Err(RestoreError::Mismatch(format!(
            "the snapshot's RAM regions (memory file {mapped:x?}, state file {recorded:x?}) are \
             not this VMM's layout for {} MiB ({layout:x?})",
            cfg.memory_mib
        )));
    }
    Ok(Loaded {
        header,
        body,
        ram,
        memory_mode,
    })
}

/// `Auto` made concrete: shared memory (`Copy`) when a vhost-user
/// backend maps it, else copy-on-write (`Private`).
pub fn resolve_memory_mode(cfg: &VmConfig, mode: MemoryMode) -> MemoryMode {
    match mode {
        MemoryMode::Auto if cfg.devices.iter().any(|d| matches!(d, DeviceConfig::Fs(_))) => {
            MemoryMode::Copy
        }
        MemoryMode::Auto => MemoryMode::Private,
        m => m,
    }
}

/// The whole state file, refused unread beyond what a valid one can be.
fn read_bounded(path: &Path) -> Result<Vec<u8>, RestoreError> {
    let failed = |what: &str| {
        let what = what.to_owned();
        let path = path.to_path_buf();
        move |e: std::io::Error| RestoreError::StateRead {
            path,
            what,
            source: Some(e),
        }
    };
    let file = std::fs::File::open(path).map_err(failed("cannot open it"))?;
    let mut bytes = Vec::new();
    file.take(MAX_STATE_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(failed("cannot read it"))?;
    if bytes.len() as u64 > MAX_STATE_FILE {
        return Err(RestoreError::StateRead {
            path: path.to_path_buf(),
            what: format!("longer than the largest state file ({MAX_STATE_FILE} bytes)"),
            source: None,
        });
    }
    Ok(bytes)
}

/// The config's virtio device kinds in slot order, as the body names them
/// (the balloon takes the slot after the devices).
fn config_device_kinds(cfg: &VmConfig) -> Vec<&'static str> {
    let mut kinds: Vec<&'static str> = cfg.devices.iter().map(DeviceConfig::kind).collect();
    if cfg.balloon.is_some() {
        kinds.push("balloon");
    }
    kinds
}

/// The snapshot must be of the VM the config describes: same vCPUs,
/// memory and device kinds in the same slots, with the irqchip. What
/// each device's saved state holds is checked when it is restored.
pub fn check_against_config(
    cfg: &VmConfig,
    header: &StateHeader,
    body: &SnapshotBody,
) -> Result<(), RestoreError> {
    let mismatch = |what: String| Err(RestoreError::Mismatch(what));
    if body.vm.vcpus != cfg.vcpus {
        return mismatch(format!(
            "the snapshot has {} vCPUs, the config asks for {}",
            body.vm.vcpus, cfg.vcpus
        ));
    }
    if body.vm.memory_mib != u64::from(cfg.memory_mib)
        || header.guest_memory_bytes != cfg.memory_bytes()
    {
        return mismatch(format!(
            "the snapshot has {} MiB of memory ({} bytes in its header), the config asks for {} MiB",
            body.vm.memory_mib, header.guest_memory_bytes, cfg.memory_mib
        ));
    }
    if let Some(v) = body.vcpus.iter().find(|v| v.lapic.is_none()) {
        return mismatch(format!(
            "vCPU {} was saved without an in-kernel LAPIC; only VMs with the irqchip restore",
            v.id
        ));
    }
    let here = config_device_kinds(cfg);
    if body.devices.len() != here.len() {
        return mismatch(format!(
            "the snapshot has {} virtio devices ({}), the config {} ({})",
            body.devices.len(),
            body.devices
                .iter()
                .map(|d| d.kind.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            here.len(),
            here.join(", ")
        ));
    }
    for (slot, (saved, here)) in body.devices.iter().zip(&here).enumerate() {
        if saved.kind != *here {
            return mismatch(format!(
                "device slot {slot} is {} in the snapshot but {here} in the config",
                saved.kind
            ));
        }
    }
    Ok(())
}

/// CPUID bits KVM itself changes while the guest runs, from the state
/// the guest put the vCPU in (`kvm_update_cpuid_runtime`): a saved
/// vCPU's values differ from a fresh one's there without any difference
/// in the CPU. As (function, index, register, mask of bits to ignore).
const RUNTIME_CPUID_BITS: [(u32, u32, Reg, u32); 5] = [
    // OSXSAVE follows CR4.OSXSAVE; MONITOR follows MISC_ENABLE.
    (0x1, 0, Reg::Ecx, (1 << 27) | (1 << 3)),
    // APIC follows the APIC base MSR's enable bit.
    (0x1, 0, Reg::Edx, 1 << 9),
    // OSPKE follows CR4.PKE.
    (0x7, 0, Reg::Ecx, 1 << 4),
    // The XSAVE area sizes follow XCR0 and XSS.
    (0xd, 0, Reg::Ebx, u32::MAX),
    (0xd, 1, Reg::Ebx, u32::MAX),
];

/// A CPUID output register; its value is its place in `Reg::ALL`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Reg {
    Eax = 0,
    Ebx = 1,
    Ecx = 2,
    Edx = 3,
}

impl Reg {
    const ALL: [Reg; 4] = [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx];

    fn of(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }
}

/// Bits of `reg` in leaf (`function`, `index`) that KVM changes at run
/// time and a comparison must ignore.
fn runtime_bits(function: u32, index: u32, reg: Reg) -> u32 {
    RUNTIME_CPUID_BITS
        .iter()
        .filter(|(f, i, r, _)| (*f, *i, *r) == (function, index, reg))
        .fold(0, |acc, (_, _, _, mask)| acc | mask)
}

/// A CPUID list by leaf: (function, index) → the registers of each entry
/// with that key, in list order, less the bits KVM changes at run time.
fn by_leaf(entries: &[kvm_cpuid_entry2]) -> BTreeMap<(u32, u32), Vec<[u32; 4]>> {
    let mut leaves: BTreeMap<(u32, u32), Vec<[u32; 4]>> = BTreeMap::new();
    for e in entries {
        let regs = Reg::ALL.map(|r| r.of(e) & !runtime_bits(e.function, e.index, r));
        leaves.entry((e.function, e.index)).or_default().push(regs);
    }
    leaves
}

/// Compares vCPU `vcpu`'s saved CPUID with the one KVM reports here for
/// the CPUID a boot sets (`here`), leaf by leaf, ignoring only the bits
/// KVM updates at run time. The first difference is named: leaf, index,
/// register, values.
pub fn check_cpuid(
    vcpu: u8,
    saved: &[kvm_cpuid_entry2],
    here: &[kvm_cpuid_entry2],
) -> Result<(), RestoreError> {
    let cpu = |what: String| {
        Err(RestoreError::Cpu {
            vcpu,
            what: format!(
                "{what} ({} CPUID entries in the snapshot, {} here)",
                saved.len(),
                here.len()
            ),
        })
    };
    let (saved_leaves, here_leaves) = (by_leaf(saved), by_leaf(here));
    for ((function, index), s) in &saved_leaves {
        let Some(h) = here_leaves.get(&(*function, *index)) else {
            return cpu(format!(
                "CPUID leaf {function:#x} index {index} is in the snapshot, not on this host"
            ));
        };
        for (s, h) in s.iter().zip(h) {
            if let Some(reg) = Reg::ALL
                .into_iter()
                .find(|r| s[*r as usize] != h[*r as usize])
            {
                return cpu(format!(
                    "CPUID leaf {function:#x} index {index} {} is {:#x} in the snapshot, {:#x} on \
                     this host",
                    reg.name(),
                    s[reg as usize],
                    h[reg as usize]
                ));
            }
        }
        if s.len() != h.len() {
            return cpu(format!(
                "CPUID leaf {function:#x} index {index} is listed {} times in the snapshot, {} on \
                 this host",
                s.len(),
                h.len()
            ));
        }
    }
    if let Some((function, index)) = here_leaves.keys().find(|k| !saved_leaves.contains_key(k)) {
        return cpu(format!(
            "CPUID leaf {function:#x} index {index} is on this host, not in the snapshot"
        ));
    }
    Ok(())
}

/// Whether `here` is within [`TSC_TOLERANCE_PPM`] of `saved`.
fn tsc_close_enough(saved: u32, here: u32) -> bool {
    let diff = u64::from(saved.abs_diff(here));
    diff * 1_000_000 <= u64::from(saved) * TSC_TOLERANCE_PPM
}

/// Makes vCPU `vcpu` (`fd`, just created) run its TSC at `saved_khz`, the
/// rate the guest calibrated its clocks and timers to: nothing to do
/// within [`TSC_TOLERANCE_PPM`], else KVM scales it
/// (`KVM_CAP_TSC_CONTROL`) or the restore is refused. A snapshot or a
/// KVM that does not know its rate is trusted as is.
pub fn match_tsc_rate(
    kvm: &Kvm,
    vcpu: u8,
    fd: &VcpuFd,
    saved_khz: Option<u32>,
) -> Result<(), RestoreError> {
    let (Some(saved), Ok(here)) = (saved_khz, fd.get_tsc_khz()) else {
        return Ok(());
    };
    if tsc_close_enough(saved, here) {
        return Ok(());
    }
    let refuse = |why: String| RestoreError::TscRate {
        vcpu,
        saved_khz: saved,
        here_khz: here,
        why,
    };
    if !kvm.check_extension(Cap::TscControl) {
        return Err(refuse(
            "KVM cannot scale a guest's TSC here (no KVM_CAP_TSC_CONTROL)".into(),
        ));
    }
    fd.set_tsc_khz(saved)
        .map_err(|e| refuse(format!("KVM refused to scale it (KVM_SET_TSC_KHZ: {e})")))?;
    tracing::info!(
        vcpu,
        saved_khz = saved,
        here_khz = here,
        "restored vCPU's TSC scaled to the snapshot's rate"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn cpu() -> Vec<kvm_cpuid_entry2> {
        vec![
            leaf(0, 0, [0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            leaf(1, 0, [0x00a2_0f12, 0x0008_0800, 0x7ed8_320b, 0x178b_fbff]),
            leaf(7, 0, [0, 0x219c_97a9, 0x0040_069c, 0x10]),
            leaf(0xd, 0, [0x7, 0x340, 0x988, 0]),
            leaf(0xd, 1, [0xf, 0x340, 0, 0]),
        ]
    }

    #[test]
    fn the_same_cpuid_in_any_order_passes() {
        let mut shuffled = cpu();
        shuffled.reverse();
        check_cpuid(0, &cpu(), &shuffled).expect("same CPU");
    }

    #[test]
    fn bits_kvm_updates_at_run_time_are_ignored() {
        let mut running = cpu();
        running[1].ecx |= 1 << 27; // OSXSAVE: the guest set CR4.OSXSAVE
        running[1].edx &= !(1 << 9); // APIC: the guest disabled its APIC
        running[2].ecx |= 1 << 4; // OSPKE
        running[3].ebx = 0x988; // XSAVE size for the guest's XCR0
        running[4].ebx = 0x990;
        check_cpuid(1, &running, &cpu()).expect("only run-time bits differ");
    }

    #[test]
    fn a_feature_bit_or_a_leaf_that_differs_is_named() {
        let mut other = cpu();
        other[2].ebx &= !(1 << 5); // AVX2 gone
        let err = check_cpuid(1, &cpu(), &other).unwrap_err().to_string();
        assert_eq!(
            err,
            "restore: CPU mismatch on vCPU 1: CPUID leaf 0x7 index 0 ebx is 0x219c97a9 in the \
             snapshot, 0x219c9789 on this host (5 CPUID entries in the snapshot, 5 here)"
        );
        let mut fewer = cpu();
        fewer.remove(4);
        let err = check_cpuid(0, &cpu(), &fewer).unwrap_err().to_string();
        assert!(
            err.contains("CPUID leaf 0xd index 1 is in the snapshot, not on this host"),
            "{err}"
        );
        let err = check_cpuid(0, &fewer, &cpu()).unwrap_err().to_string();
        assert!(
            err.contains("CPUID leaf 0xd index 1 is on this host, not in the snapshot"),
            "{err}"
        );
        // A leaf listed twice is compared entry by entry.
        let mut twice = cpu();
        twice.push(cpu()[0]);
        check_cpuid(0, &twice, &twice).expect("same lists");
        let err = check_cpuid(0, &twice, &cpu()).unwrap_err().to_string();
        assert!(
            err.contains(
                "CPUID leaf 0x0 index 0 is listed 2 times in the snapshot, 1 on this host"
            ),
            "{err}"
        );
        // The vendor string is compared like any other leaf.
        let mut intel = cpu();
        intel[0].ebx = 0x756e_6547;
        assert!(check_cpuid(0, &cpu(), &intel).is_err());
    }

    #[test]
    fn the_tsc_tolerance_is_250_ppm_either_way() {
        let saved = 2_000_000;
        assert!(tsc_close_enough(saved, saved));
        assert!(tsc_close_enough(saved, saved + 500));
        assert!(tsc_close_enough(saved, saved - 500));
        assert!(!tsc_close_enough(saved, saved + 501));
        assert!(!tsc_close_enough(saved, saved - 501));
        assert!(!tsc_close_enough(saved, 2_400_000));
    }
}
