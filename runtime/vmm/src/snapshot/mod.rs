//! Snapshot files: the on-disk containers a paused VM's state and guest
//! memory are saved to, and restored from (docs/snapshot-design.md §3, §4).
//!
//! This module holds the two file formats (framing, integrity and pairing
//! checks) and the moving of guest RAM in and out of the memory file. What
//! goes into the state body (vCPU, VM and device state) and the
//! save/restore sequences build on it.
//!
//! - [`state_file`]: a 128-byte header (magic, format version, snapshot id,
//!   CPUID digest, guest memory size, header CRC), a body, a trailing CRC
//!   over everything before it. Read back with every length bounded, so a
//!   truncated, corrupt or foreign file is refused with what is wrong, not
//!   half-parsed.
//! - [`memory_file`]: a 4 KiB header page (magic, version, the snapshot id
//!   that pairs it with its state file, the guest memory size and region
//!   table), then guest RAM at the header page plus each region's memfd
//!   offset, so the file can be mapped region by region.
//! - [`body`]: what the state file's body holds (the VM's shape, the KVM
//!   state of its vCPUs and of the VM, the UART, each virtio device's
//!   transport and device halves), checked on reading against this build's
//!   KVM struct sizes and against itself.
//! - [`ram`]: a paused VM's RAM written there sparsely, and read back either
//!   mapped copy-on-write (VMs restored from one file share its page cache)
//!   or copied into fresh memfd-backed RAM.
//! - [`save`]: a paused VM saved into the two files (the `snapshot` op).
//! - [`restore`]: the checks a snapshot passes before a VM is rebuilt from
//!   it at start-up (config, CPU, TSC rate), and its RAM made.
//!
//! The two files are immutable once written: a template is replaced by renaming a
//! new one over it, never by rewriting (a file mapped `MAP_PRIVATE` by a
//! running VM must not change under it).

pub mod body;
pub mod memory_file;
pub mod ram;
pub mod restore;
pub mod save;
pub mod state_file;

#[cfg(test)]
mod tests;

use std::fmt;

/// The format version this build reads and writes. Any change to a saved
/// field, its meaning, or device behaviour that depends on saved state
/// bumps it; restore accepts exactly this version.
/// Version 2 added the balloon's sizes to the device state.
pub const FORMAT_VERSION: u32 = 2;

/// A snapshot's identity: random, shared by its state and memory files.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    /// A fresh random id (from the kernel's CSPRNG).
    pub fn random() -> std::io::Result<Self> {
        let mut id = [0u8; 16];
        boxlite_protocol::random::fill(&mut id)?;
        Ok(Self(id))
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

/// The first bytes of a file that is not ours, for the error message.
fn leading_hex(bytes: &[u8]) -> String {
    bytes.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
