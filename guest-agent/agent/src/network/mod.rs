//! Guest networking: `lo` at start-up ([`bring_up`], ioctls) and the pod
//! network RPCs UpdateInterface and UpdateRoutes over rtnetlink.
//!
//! `convert` checks requests into plain types, `links` configures a link
//! and its addresses, `routes` the main routing table. Both RPCs act on the
//! network namespace the agent runs in: the VM's in the guest, whatever
//! namespace the agent was started in on the host (tests use a throwaway
//! one). They are serialised, so two calls never interleave their
//! netlink requests.

mod convert;
mod links;
mod loopback;
mod routes;

use tokio::sync::Mutex;

pub use convert::{validate_routes, Cidr, InterfaceConfig, LinkSelector, LinkState, RouteConfig};
pub use loopback::{bring_up, LinkUpError};

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// The request is wrong: `object` is the part of it, `reason` why.
    #[error("{rpc}: {object}: {reason}")]
    Invalid {
        rpc: &'static str,
        object: String,
        reason: String,
    },
    /// UpdateInterface named a link that is not there.
    #[error("{rpc}: no link {selector} (links: {links})")]
    NoLink {
        rpc: &'static str,
        selector: String,
        links: String,
    },
    #[error("{rpc}: cannot open a netlink socket")]
    Socket {
        rpc: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused a request; `source` is its errno.
    #[error("{rpc}: {action} failed")]
    Netlink {
        rpc: &'static str,
        action: String,
        #[source]
        source: std::io::Error,
    },
}

/// One rtnetlink connection, closed when dropped. A connection per call
/// keeps no socket open between RPCs, and never one bound to a namespace
/// the agent has left.
struct Netlink {
    handle: rtnetlink::Handle,
    connection: tokio::task::JoinHandle<()>,
    rpc: &'static str,
}

impl Netlink {
    fn connect(rpc: &'static str) -> Result<Self, NetworkError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(|source| NetworkError::Socket { rpc, source })?;
        Ok(Netlink {
            handle,
            connection: tokio::spawn(connection),
            rpc,
        })
    }

    /// The error for a failed request: the kernel's errno when it answered
    /// with one, otherwise rtnetlink's own description.
    fn failed(&self, action: impl Into<String>, err: rtnetlink::Error) -> NetworkError {
        let source = match err {
            rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
            other => std::io::Error::other(other.to_string()),
        };
        NetworkError::Netlink {
            rpc: self.rpc,
            action: action.into(),
            source,
        }
    }
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

/// The pod network of this agent's namespace.
#[derive(Default)]
pub struct Network {
    lock: Mutex<()>,
}

impl Network {
    /// UpdateInterface: see `links::update_interface`.
    pub async fn update_interface(&self, cfg: &InterfaceConfig) -> Result<LinkState, NetworkError> {
        let _serial = self.lock.lock().await;
        let nl = Netlink::connect("UpdateInterface")?;
        links::update_interface(&nl, cfg).await
    }

    /// UpdateRoutes: see `routes::update_routes`.
    pub async fn update_routes(&self, routes: &[RouteConfig]) -> Result<(), NetworkError> {
        let _serial = self.lock.lock().await;
        let nl = Netlink::connect("UpdateRoutes")?;
        routes::update_routes(&nl, routes).await
    }
}
