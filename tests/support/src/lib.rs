//! Test helpers that several BoxLite crates share; a dev-dependency only.
//!
//! - [`caps`]: containerd's default capability list (the agent's host-mode
//!   tests and the e2e guest tests).
//! - [`sandbox_probe`]: the static probe binary of the nested-sandboxing
//!   tests (`sandbox_probe.c` beside this crate's manifest).
//! - [`fake_bin`]: fake binaries (shell scripts) in a temp dir, and the
//!   checks around them (the runtime's backend tests, the shim's hook tests).
//! - [`fake_guest`]: the guest side of the hybrid vsock handshake and a fake
//!   `Health` service (the runtime's vsock and agent tests, the shim's fake
//!   guest).
//! - [`netns`]: throwaway network namespaces for the root tests (the
//!   runtime's pod networking, the agent's interface and route RPCs).
//!
//! What only one crate needs stays in that crate. This crate must not
//! depend on boxlite-runtime or the shim: both use it as a dev-dependency,
//! and the cycle would compile two copies of their types.

pub mod caps;
pub mod fake_bin;
pub mod fake_guest;
pub mod netns;
pub mod sandbox_probe;
