//! KVM state: guest memory, the VM, and vCPUs with their threads; the
//! vCPU and VM state that snapshot and restore carry.

pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
