//! Errors to ttrpc statuses: which code each error gets (the one place
//! where this is decided) and the message, the error with its causes.

use boxlite_protocol::error_chain::chain;
use ttrpc::Code;

use crate::container::ContainerError;
use crate::error::AgentError;
use crate::etc::EtcError;
use crate::files::FileError;
use crate::identity::IdentityError;
use crate::network::NetworkError;
use crate::sandbox::SandboxError;
use crate::share::ShareError;

/// The status code for each error: the one place where this is decided.
pub fn status_code(err: &AgentError) -> Code {
    match err {
        AgentError::Sandbox(e) => match e {
            SandboxError::InvalidId(_)
            | SandboxError::TooManyShares { .. }
            | SandboxError::Timeout { .. } => Code::INVALID_ARGUMENT,
            SandboxError::AlreadyCreated(_) => Code::ALREADY_EXISTS,
            SandboxError::Destroying => Code::FAILED_PRECONDITION,
            SandboxError::Hostname(e) => etc_code(e),
            SandboxError::Share(e) => share_code(e),
            SandboxError::Identity(e) => match e {
                IdentityError::SeedLength { .. } | IdentityError::Clock(_) => {
                    Code::INVALID_ARGUMENT
                }
                IdentityError::Entropy { .. } | IdentityError::SetClock(_) => Code::INTERNAL,
            },
        },
        AgentError::Etc(e) => etc_code(e),
        AgentError::Share(e) => share_code(e),
        AgentError::File(e) => match e {
            FileError::Path(_) | FileError::NotRegular { .. } => Code::INVALID_ARGUMENT,
            FileError::Open { .. } | FileError::Read { .. } => match e.io_kind() {
                Some(std::io::ErrorKind::NotFound) => Code::NOT_FOUND,
                Some(std::io::ErrorKind::PermissionDenied) => Code::FAILED_PRECONDITION,
                _ => Code::INTERNAL,
            },
        },
        AgentError::GuestInfo(_) => Code::INTERNAL,
        AgentError::Container(e) => container_code(e),
        AgentError::Network(e) => network_code(e),
        AgentError::Cpus(e) => match e {
            crate::cpus::CpuError::TooMany { .. } => Code::INVALID_ARGUMENT,
            _ => Code::INTERNAL,
        },
        AgentError::Unimplemented(_) => Code::UNIMPLEMENTED,
        AgentError::Panicked(_) | AgentError::Worker(_) => Code::INTERNAL,
    }
}

fn container_code(e: &ContainerError) -> Code {
    match e {
        ContainerError::InvalidId { .. }
        | ContainerError::InvalidSpec(_)
        | ContainerError::RootfsMissing(_)
        | ContainerError::InvalidSignal(_) => Code::INVALID_ARGUMENT,
        ContainerError::NotFound(_)
        | ContainerError::ExecNotFound { .. }
        | ContainerError::Exited { .. } => Code::NOT_FOUND,
        ContainerError::AlreadyExists(_) | ContainerError::ExecExists { .. } => {
            Code::ALREADY_EXISTS
        }
        ContainerError::State { .. }
        | ContainerError::Precondition(_)
        | ContainerError::StreamsMissing { .. } => Code::FAILED_PRECONDITION,
        ContainerError::Helper { .. }
        | ContainerError::Io { .. }
        | ContainerError::Cgroup { .. } => Code::INTERNAL,
    }
}

fn network_code(e: &NetworkError) -> Code {
    match e {
        NetworkError::Invalid { .. } => Code::INVALID_ARGUMENT,
        NetworkError::NoLink { .. } => Code::NOT_FOUND,
        NetworkError::Socket { .. } | NetworkError::Netlink { .. } => Code::INTERNAL,
    }
}

fn etc_code(e: &EtcError) -> Code {
    match e {
        EtcError::InvalidHostname { .. }
        | EtcError::NotAnIp { .. }
        | EtcError::InvalidToken { .. }
        | EtcError::TooMany { .. }
        | EtcError::NoNames { .. } => Code::INVALID_ARGUMENT,
        EtcError::SetHostname { .. } | EtcError::Write { .. } => Code::INTERNAL,
    }
}

fn share_code(e: &ShareError) -> Code {
    match e {
        ShareError::InvalidTag { .. } | ShareError::MountPoint(_) => Code::INVALID_ARGUMENT,
        ShareError::Busy { .. } => Code::ALREADY_EXISTS,
        ShareError::ReadOnlyMismatch { .. } => Code::FAILED_PRECONDITION,
        ShareError::HostShareMissing { .. } | ShareError::NoSuchTag { .. } => Code::NOT_FOUND,
        ShareError::Mount { .. }
        | ShareError::CreateMountPoint { .. }
        | ShareError::Unmount { .. }
        | ShareError::ReadMountinfo(_)
        | ShareError::HostLink { .. } => Code::INTERNAL,
    }
}

/// Logs the failure (caller mistakes at warn, agent failures at error) and
/// builds the status with the whole error chain as its message.
pub fn to_status(err: &AgentError) -> ttrpc::Error {
    let code = status_code(err);
    let message = chain(err);
    match code {
        Code::INTERNAL => tracing::error!(?code, "{message}"),
        Code::UNIMPLEMENTED => tracing::info!(?code, "{message}"),
        _ => tracing::warn!(?code, "{message}"),
    }
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::{agent, ids};

    use crate::files::ReadFileRequest;
    use crate::network::InterfaceConfig;

    #[test]
    fn codes_for_caller_mistakes_and_agent_failures() {
        let cases: Vec<(AgentError, Code)> = vec![
            (
                SandboxError::AlreadyCreated("s".into()).into(),
                Code::ALREADY_EXISTS,
            ),
            (SandboxError::Destroying.into(), Code::FAILED_PRECONDITION),
            (
                SandboxError::InvalidId(ids::validate("sandbox", "a/b").unwrap_err()).into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                ContainerError::InvalidId {
                    field: "exec_id",
                    source: ids::validate("exec", ".x").unwrap_err(),
                }
                .into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                crate::etc::validate_hostname("a_b").unwrap_err().into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                SandboxError::from(crate::etc::validate_hostname("").unwrap_err()).into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                ShareError::NoSuchTag {
                    tag: "t".into(),
                    mount_point: "/m".into(),
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                }
                .into(),
                Code::NOT_FOUND,
            ),
            (
                ShareError::Mount {
                    tag: "t".into(),
                    mount_point: "/m".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENODEV),
                }
                .into(),
                Code::INTERNAL,
            ),
            (
                FileError::Open {
                    path: "/x".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENOENT),
                }
                .into(),
                Code::NOT_FOUND,
            ),
            (
                ReadFileRequest::validate("x", 0).unwrap_err().into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                InterfaceConfig::validate(&agent::UpdateInterfaceRequest::new())
                    .unwrap_err()
                    .into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                NetworkError::NoLink {
                    rpc: "UpdateInterface",
                    selector: "named eth9".into(),
                    links: "lo".into(),
                }
                .into(),
                Code::NOT_FOUND,
            ),
            (
                NetworkError::Netlink {
                    rpc: "UpdateRoutes",
                    action: "add route default via 10.0.0.1".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENETUNREACH),
                }
                .into(),
                Code::INTERNAL,
            ),
            (AgentError::Unimplemented("x".into()), Code::UNIMPLEMENTED),
            (AgentError::Panicked("X"), Code::INTERNAL),
        ];
        for (err, code) in cases {
            assert_eq!(status_code(&err), code, "{err}");
        }
    }
}
