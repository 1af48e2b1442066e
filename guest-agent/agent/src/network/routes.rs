//! The main routing table. UpdateRoutes removes every route there that the
//! kernel did not make itself (protocol != kernel), then adds the asked
//! ones. The kernel's routes (connected subnets, IPv6 link-local) stay, as
//! they follow the addresses and are rebuilt by nobody else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
};
use rtnetlink::RouteMessageBuilder;

use super::convert::{add_order, RouteConfig};
use super::links::{links, names, Link};
use super::{Netlink, NetworkError};

/// A route of the main table, as far as UpdateRoutes compares them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Existing {
    v6: bool,
    dest: Option<IpAddr>,
    prefix_len: u8,
    oif: Option<u32>,
    has_gateway: bool,
    kernel: bool,
}

impl Existing {
    /// None for routes outside the main table.
    fn from_message(msg: &RouteMessage) -> Option<Existing> {
        let mut table = u32::from(msg.header.table);
        let mut e = Existing {
            v6: msg.header.address_family == rtnetlink::packet_route::AddressFamily::Inet6,
            dest: None,
            prefix_len: msg.header.destination_prefix_length,
            oif: None,
            has_gateway: false,
            kernel: msg.header.protocol == RouteProtocol::Kernel,
        };
        for attr in &msg.attributes {
            match attr {
                // Tables above 255 only fit the attribute.
                RouteAttribute::Table(t) => table = *t,
                RouteAttribute::Destination(d) => e.dest = ip_of(d),
                RouteAttribute::Oif(i) => e.oif = Some(*i),
                RouteAttribute::Gateway(_) | RouteAttribute::Via(_) => e.has_gateway = true,
                _ => {}
            }
        }
        (table == u32::from(RouteHeader::RT_TABLE_MAIN)).then_some(e)
    }

    /// The kernel's route is the one asked for: same destination and
    /// device, no gateway. Adding it again would fail with EEXIST (IPv4)
    /// or duplicate it at another metric (IPv6).
    fn is_kernel_route_for(&self, want: &RouteConfig, oif: Option<u32>) -> bool {
        let unspecified = if self.v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        self.kernel
            && want.gateway.is_none()
            && self.v6 == want.is_v6()
            && self.dest.unwrap_or(unspecified) == want.dest.ip
            && self.prefix_len == want.dest.prefix_len
            && self.oif == oif
            && !self.has_gateway
    }
}

fn ip_of(addr: &RouteAddress) -> Option<IpAddr> {
    match addr {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

/// Replaces the main table's routes with `routes` (see the module doc).
/// Devices are resolved first, so a route on an unknown device changes
/// nothing. A kernel error part-way leaves the removed routes removed and
/// some routes added; repeating the call is safe.
pub async fn update_routes(nl: &Netlink, routes: &[RouteConfig]) -> Result<(), NetworkError> {
    let all = links(nl).await?;
    let ordered = add_order(routes);
    let oifs = ordered
        .iter()
        .map(|r| device_index(nl, &all, r))
        .collect::<Result<Vec<_>, _>>()?;
    let kernel_routes = remove_non_kernel_routes(nl).await?;
    for (route, oif) in ordered.iter().zip(oifs) {
        if kernel_routes
            .iter()
            .any(|k| k.is_kernel_route_for(route, oif))
        {
            tracing::info!(%route, "route already there (the kernel's)");
            continue;
        }
        add_route(nl, route, oif).await?;
    }
    Ok(())
}

fn device_index(
    nl: &Netlink,
    all: &[Link],
    route: &RouteConfig,
) -> Result<Option<u32>, NetworkError> {
    let Some(device) = &route.device else {
        return Ok(None);
    };
    match all.iter().find(|l| &l.name == device) {
        Some(link) => Ok(Some(link.index)),
        None => Err(NetworkError::Invalid {
            rpc: nl.rpc,
            object: format!("route {route}"),
            reason: format!("no link named {device} (links: {})", names(all)),
        }),
    }
}

/// Deletes the main table's non-kernel routes of both families and
/// returns the kernel's, which stay.
async fn remove_non_kernel_routes(nl: &Netlink) -> Result<Vec<Existing>, NetworkError> {
    let mut kept = Vec::new();
    for query in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let msgs: Vec<RouteMessage> = nl
            .handle
            .route()
            .get(query)
            .execute()
            .try_collect()
            .await
            .map_err(|e| nl.failed("list routes", e))?;
        for msg in msgs {
            let Some(existing) = Existing::from_message(&msg) else {
                continue;
            };
            if existing.kernel {
                kept.push(existing);
            } else {
                delete_route(nl, msg, &existing).await?;
            }
        }
    }
    Ok(kept)
}

async fn delete_route(
    nl: &Netlink,
    msg: RouteMessage,
    existing: &Existing,
) -> Result<(), NetworkError> {
    let shown = match existing.dest {
        Some(d) => format!("{d}/{}", existing.prefix_len),
        None => "default".to_string(),
    };
    match nl.handle.route().del(msg).execute().await {
        Ok(()) => {
            tracing::info!(route = %shown, "route removed");
            Ok(())
        }
        // Gone meanwhile, e.g. with a route it depended on.
        Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::ESRCH => Ok(()),
        Err(e) => Err(nl.failed(format!("remove route {shown}"), e)),
    }
}

async fn add_route(
    nl: &Netlink,
    route: &RouteConfig,
    oif: Option<u32>,
) -> Result<(), NetworkError> {
    let msg = route_message(route, oif).map_err(|reason| NetworkError::Invalid {
        rpc: nl.rpc,
        object: format!("route {route}"),
        reason,
    })?;
    nl.handle
        .route()
        .add(msg)
        .execute()
        .await
        .map_err(|e| nl.failed(format!("add route {route}"), e))?;
    tracing::info!(%route, "route added");
    Ok(())
}

/// The RTM_NEWROUTE message: main table, protocol static, the asked scope.
fn route_message(route: &RouteConfig, oif: Option<u32>) -> Result<RouteMessage, String> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(route.dest.ip, route.dest.prefix_len)
        .map_err(|e| e.to_string())?
        .scope(RouteScope::from(route.scope));
    if let Some(i) = oif {
        b = b.output_interface(i);
    }
    if let Some(gw) = route.gateway {
        b = b.gateway(gw).map_err(|e| e.to_string())?;
    }
    if let Some(src) = route.source {
        b = b.pref_source(src).map_err(|e| e.to_string())?;
    }
    Ok(b.build())
}
