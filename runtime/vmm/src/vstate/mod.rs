//! KVM state: guest memory, the VM, and vCPUs with their threads; a
//! vCPU's whole state for snapshot and restore.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
