//! [`NetworkError`] and the context every step of wiring builds it from.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// A pod networking step that failed. The message names the sandbox (when
/// known), the netns and what was being done (with the interface); the
/// kernel's answer is the source, so the chain reads `sandbox 3f2a: netns
/// /var/run/netns/cni-1: cannot add the ingress qdisc on eth0: Operation
/// not permitted`.
#[derive(Debug, thiserror::Error)]
#[error(
    "{}netns {}: cannot {action}",
    SandboxPrefix(.sandbox.as_deref()),
    .netns.display()
)]
pub struct NetworkError {
    /// `None` for [`super::teardown`], which a shim may call with nothing but
    /// the names it recorded.
    pub sandbox: Option<String>,
    pub netns: PathBuf,
    /// The pod interface or tap the step was about, if any.
    pub interface: Option<String>,
    /// What was being done, e.g. "add the ingress qdisc on eth0".
    pub action: String,
    /// The kernel's answer (an errno for netlink and ioctl failures).
    #[source]
    pub cause: Cause,
}

impl NetworkError {
    /// The errno behind the failure, if the kernel gave one.
    pub fn errno(&self) -> Option<i32> {
        self.cause.0.raw_os_error()
    }
}

struct SandboxPrefix<'a>(Option<&'a str>);

impl fmt::Display for SandboxPrefix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(id) => write!(f, "sandbox {id}: "),
            None => Ok(()),
        }
    }
}

/// Why a step failed, normalised to `io::Error` so callers can match on the
/// errno whatever layer reported it. Prints "Operation not permitted"
/// rather than io::Error's "Operation not permitted (os error 1)": the
/// errno number adds nothing for a reader.
#[derive(Debug)]
pub struct Cause(pub io::Error);

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0.raw_os_error() {
            Some(code) => f.write_str(nix::errno::Errno::from_raw(code).desc()),
            None => fmt::Display::fmt(&self.0, f),
        }
    }
}

/// The io::Error is this error's text, not a further cause: no source.
impl std::error::Error for Cause {}

/// Where the work happens: which sandbox and which netns. Cloned into the
/// netns thread so every error built there carries both.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub sandbox: Option<String>,
    pub netns: PathBuf,
}

impl Ctx {
    pub fn new(sandbox: Option<&str>, netns: &Path) -> Self {
        Ctx {
            sandbox: sandbox.map(str::to_owned),
            netns: netns.to_owned(),
        }
    }

    /// An error about `interface` (or the netns as a whole when `None`).
    pub fn error(
        &self,
        interface: Option<&str>,
        action: impl Into<String>,
        cause: impl Into<Cause>,
    ) -> NetworkError {
        NetworkError {
            sandbox: self.sandbox.clone(),
            netns: self.netns.clone(),
            interface: interface.map(str::to_owned),
            action: action.into(),
            cause: cause.into(),
        }
    }
}

impl From<io::Error> for Cause {
    fn from(e: io::Error) -> Self {
        Cause(e)
    }
}

impl From<nix::Error> for Cause {
    fn from(e: nix::Error) -> Self {
        Cause(io::Error::from_raw_os_error(e as i32))
    }
}

impl From<rtnetlink::Error> for Cause {
    fn from(e: rtnetlink::Error) -> Self {
        Cause(netlink_io_error(e))
    }
}

/// A netlink error as an `io::Error`: the kernel's errno when it sent one,
/// rtnetlink's own description (decoding, unexpected reply) otherwise.
pub(crate) fn netlink_io_error(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => msg.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// The errno of a netlink failure, if it has one.
pub(crate) fn netlink_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => Some(msg.raw_code().abs()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::error_chain::chain;

    #[test]
    fn message_names_sandbox_netns_action_and_cause() {
        let ctx = Ctx::new(Some("3f2a"), Path::new("/var/run/netns/cni-1"));
        let err = ctx.error(
            Some("eth0"),
            "add the ingress qdisc on eth0",
            nix::Error::EPERM,
        );
        assert_eq!(
            chain(&err),
            "sandbox 3f2a: netns /var/run/netns/cni-1: cannot add the ingress qdisc on eth0: \
             Operation not permitted"
        );
        assert_eq!(err.errno(), Some(libc::EPERM));
        assert_eq!(err.interface.as_deref(), Some("eth0"));
    }

    #[test]
    fn message_without_sandbox_or_errno() {
        let ctx = Ctx::new(None, Path::new("/proc/42/ns/net"));
        let err = ctx.error(None, "list links", io::Error::other("bad reply"));
        assert_eq!(
            chain(&err),
            "netns /proc/42/ns/net: cannot list links: bad reply"
        );
        assert_eq!(err.errno(), None);
    }
}
