//! The error every RPC's work returns: one variant per module error, plus
//! the RPCs that are not there yet. `rpc.rs` turns it into a ttrpc status.

use crate::container::error::ContainerError;
use crate::etc::EtcError;
use crate::files::FileError;
use crate::guest_info::GuestInfoError;
use crate::network::NetworkError;
use crate::sandbox::SandboxError;
use crate::share::ShareError;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Etc(#[from] EtcError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    GuestInfo(#[from] GuestInfoError),
    #[error(transparent)]
    Container(#[from] ContainerError),
    #[error(transparent)]
    Network(#[from] NetworkError),
    #[error(transparent)]
    Cpus(#[from] crate::cpus::CpuError),
    /// The RPC exists in the protocol but not in this agent yet.
    #[error("{0}")]
    Unimplemented(String),
    #[error("agent bug: the {0} handler panicked")]
    Panicked(&'static str),
    #[error("agent bug: the {0} worker thread failed")]
    Worker(&'static str),
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::error_chain::chain;

    #[test]
    fn chain_joins_causes() {
        let e = AgentError::Share(ShareError::Mount {
            tag: "share0".into(),
            mount_point: "/run/boxlite/shares/share0".into(),
            source: std::io::Error::from_raw_os_error(libc::ENODEV),
        });
        assert_eq!(
            chain(&e),
            "mount virtiofs tag share0 on /run/boxlite/shares/share0 failed: \
             No such device (os error 19)"
        );
    }
}
