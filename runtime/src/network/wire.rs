//! Wiring, run on the netns thread: a tap per pod interface and the tc
//! redirects between them, undone if any step fails.

use std::os::fd::OwnedFd;

use futures_util::TryStreamExt;
use rtnetlink::{Handle, LinkUnspec};

use boxlite_protocol::error_chain::chain;

use super::error::{Ctx, NetworkError};
use super::inspect::{self, PodLink};
use super::model::{PodNetwork, WiredInterface};
use super::tap::{create_tap, tap_name};
use super::tc;

/// A netlink connection of the calling thread's netns, driven by its
/// runtime.
pub(crate) fn connect(ctx: &Ctx) -> Result<Handle, NetworkError> {
    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| ctx.error(None, "open a netlink socket", e))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// Wires every pod interface of the current netns; see
/// [`super::PodNetwork::wire`].
pub(crate) async fn wire_here(ctx: Ctx) -> Result<PodNetwork, NetworkError> {
    let handle = connect(&ctx)?;
    let links = inspect::pod_links(&handle)
        .await
        .map_err(|e| ctx.error(None, "list the links and addresses", e))?;
    let routes = inspect::pod_routes(&handle, &links)
        .await
        .map_err(|e| ctx.error(None, "list the routes", e))?;
    let mut undo = Undo::default();
    let mut interfaces = Vec::with_capacity(links.len());
    for (n, link) in links.into_iter().enumerate() {
        match wire_link(&handle, &ctx, tap_name(n), link, &mut undo).await {
            Ok(wired) => interfaces.push(wired),
            Err(e) => {
                undo.run(&handle, &ctx).await;
                return Err(e);
            }
        }
    }
    Ok(PodNetwork { interfaces, routes })
}

/// What has been done so far, to undo on failure.
#[derive(Default)]
struct Undo {
    /// Pod interfaces we added an ingress qdisc to: (ifindex, name).
    qdiscs: Vec<(u32, String)>,
    /// Taps we created: (ifindex, name). Their own qdisc and filter go with
    /// them.
    taps: Vec<(u32, String)>,
}

impl Undo {
    /// Best effort: a step that fails is logged and the rest still run, so
    /// the caller gets the error that started it all.
    async fn run(self, handle: &Handle, ctx: &Ctx) {
        for (index, name) in self.qdiscs {
            if let Err(e) = tc::del_ingress_qdisc(handle, index).await {
                let e = ctx.error(
                    Some(&name),
                    format!("remove the ingress qdisc of {name}"),
                    e,
                );
                tracing::warn!("pod network: undoing a failed wiring: {}", chain(&e));
            }
        }
        for (index, name) in self.taps {
            if let Err(e) = handle.link().del(index).execute().await {
                let e = ctx.error(Some(&name), format!("delete tap {name}"), e);
                tracing::warn!("pod network: undoing a failed wiring: {}", chain(&e));
            }
        }
    }
}

/// Creates the tap for `link` and redirects each one's ingress to the
/// other.
async fn wire_link(
    handle: &Handle,
    ctx: &Ctx,
    tap: String,
    link: PodLink,
    undo: &mut Undo,
) -> Result<WiredInterface, NetworkError> {
    let name = link.name.as_str();
    let tap_fd: OwnedFd = create_tap(&tap)
        .map_err(|e| ctx.error(Some(name), format!("create tap {tap} for {name}"), e))?;
    let tap_index = link_index(handle, &tap)
        .await
        .map_err(|e| ctx.error(Some(&tap), format!("find tap {tap}"), e))?;
    undo.taps.push((tap_index, tap.clone()));

    let set = LinkUnspec::new_with_index(tap_index)
        .mtu(link.mtu)
        .up()
        .build();
    handle.link().set(set).execute().await.map_err(|e| {
        let action = format!("set the MTU of {tap} to {} and bring it up", link.mtu);
        ctx.error(Some(&tap), action, e)
    })?;

    tc::add_ingress_qdisc(handle, link.index)
        .await
        .map_err(|e| ctx.error(Some(name), format!("add the ingress qdisc on {name}"), e))?;
    undo.qdiscs.push((link.index, link.name.clone()));
    tc::add_ingress_qdisc(handle, tap_index)
        .await
        .map_err(|e| ctx.error(Some(&tap), format!("add the ingress qdisc on {tap}"), e))?;

    tc::add_redirect(handle, tap_index, link.index)
        .await
        .map_err(|e| ctx.error(Some(&tap), format!("redirect {tap}'s ingress to {name}"), e))?;
    tc::add_redirect(handle, link.index, tap_index)
        .await
        .map_err(|e| ctx.error(Some(name), format!("redirect {name}'s ingress to {tap}"), e))?;

    Ok(WiredInterface {
        name: link.name,
        mac: link.mac,
        mtu: link.mtu,
        addresses: link.addresses,
        tap_name: tap,
        tap_fd: Some(tap_fd),
    })
}

/// The ifindex of the link called `name`.
async fn link_index(handle: &Handle, name: &str) -> Result<u32, rtnetlink::Error> {
    let mut links = handle.link().get().match_name(name).execute();
    match links.try_next().await? {
        Some(msg) => Ok(msg.header.index),
        // match_name answers ENODEV for a missing link; this is only for a
        // reply with no message at all.
        None => Err(rtnetlink::Error::RequestFailed),
    }
}
