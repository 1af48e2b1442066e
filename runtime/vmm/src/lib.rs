//! `boxlite-vmm`: BoxLite's built-in micro-VM monitor on rust-vmm crates.
//!
//! One process per sandbox. The layout follows the architecture:
//! - [`vstate`]: the KVM objects (VM, vCPUs, guest memory);
//! - [`arch`]: x86_64 boot state (CPUID, MSRs, page tables, zero page, MP table);
//! - [`devices`]: legacy devices (serial, i8042) and virtio devices;
//! - [`device_manager`]: the PIO/MMIO bus and device wiring;
//! - [`config`]: the JSON configuration and its validation;
//! - [`builder`]: builds and runs a VM from a [`config::VmConfig`];
//! - [`threads`]: the one helper every thread is spawned through;
//! - [`jail`] and [`seccomp`]: cgroup, rlimits, no_new_privs, landlock and
//!   the per-thread-kind seccomp filters, applied before the guest runs;
//! - [`cli`]: logging and error reports shared by the binaries;
//! - [`control`]: the control socket (shutdown, pause, resume, status,
//!   metrics) on the event loop; [`metrics`]: the counters it reports;
//! - [`snapshot`]: the state and memory file formats of a snapshot (the
//!   save and restore sequences are not built yet: docs/snapshot-design.md).

pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod control;
pub mod device_manager;
pub mod devices;
pub mod jail;
pub mod metrics;
pub mod seccomp;
pub mod snapshot;
pub mod threads;
pub mod vstate;

pub use builder::{run_vm, ExitReason, VmmError};

/// Process exit codes of the `boxlite-vmm` binary (documented in `docs/vmm.md`).
pub mod exit_code {
    /// The guest reset or powered off: i8042 reset, triple fault, KVM system event.
    pub const GUEST_EXIT: i32 = 0;
    /// The configuration (file or command line) is invalid.
    pub const CONFIG_ERROR: i32 = 1;
    /// A vCPU stopped on an unexpected or failed KVM exit; the last registers are logged.
    pub const VCPU_ERROR: i32 = 2;
    /// The guest halted with no way to wake it (`hlt` without an interrupt controller).
    pub const GUEST_HALTED: i32 = 3;
    /// The VMM failed to build or run the VM (KVM refused a setup ioctl, memory, loader, device).
    pub const VMM_ERROR: i32 = 4;
    /// The jail could not be applied (cgroup, rlimits, no_new_privs,
    /// landlock, a seccomp filter). A jailed thread making a forbidden
    /// syscall is not an exit code: the kernel kills the process with SIGSYS.
    pub const JAIL_ERROR: i32 = 5;
}
