//! Pod networking, host side: wires a pod's network namespace to its VM the
//! way Kata's "tcfilter" model does.
//!
//! The CNI plugin sets up the pod's netns (usually a veth `eth0` with an
//! address and a default route) as for any container. [`PodNetwork::wire`]
//! then, inside that netns and for each pod interface:
//! * creates a tap `tap<N>_bx` (N = the interface's position) with the
//!   interface's MTU, and keeps its fd for the VMM ([`WiredInterface::take_tap`]);
//! * adds an ingress qdisc on both and a match-all u32 filter on each whose
//!   mirred action redirects every frame to the other's egress: what
//!   arrives on `eth0` goes to the VM, what the VM sends leaves by `eth0`.
//!
//! It returns what the guest needs to take over the interface: its MAC (the
//! guest NIC must use it: peers resolve the pod's IP to it), MTU, global
//! addresses and the routes of the main table ([`inspect::route_of`] says
//! which). The netns's own addresses and routes stay as the CNI left them:
//! nothing reaches its stack any more, and CNI DEL still finds what it made.
//!
//! [`teardown`] removes the ingress qdiscs (and with them the filters) and
//! the taps; it is idempotent, and a netns that is gone is fine.
//!
//! All netns work runs on a dedicated thread ([`netns`]), never on a tokio
//! worker.

mod error;
mod inspect;
mod model;
mod netns;
mod tap;
mod tc;
mod teardown;
mod wire;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The project's one MAC type (`boxlite_protocol::mac`), as pod interfaces
/// and guest NICs carry it.
pub use boxlite_protocol::mac::MacAddr;
pub use error::{Cause, NetworkError};
pub use model::{IpFamily, IpNet, PodNetwork, PodRoute, RouteScope, WiredInterface};
pub use tap::{create_tap, is_tap_name, tap_name, TapDevice, TAP_SUFFIX};

use error::Ctx;

/// The calling process's own netns.
const OWN_NETNS: &str = "/proc/self/ns/net";

impl PodNetwork {
    /// Wires every pod interface of the netns at `netns` (a bind-mounted
    /// `/var/run/netns/cni-…` or `/proc/<pid>/ns/net`) to a new tap, see
    /// [`self`]. A netns with only `lo` gives zero interfaces. On error
    /// nothing wired so far is left behind. A netns still wired from before
    /// fails (the tap is busy or the ingress qdisc exists): call
    /// [`teardown`] first.
    ///
    /// Refuses the runtime's own netns: redirecting the host's interfaces
    /// into a VM would cut the host off (a hostNetwork pod has no netns of
    /// its own to wire).
    pub async fn wire(sandbox_id: &str, netns: &Path) -> Result<PodNetwork, NetworkError> {
        let ctx = Ctx::new(Some(sandbox_id), netns);
        if is_own_netns(netns) {
            return Err(ctx.error(
                None,
                "wire the host's own network namespace",
                std::io::Error::other("it is the runtime's own namespace, not a pod's"),
            ));
        }
        let job_ctx = ctx.clone();
        let wired = netns::run_in_netns(netns, move || wire::wire_here(job_ctx))
            .await
            .map_err(|e| ctx.error(None, e.action, e.error))??;
        tracing::info!(
            sandbox = sandbox_id,
            netns = %netns.display(),
            interfaces = ?wired.interfaces.iter().map(|i| (&i.name, &i.tap_name)).collect::<Vec<_>>(),
            routes = wired.routes.len(),
            "pod network wired"
        );
        Ok(wired)
    }
}

/// Undoes [`PodNetwork::wire`] in the netns at `netns`: removes the ingress
/// qdisc (and its filters) of every interface that redirects to one of
/// `tap_names` or to a device that no longer exists, then deletes those taps.
/// Idempotent: missing taps, qdiscs and a netns that no longer exists are
/// fine, so a shim can call it after a crash with the names it recorded
/// ([`PodNetwork::tap_names`]).
///
/// Every name must be a BoxLite tap name (`tap<N>_bx`): a corrupt record
/// must not make it delete the pod's `eth0`.
pub async fn teardown(netns: &Path, tap_names: &[String]) -> Result<(), NetworkError> {
    let ctx = Ctx::new(None, netns);
    if let Some(bad) = tap_names.iter().find(|n| !is_tap_name(n)) {
        return Err(ctx.error(
            Some(bad),
            format!("tear down {bad:?}"),
            std::io::Error::other("not a BoxLite tap name (tap<N>_bx)"),
        ));
    }
    let job_ctx = ctx.clone();
    let names = tap_names.to_vec();
    match netns::run_in_netns(netns, move || teardown::teardown_here(job_ctx, names)).await {
        Ok(done) => done,
        Err(e) if e.netns_is_gone() => {
            tracing::debug!(netns = %netns.display(), "pod network teardown: the netns is gone");
            Ok(())
        }
        Err(e) => Err(ctx.error(None, e.action, e.error)),
    }
}

/// Whether `netns` is the namespace this process runs in (same nsfs inode).
/// False when either cannot be read: the netns open then reports why.
fn is_own_netns(netns: &Path) -> bool {
    match (std::fs::metadata(netns), std::fs::metadata(OWN_NETNS)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::error_chain::chain;

    #[tokio::test]
    async fn refuses_the_hosts_netns() {
        let err = PodNetwork::wire("3f2a", Path::new(OWN_NETNS))
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("sandbox 3f2a: netns /proc/self/ns/net: cannot wire the host's own"),
            "{msg}"
        );
    }

    #[tokio::test]
    async fn missing_netns_wire_error_names_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cni-gone");
        let err = PodNetwork::wire("3f2a", &path).await.unwrap_err();
        assert_eq!(
            chain(&err),
            format!(
                "sandbox 3f2a: netns {}: cannot open the network namespace: No such file or directory",
                path.display()
            )
        );
    }

    #[tokio::test]
    async fn teardown_refuses_names_that_are_not_taps() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["tap0_bx".to_string(), "eth0".to_string()];
        let err = teardown(&dir.path().join("cni-1"), &names)
            .await
            .unwrap_err();
        assert!(
            chain(&err).ends_with("cannot tear down \"eth0\": not a BoxLite tap name (tap<N>_bx)"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn teardown_of_missing_netns_is_fine() {
        let dir = tempfile::tempdir().unwrap();
        teardown(&dir.path().join("cni-gone"), &["tap0_bx".into()])
            .await
            .unwrap();
    }
}
