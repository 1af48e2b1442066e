//! KVM state: guest memory, the VM, and vCPUs with their threads.

pub mod memory;
pub mod vcpu;
pub mod vm;
