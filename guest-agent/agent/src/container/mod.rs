//! The container service: containers and their processes, created and
//! started with youki's `libcontainer` in a single-threaded helper
//! ([`helper`]), watched by the agent's reaper, controlled through their
//! cgroup ([`cgroup`]).
//!
//! Where things are:
//! - [`table`]: the containers of the sandbox and the operations on them;
//!   the entry point for `agent.rs`.
//! - [`spec`]: checks on what the host sends (ids, spec, Process, stdio).
//! - [`helper`]: the `__container-helper` protocol, both sides.
//! - [`process`]: one container process: its exit and its stdio streams.
//! - [`stdio_fds`]: the pipes or pty a process's stdio is made of.
//! - [`capabilities`], [`home`], [`keyring`], [`cgroup`], [`device_filter`]: one
//!   piece of container set-up each.
//! - [`oom`]: the OOM-kill watcher behind GetOOMEvent.
//! - [`error`]: the one error type of all of the above.

pub mod capabilities;
pub mod cgroup;
pub mod device_filter;
pub mod error;
pub mod helper;
pub mod home;
pub mod keyring;
pub mod oom;
pub mod process;
pub mod spec;
pub mod stdio_fds;
pub mod table;

use std::time::Duration;

pub use error::ContainerError;
pub use table::{Container, Containers, State};

/// Guest directory of libcontainer's state (one directory per container).
pub const STATE_ROOT: &str = "/run/boxlite/containers";
/// Guest directory of the bundles the agent writes (config.json, exec
/// Process files, console sockets).
pub const BUNDLE_ROOT: &str = "/run/boxlite/bundles";
/// RemoveContainer's wait for the processes to die when timeout_secs is 0.
pub const DEFAULT_REMOVE_TIMEOUT: Duration = Duration::from_secs(5);
