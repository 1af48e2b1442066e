//! `containerd-shim-boxlite-v2`: the containerd runtime (shim v2, runtime
//! type `io.containerd.boxlite.v2`) that runs every pod sandbox in its own
//! micro-VM. See docs/shim.md.
//!
//! * [`shim`]: start / delete / daemon on `containerd-shim` 0.11 (async);
//!   [`grouping`]: which sandbox a container joins.
//! * [`task_service`]: containerd's Task API, one short fn per RPC;
//!   [`convert`]: protobuf ⇄ the sandbox's types.
//! * [`sandbox`]: one VM per sandbox, the container table, [`sandbox::TaskState`];
//!   [`agent_client`]: the typed, time-bounded calls to the guest agent.
//! * [`rootfs`]: rootfs and volumes onto the virtio-fs share;
//!   [`hooks`]: OCI hooks on the host, in the pod's netns;
//!   [`stdio`]: the IO relay to the agent's stdio streams;
//!   [`events`]: the [`events::EventSink`] to containerd.

pub mod agent_client;
pub mod convert;
pub mod error;
pub mod events;
pub mod fuzzing;
pub mod grouping;
pub mod hooks;
pub mod logging;
pub mod rootfs;
pub mod sandbox;
pub mod shim;
pub mod stdio;
pub mod task_service;
#[cfg(test)]
pub mod test_utils;

pub use error::ShimError;
