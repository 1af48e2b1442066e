//! Saving a paused VM into a state file and a memory file
//! (docs/snapshot-design.md §5.1): the devices (each device half before
//! its transport half), every vCPU on its own thread, the VM-wide KVM
//! state with the clock last, then guest RAM, then the state file that
//! names it. The memory file is written first, so a state file on disk
//! always has its memory complete beside it.
//!
//! Both files are created in a directory the caller opened (a directory
//! file descriptor, so this works after the VMM's jail has hidden every
//! path), with `O_EXCL|O_NOFOLLOW`: an existing file, or a symlink planted
//! in its place, is never written through. On any failure both files are
//! removed.

use std::ffi::CString;
use std::fs::File;
use std::io::Write as _;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kvm_ioctls::VmFd;
use sha2::{Digest as _, Sha256};

use super::body::{self, Abi, MemorySection, SnapshotBody, VmSection};
use super::ram::{self, RamFileError};
use super::state_file::{self, StateHeader};
use super::SnapshotId;
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{SaveRequest, VcpuHandle};
use crate::vstate::vcpu_state::{VcpuState, VcpuStateError};
use crate::vstate::vm_state::{VmState, VmStateError};

/// The paused VM, as `save_vm` reads it.
pub struct SaveParts<'a> {
    pub vm: &'a VmFd,
    /// Whether the VM has the in-kernel irqchip (snapshots need it).
    pub irqchip: bool,
    /// Every vCPU, in id order, all paused.
    pub vcpus: &'a [VcpuHandle],
    /// The MSRs each vCPU's state includes (`vcpu_state::saveable_msrs`).
    pub msr_indices: Arc<[u32]>,
    pub devices: &'a DeviceManager,
    pub ram: &'a GuestRam,
    pub memory_mib: u64,
}

/// Where the snapshot goes: two new files in a directory.
pub struct SaveTarget<'a> {
    /// The directory, opened by the caller (`O_PATH|O_DIRECTORY` is enough).
    pub dir: BorrowedFd<'a>,
    /// Its path, for messages only.
    pub dir_path: &'a Path,
    pub state_file: &'a str,
    pub memory_file: &'a str,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub id: SnapshotId,
    pub state_bytes: u64,
    /// The memory file's length (header page plus guest RAM)...
    pub memory_bytes: u64,
    /// ...of which this much is data; the rest are holes.
    pub memory_data_bytes: u64,
    pub took_ms: u64,
}

/// Why a snapshot was not taken. Each names what failed; nothing is left
/// on disk.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("snapshot file name {name:?}: {why}")]
    BadName { name: String, why: &'static str },
    #[error("the state file and the memory file must have different names (both {0:?})")]
    SameName(String),
    #[error("snapshots need the in-kernel irqchip (this VM runs with \"irqchip\": false)")]
    NoIrqchip,
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot draw a snapshot id")]
    Random(#[source] std::io::Error),
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    #[error(transparent)]
    Vm(#[from] VmStateError),
    #[error(transparent)]
    Memory(#[from] RamFileError),
    #[error("cannot encode the snapshot's state")]
    Encode(#[source] serde_json::Error),
    #[error("{path}: cannot write the state file")]
    WriteState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A plain file name in the snapshot directory: no path separator, not
/// `.` or `..`, no NUL, at most 255 bytes.
fn check_name(name: &str) -> Result<CString, SaveError> {
    let bad = |why| SaveError::BadName {
        name: name.to_owned(),
        why,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    if name == "." || name == ".." || name.contains('/') {
        return Err(bad("must be a plain file name in the snapshot directory"));
    }
    CString::new(name).map_err(|_| bad("contains a NUL byte"))
}

/// How the snapshot's files are created: new only (`O_EXCL`), never
/// through a symlink (`O_NOFOLLOW`), write-only. The jailed VMM's seccomp
/// filter (`vmm-snapshots.json`) allows `openat` with exactly these.
pub const CREATE_FLAGS: libc::c_int =
    libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_CLOEXEC | libc::O_NOFOLLOW;

/// A file created new in `dir`, removed again when dropped unless kept.
struct NewFile<'a> {
    dir: BorrowedFd<'a>,
    name: CString,
    path: PathBuf,
    file: File,
    keep: bool,
}

impl<'a> NewFile<'a> {
    fn create(dir: BorrowedFd<'a>, dir_path: &Path, name: &str) -> Result<Self, SaveError> {
        let cname = check_name(name)?;
        let path = dir_path.join(name);
        // The raw syscall, so the flags are exactly these: the jailed
        // VMM's seccomp filter allows openat with these flags only (a libc
        // may add O_LARGEFILE).
        // SAFETY: openat on a directory fd we borrow, with a NUL-terminated
        // name that lives across the call; the result is checked.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat,
                dir.as_raw_fd(),
                cname.as_ptr(),
                CREATE_FLAGS,
                0o600,
            )
        } as libc::c_int;
        if fd < 0 {
            return Err(SaveError::Create {
                path,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(NewFile {
            dir,
            name: cname,
            path,
            // SAFETY: `fd` was just opened and is owned by nothing else.
            file: unsafe { File::from_raw_fd(fd) },
            keep: false,
        })
    }
}

impl Drop for NewFile<'_> {
    fn drop(&mut self) {
        if !self.keep {
            // SAFETY: unlinkat with the directory fd and the name this file
            // was created under; both live across the call.
            unsafe { libc::unlinkat(self.dir.as_raw_fd(), self.name.as_ptr(), 0) };
        }
    }
}

/// SHA-256 over every vCPU's CPUID, entries in (function, index) order,
/// each as its fields' little-endian bytes: the header's quick check that
/// a restoring host offers the same CPU.
pub fn cpuid_digest(vcpus: &[VcpuState]) -> [u8; 32] {
    let mut h = Sha256::new();
    for v in vcpus {
        let mut entries = v.cpuid.clone();
        entries.sort_by_key(|e| (e.function, e.index));
        for e in entries {
            for word in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
                h.update(word.to_le_bytes());
            }
        }
    }
    h.finalize().into()
}

/// Saves the paused VM `parts` into `target`'s two new files. The VM stays
/// paused. Refused without the in-kernel irqchip, with names that are not
/// plain file names, or when either file exists.
pub fn save_vm(parts: &SaveParts<'_>, target: &SaveTarget<'_>) -> Result<Saved, SaveError> {
    let started = Instant::now();
    if !parts.irqchip {
        return Err(SaveError::NoIrqchip);
    }
    if target.state_file == target.memory_file {
        return Err(SaveError::SameName(target.state_file.to_owned()));
    }
    let mut memory = NewFile::create(target.dir, target.dir_path, target.memory_file)?;
    let mut state = NewFile::create(target.dir, target.dir_path, target.state_file)?;
    let id = SnapshotId::random().map_err(SaveError::Random)?;

    let (serial, devices) = parts.devices.save_states()?;
    let mut vcpus = Vec::with_capacity(parts.vcpus.len());
    for v in parts.vcpus {
        vcpus.push(v.save_state(SaveRequest {
            msr_indices: parts.msr_indices.clone(),
            irqchip: parts.irqchip,
        })?);
    }
    let vm_state = VmState::save(parts.vm)?;

    let saved_ram = ram::save_to(&memory.file, &memory.path, id, parts.ram)?;
    let header = StateHeader {
        id,
        cpuid_digest: cpuid_digest(&vcpus),
        guest_memory_bytes: saved_ram.header.guest_memory_bytes,
        created_unix_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        vmm_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let body = SnapshotBody {
        abi: Abi::current(),
        vm: VmSection {
            vcpus: u8::try_from(vcpus.len()).expect("at most 255 vCPUs"),
            memory_mib: parts.memory_mib,
            ram_regions: saved_ram.header.regions.clone(),
            state: vm_state,
        },
        vcpus,
        serial,
        devices,
        memory: MemorySection {
            data_bytes: saved_ram.data_bytes,
        },
    };
    let bytes = state_file::encode(&header, &body::encode(&body).map_err(SaveError::Encode)?);
    let write_state = |f: &mut File| -> std::io::Result<()> {
        f.write_all(&bytes)?;
        f.sync_all()
    };
    write_state(&mut state.file).map_err(|source| SaveError::WriteState {
        path: state.path.clone(),
        source,
    })?;
    memory.keep = true;
    state.keep = true;
    let saved = Saved {
        id,
        state_bytes: bytes.len() as u64,
        memory_bytes: saved_ram.header.file_len(),
        memory_data_bytes: saved_ram.data_bytes,
        took_ms: started.elapsed().as_millis() as u64,
    };
    tracing::info!(
        id = %saved.id,
        state = %state.path.display(),
        memory = %memory.path.display(),
        memory_data_bytes = saved.memory_data_bytes,
        took_ms = saved.took_ms,
        "snapshot saved"
    );
    Ok(saved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_file_names_are_plain_names() {
        for (name, why) in [
            ("", "empty"),
            ("a/b", "must be a plain file name in the snapshot directory"),
            ("..", "must be a plain file name in the snapshot directory"),
            (".", "must be a plain file name in the snapshot directory"),
            ("a\0b", "contains a NUL byte"),
        ] {
            match check_name(name) {
                Err(SaveError::BadName { why: got, .. }) => assert_eq!(got, why, "{name:?}"),
                other => panic!("{name:?}: {other:?}"),
            }
        }
        assert!(check_name(&"x".repeat(256)).is_err());
        assert!(check_name("vm.state").is_ok());
    }

    #[test]
    fn the_cpuid_digest_ignores_entry_order_but_not_content() {
        use kvm_bindings::kvm_cpuid_entry2;
        let entry = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        let state = |cpuid| VcpuState {
            cpuid,
            ..vcpu_without_cpuid()
        };
        let a = cpuid_digest(&[state(vec![entry(0, 1), entry(1, 2)])]);
        let b = cpuid_digest(&[state(vec![entry(1, 2), entry(0, 1)])]);
        let c = cpuid_digest(&[state(vec![entry(0, 1), entry(1, 3)])]);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    fn vcpu_without_cpuid() -> VcpuState {
        VcpuState {
            id: 0,
            cpuid: vec![],
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: None,
            tsc_khz: None,
            msrs: vec![],
            vcpu_events: Default::default(),
        }
    }
}
