//! The BoxLite agent protocol, shared by the host (shim, tests) and the guest
//! agent.
//!
//! * [`health`] / [`agent`]: protobuf messages; [`health_ttrpc`] /
//!   [`agent_ttrpc`]: async ttrpc clients and server traits. Served by the
//!   agent on vsock port [`AGENT_VSOCK_PORT`].
//! * [`stdio`]: the header that opens each process stdio stream on
//!   [`STDIO_VSOCK_PORT`].
//! * The agent writes its log lines to every connection on
//!   [`LOG_VSOCK_PORT`], starting with what it logged before the connection.

pub mod stdio;

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_qualifications,
    clippy::undocumented_unsafe_blocks
)]
pub mod health {
    include!(concat!(env!("OUT_DIR"), "/health.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_qualifications,
    clippy::undocumented_unsafe_blocks
)]
pub mod health_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/health_ttrpc.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_qualifications,
    clippy::undocumented_unsafe_blocks
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

#[allow(
    clippy::all,
    clippy::pedantic,
    missing_docs,
    non_camel_case_types,
    non_upper_case_globals,
    unused_mut,
    unused_qualifications,
    clippy::undocumented_unsafe_blocks
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// Re-exported so users build servers and clients against the same ttrpc.
pub use ttrpc;

/// Bumped on any incompatible change to the services or the stdio header.
pub const PROTOCOL_VERSION: u32 = 1;

/// vsock port of the agent's ttrpc server (Health and Agent services).
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// vsock port on which each process stdio stream is a connection.
pub const STDIO_VSOCK_PORT: u32 = 1025;
/// vsock port that streams the agent's log.
pub const LOG_VSOCK_PORT: u32 = 1026;

/// Upper bound for ReadFile answers, so a guest cannot make the host buffer
/// arbitrary amounts of data.
pub const READ_FILE_MAX_LEN: u32 = 1024 * 1024;

/// Default guest mount point of a virtio-fs share that names none.
pub fn default_share_mount_point(tag: &str) -> String {
    format!("/run/boxlite/shares/{tag}")
}
