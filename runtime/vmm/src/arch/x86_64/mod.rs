//! x86_64 boot: memory layout, CPUID, MSRs, registers and page tables,
//! the zero page / PVH start info, e820 and the MP table.

pub mod apic;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
