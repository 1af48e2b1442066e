//! The BoxLite guest agent.
//!
//! In the guest it runs as PID 1 (`/init` of the initramfs): it mounts the
//! pseudo filesystems, brings up `lo`, reaps zombies and serves the agent API
//! (`boxlite_protocol`) with ttrpc on vsock. On the host (when it is not
//! PID 1) it serves the same API on a unix socket with files resolved under
//! a root directory, so the RPC layer can be tested without a VM.
//!
//! Layout: `rpc.rs` has one fn per RPC (span, validate, `do_*`, error
//! mapping); each RPC's work lives in the module named after its object
//! (`sandbox`, `identity`, `etc`, `share`, `files`, `guest_info`,
//! `container`, `network`); `guest_init`, `reaper`, `power` and `logging` are the PID 1
//! machinery (`network` also brings `lo` up at start-up).

#![cfg_attr(not(test), warn(clippy::unwrap_used))]

pub mod agent;
pub mod announce;
pub mod cmdline;
pub mod config;
pub mod container;
pub mod cpus;
pub mod error;
pub mod etc;
pub mod files;
pub mod guest_info;
pub mod guest_init;
pub mod identity;
pub mod listener;
pub mod logging;
pub mod network;
pub mod paths;
pub mod power;
pub mod reaper;
pub mod rpc;
pub mod sandbox;
pub mod server;
pub mod share;
pub mod stdio;

/// Version of this agent binary, reported by Health.Version.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
