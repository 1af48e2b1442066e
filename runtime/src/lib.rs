//! BoxLite runtime library: what the shim (and the tests) use to run a
//! sandbox VM.
//!
//! * [`config`]: `/etc/boxlite/boxlite.toml`, validated at load.
//! * [`cgroup`]: the pod's cgroup, which every host process of its VM joins.
//! * [`hybrid_vsock`]: the host side of Firecracker-style hybrid vsock
//!   (`CONNECT <port>\n` → `OK …\n` on a unix socket), and ttrpc clients over it.
//! * [`hypervisor`]: the [`hypervisor::Hypervisor`] trait every backend
//!   implements, the VM description ([`hypervisor::VmSpec`]), the agent
//!   connection, and the backends ([`hypervisor::qemu`],
//!   [`hypervisor::builtin`]).
//! * [`network`]: the host side of pod networking: taps in the pod's netns
//!   wired to its interfaces with tc redirects (Kata's "tcfilter" model).
//! * [`sizing`]: the VM's vCPUs and memory from the pod's limits.
//! * [`log_tail`]: the end of a log file, for error reports.
//!
//! Error messages in this crate name the object; an underlying error is
//! the `#[source]`, not part of the message, so print errors with
//! `boxlite_protocol::error_chain::chain`. Two still carry their cause in
//! the message, saying why at their definition: `ConfigError`'s
//! `Read`/`Invalid` and `HybridVsockError::Failed` (the shim prints them
//! with `to_string()` today).

pub mod annotations;
pub mod cgroup;
pub mod config;
pub mod hybrid_vsock;
pub mod hypervisor;
pub mod network;
pub mod sizing;

pub use config::Config;
pub use hybrid_vsock::HybridVsock;
pub use hypervisor::{new_hypervisor, AgentConnection, Hypervisor, HypervisorError, VmSpec};

use std::time::Duration;

/// `30s`, `1.5s`, `250ms`: durations as people write them in messages.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(fmt_duration(Duration::from_secs(30)), "30s");
        assert_eq!(fmt_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(fmt_duration(Duration::ZERO), "0s");
    }
}
