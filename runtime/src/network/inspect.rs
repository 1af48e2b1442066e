//! Reading the pod netns: which links to wire, their addresses, and the
//! routes the guest needs. The conversions from netlink messages are pure
//! functions so the selection rules are unit-tested without a netns.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol,
    RouteScope as NlRouteScope, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

use super::model::{IpFamily, IpNet, PodRoute, RouteScope};
use super::tap::is_tap_name;
use super::MacAddr;

/// A link of the netns, as much as wiring and teardown need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    pub loopback: bool,
    pub ethernet: bool,
}

/// A link to wire, with its global addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodLink {
    pub index: u32,
    pub name: String,
    pub mac: MacAddr,
    pub mtu: u32,
    pub addresses: Vec<IpNet>,
}

pub(crate) fn link_of(msg: &LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        mac: None,
        mtu: 0,
        loopback: msg.header.flags.contains(LinkFlags::Loopback),
        ethernet: msg.header.link_layer_type == LinkLayerType::Ether,
    };
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(bytes) => {
                link.mac = <[u8; 6]>::try_from(bytes.as_slice()).ok().map(MacAddr)
            }
            _ => {}
        }
    }
    link
}

/// Why `link` is not a pod interface to wire, or `None` if it is. The rule
/// (Kata's, plus the link type a virtio-net NIC can stand in for):
/// * loopback: the guest has its own;
/// * our taps: left from an earlier wiring, never a pod interface;
/// * not Ethernet (tunl0, sit0, ip6tnl0 the kernel adds to every netns when
///   those modules are loaded): a guest NIC cannot take their place;
/// * no global address (gretap0, erspan0: Ethernet fallback devices; or an
///   interface the CNI left unconfigured): nothing for the guest to use.
pub(crate) fn skip_reason(link: &Link, addresses: &[IpNet]) -> Option<&'static str> {
    if link.loopback {
        Some("loopback")
    } else if is_tap_name(&link.name) {
        Some("a BoxLite tap")
    } else if !link.ethernet || link.mac.is_none() {
        Some("not an Ethernet interface")
    } else if addresses.is_empty() {
        Some("no global address")
    } else {
        None
    }
}

/// The interface index and the address of `msg`, if the guest needs it:
/// global scope only, so no IPv6 link-local (fe80::/10, which the guest
/// kernel makes from the MAC itself) and no host-scope addresses.
pub(crate) fn address_of(msg: &AddressMessage) -> Option<(u32, IpNet)> {
    if msg.header.scope != AddressScope::Universe {
        return None;
    }
    let mut address = None;
    let mut local = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Address(a) => address = Some(*a),
            AddressAttribute::Local(a) => local = Some(*a),
            _ => {}
        }
    }
    // On a point-to-point IPv4 link IFA_ADDRESS is the peer and IFA_LOCAL
    // ours; elsewhere they are equal, and IPv6 sends IFA_ADDRESS only.
    let addr = local.or(address)?;
    if is_ipv6_link_local(&addr) {
        return None;
    }
    Some((
        msg.header.index,
        IpNet {
            addr,
            prefix_len: msg.header.prefix_len,
        },
    ))
}

fn is_ipv6_link_local(addr: &IpAddr) -> bool {
    matches!(addr, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

/// `msg` as a route the guest should add, or why it is left out. The rule:
/// * main table, unicast routes only (local/broadcast routes live in the
///   local table; blackhole/unreachable/prohibit routes have no device);
/// * not `proto kernel`: those are the connected routes the kernel derives
///   from addresses (10.77.0.0/24 for 10.77.0.2/24, fe80::/64, ...), and
///   the guest kernel derives the same ones when the addresses are added,
///   so copying them would only collide;
/// * through a wired pod interface (`devices`): a route through any other
///   device has no counterpart in the guest;
/// * one next hop: multipath routes are not reproduced (CNIs do not make
///   them inside a pod).
///
/// Everything else is kept: default routes, CNI-added routes like Calico's
/// `169.254.1.1 dev eth0 scope link`, static and RA routes.
pub(crate) fn route_of(
    msg: &RouteMessage,
    devices: &HashMap<u32, String>,
) -> Result<PodRoute, &'static str> {
    let header = &msg.header;
    let family = match header.address_family {
        AddressFamily::Inet => IpFamily::V4,
        AddressFamily::Inet6 => IpFamily::V6,
        _ => return Err("not IPv4 or IPv6"),
    };
    if table_of(msg) != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return Err("not in the main table");
    }
    if header.kind != RouteType::Unicast {
        return Err("not a unicast route");
    }
    if header.protocol == RouteProtocol::Kernel {
        return Err("made by the kernel from an address");
    }
    let mut destination = None;
    let mut gateway = None;
    let mut source = None;
    let mut oif = None;
    let mut metric = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => destination = ip_of(a),
            RouteAttribute::Gateway(a) => gateway = ip_of(a),
            RouteAttribute::PrefSource(a) => source = ip_of(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Priority(p) => metric = Some(*p),
            RouteAttribute::MultiPath(_) => return Err("multipath"),
            RouteAttribute::Via(_) => return Err("a gateway of the other family"),
            _ => {}
        }
    }
    let device = oif
        .and_then(|i| devices.get(&i))
        .ok_or("not through a pod interface")?;
    let destination = match (destination, header.destination_prefix_length) {
        (_, 0) => None,
        (Some(addr), prefix_len) => Some(IpNet { addr, prefix_len }),
        (None, _) => return Err("a prefix without a destination"),
    };
    Ok(PodRoute {
        family,
        destination,
        gateway,
        device: device.clone(),
        source,
        scope: scope_of(header.scope),
        metric,
    })
}

/// The table id: RTA_TABLE when present (ids above 255 only fit there),
/// else the header's.
fn table_of(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn scope_of(scope: NlRouteScope) -> RouteScope {
    match scope {
        NlRouteScope::Universe => RouteScope::Universe,
        NlRouteScope::Link => RouteScope::Link,
        NlRouteScope::Host => RouteScope::Host,
        other => RouteScope::Other(u8::from(other)),
    }
}

/// Puts routes in the order the guest can add them: those without a gateway
/// first, so that a gateway reachable only through a link route (Calico's
/// `169.254.1.1 dev eth0 scope link` before `default via 169.254.1.1`) is
/// reachable when the route through it is added. Stable otherwise.
pub(crate) fn order_routes(routes: &mut [PodRoute]) {
    routes.sort_by_key(|r| r.gateway.is_some());
}

pub(crate) async fn links(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    let msgs: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    Ok(msgs.iter().map(link_of).collect())
}

/// Global addresses by interface index.
async fn addresses(handle: &Handle) -> Result<HashMap<u32, Vec<IpNet>>, rtnetlink::Error> {
    let mut by_link: HashMap<u32, Vec<IpNet>> = HashMap::new();
    let mut msgs = handle.address().get().execute();
    while let Some(msg) = msgs.try_next().await? {
        if let Some((index, net)) = address_of(&msg) {
            by_link.entry(index).or_default().push(net);
        }
    }
    Ok(by_link)
}

/// The links to wire, in ifindex order, with their addresses.
pub(crate) async fn pod_links(handle: &Handle) -> Result<Vec<PodLink>, rtnetlink::Error> {
    let mut addrs = addresses(handle).await?;
    let mut all = links(handle).await?;
    all.sort_by_key(|l| l.index);
    let mut pod = Vec::new();
    for link in all {
        let link_addrs = addrs.remove(&link.index).unwrap_or_default();
        if let Some(reason) = skip_reason(&link, &link_addrs) {
            tracing::debug!(link = %link.name, reason, "pod network: not wiring");
            continue;
        }
        pod.push(PodLink {
            index: link.index,
            name: link.name,
            mac: link.mac.expect("skip_reason checked the MAC"),
            mtu: link.mtu,
            addresses: link_addrs,
        });
    }
    Ok(pod)
}

/// The routes through `links` the guest needs, in the order to add them.
pub(crate) async fn pod_routes(
    handle: &Handle,
    links: &[PodLink],
) -> Result<Vec<PodRoute>, rtnetlink::Error> {
    let devices: HashMap<u32, String> = links.iter().map(|l| (l.index, l.name.clone())).collect();
    let mut routes = Vec::new();
    let queries = [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ];
    for query in queries {
        let mut msgs = handle.route().get(query).execute();
        while let Some(msg) = msgs.try_next().await? {
            match route_of(&msg, &devices) {
                Ok(route) => routes.push(route),
                Err(reason) => tracing::trace!(?msg, reason, "pod network: route left out"),
            }
        }
    }
    order_routes(&mut routes);
    Ok(routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::address::AddressHeaderFlags;

    fn devices() -> HashMap<u32, String> {
        HashMap::from([(2, "eth0".to_string())])
    }

    fn route(
        family: AddressFamily,
        dst: Option<(IpAddr, u8)>,
        attrs: Vec<RouteAttribute>,
    ) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.kind = RouteType::Unicast;
        msg.header.protocol = RouteProtocol::Boot;
        msg.header.scope = NlRouteScope::Universe;
        if let Some((addr, len)) = dst {
            msg.header.destination_prefix_length = len;
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::from(addr)));
        }
        msg.attributes.extend(attrs);
        msg
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn default_route_via_gateway() {
        let msg = route(
            AddressFamily::Inet,
            None,
            vec![
                RouteAttribute::Gateway(ip("10.77.0.1").into()),
                RouteAttribute::Oif(2),
                RouteAttribute::Table(254),
            ],
        );
        let r = route_of(&msg, &devices()).unwrap();
        assert_eq!(r, PodRoute::default_via(ip("10.77.0.1"), "eth0"));
        assert!(r.is_default());
    }

    #[test]
    fn link_scope_route_with_source_and_metric() {
        let mut msg = route(
            AddressFamily::Inet,
            Some((ip("169.254.1.1"), 32)),
            vec![
                RouteAttribute::Oif(2),
                RouteAttribute::PrefSource(ip("10.77.0.2").into()),
                RouteAttribute::Priority(100),
            ],
        );
        msg.header.scope = NlRouteScope::Link;
        let r = route_of(&msg, &devices()).unwrap();
        assert_eq!(
            r.destination,
            Some(IpNet {
                addr: ip("169.254.1.1"),
                prefix_len: 32
            })
        );
        assert_eq!(r.scope, RouteScope::Link);
        assert_eq!(r.source, Some(ip("10.77.0.2")));
        assert_eq!(r.metric, Some(100));
        assert_eq!(r.gateway, None);
    }

    #[test]
    fn ipv6_default_route() {
        let msg = route(
            AddressFamily::Inet6,
            None,
            vec![
                RouteAttribute::Gateway(ip("fe80::1").into()),
                RouteAttribute::Oif(2),
                RouteAttribute::Priority(1024),
            ],
        );
        let r = route_of(&msg, &devices()).unwrap();
        assert_eq!(r.family, IpFamily::V6);
        assert_eq!(r.gateway, Some(ip("fe80::1")));
    }

    #[test]
    fn routes_left_out() {
        let oif = || vec![RouteAttribute::Oif(2)];
        let mut kernel = route(AddressFamily::Inet, Some((ip("10.77.0.0"), 24)), oif());
        kernel.header.protocol = RouteProtocol::Kernel;
        let mut local_table = route(AddressFamily::Inet, Some((ip("10.77.0.2"), 32)), oif());
        local_table.header.table = 255;
        let mut big_table = route(AddressFamily::Inet, None, oif());
        big_table.attributes.push(RouteAttribute::Table(1000));
        let mut blackhole = route(AddressFamily::Inet, Some((ip("10.9.0.0"), 16)), vec![]);
        blackhole.header.kind = RouteType::BlackHole;
        let other_dev = route(AddressFamily::Inet, None, vec![RouteAttribute::Oif(9)]);
        let no_dev = route(AddressFamily::Inet, None, vec![]);
        let multipath = route(
            AddressFamily::Inet,
            None,
            vec![RouteAttribute::MultiPath(vec![])],
        );
        for (msg, why) in [
            (kernel, "kernel"),
            (local_table, "main table"),
            (big_table, "main table"),
            (blackhole, "unicast"),
            (other_dev, "pod interface"),
            (no_dev, "pod interface"),
            (multipath, "multipath"),
        ] {
            let reason = route_of(&msg, &devices()).unwrap_err();
            assert!(reason.contains(why), "{reason} for {msg:?}");
        }
    }

    #[test]
    fn routes_without_gateway_come_first() {
        let r = |dst: Option<&str>, gw: Option<&str>| PodRoute {
            family: IpFamily::V4,
            destination: dst.map(|d| IpNet {
                addr: ip(d),
                prefix_len: 32,
            }),
            gateway: gw.map(ip),
            device: "eth0".into(),
            source: None,
            scope: RouteScope::Universe,
            metric: None,
        };
        let mut routes = vec![
            r(None, Some("169.254.1.1")),
            r(Some("10.1.0.0"), Some("169.254.1.1")),
            r(Some("169.254.1.1"), None),
        ];
        order_routes(&mut routes);
        assert_eq!(routes[0].destination.unwrap().addr, ip("169.254.1.1"));
        assert!(routes[1].is_default());
        assert_eq!(routes[2].destination.unwrap().addr, ip("10.1.0.0"));
    }

    fn address(
        scope: AddressScope,
        attrs: Vec<AddressAttribute>,
        prefix_len: u8,
    ) -> AddressMessage {
        let mut msg = AddressMessage::default();
        msg.header.index = 2;
        msg.header.prefix_len = prefix_len;
        msg.header.scope = scope;
        msg.header.flags = AddressHeaderFlags::Permanent;
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn addresses_kept_and_left_out() {
        let v4 = address(
            AddressScope::Universe,
            vec![
                AddressAttribute::Address(ip("10.77.0.2")),
                AddressAttribute::Local(ip("10.77.0.2")),
            ],
            24,
        );
        assert_eq!(
            address_of(&v4),
            Some((
                2,
                IpNet {
                    addr: ip("10.77.0.2"),
                    prefix_len: 24
                }
            ))
        );
        // Point-to-point: IFA_LOCAL is ours, IFA_ADDRESS the peer's.
        let ptp = address(
            AddressScope::Universe,
            vec![
                AddressAttribute::Address(ip("10.0.0.1")),
                AddressAttribute::Local(ip("10.0.0.2")),
            ],
            32,
        );
        assert_eq!(address_of(&ptp).unwrap().1.addr, ip("10.0.0.2"));
        let v6 = address(
            AddressScope::Universe,
            vec![AddressAttribute::Address(ip("fd00::2"))],
            64,
        );
        assert_eq!(address_of(&v6).unwrap().1.prefix_len, 64);
        let link_local = address(
            AddressScope::Link,
            vec![AddressAttribute::Address(ip("fe80::1"))],
            64,
        );
        assert_eq!(address_of(&link_local), None);
        // Even if some tool marked it global, fe80::/10 stays out.
        let odd = address(
            AddressScope::Universe,
            vec![AddressAttribute::Address(ip("fe80::2"))],
            64,
        );
        assert_eq!(address_of(&odd), None);
        let host = address(
            AddressScope::Host,
            vec![AddressAttribute::Local(ip("127.0.0.1"))],
            8,
        );
        assert_eq!(address_of(&host), None);
    }

    fn link(name: &str, ll: LinkLayerType, flags: LinkFlags, mac: Option<Vec<u8>>) -> LinkMessage {
        let mut msg = LinkMessage::default();
        msg.header.index = 2;
        msg.header.link_layer_type = ll;
        msg.header.flags = flags;
        msg.attributes.push(LinkAttribute::IfName(name.into()));
        msg.attributes.push(LinkAttribute::Mtu(1450));
        if let Some(mac) = mac {
            msg.attributes.push(LinkAttribute::Address(mac));
        }
        msg
    }

    #[test]
    fn link_selection() {
        let mac = vec![0x02, 0x42, 0xac, 0x11, 0, 2];
        let addr = [IpNet {
            addr: ip("10.77.0.2"),
            prefix_len: 24,
        }];
        let eth0 = link_of(&link(
            "eth0",
            LinkLayerType::Ether,
            LinkFlags::Up,
            Some(mac.clone()),
        ));
        assert_eq!(eth0.name, "eth0");
        assert_eq!(eth0.mtu, 1450);
        assert_eq!(eth0.mac, Some(MacAddr([0x02, 0x42, 0xac, 0x11, 0, 2])));
        assert_eq!(skip_reason(&eth0, &addr), None);
        assert_eq!(skip_reason(&eth0, &[]), Some("no global address"));

        let lo = link_of(&link(
            "lo",
            LinkLayerType::Loopback,
            LinkFlags::Loopback | LinkFlags::Up,
            Some(vec![0; 6]),
        ));
        assert_eq!(skip_reason(&lo, &addr), Some("loopback"));
        let tap = link_of(&link(
            "tap0_bx",
            LinkLayerType::Ether,
            LinkFlags::Up,
            Some(mac),
        ));
        assert_eq!(skip_reason(&tap, &addr), Some("a BoxLite tap"));
        let tunl = link_of(&link(
            "tunl0",
            LinkLayerType::Tunnel,
            LinkFlags::empty(),
            Some(vec![0; 4]),
        ));
        assert_eq!(tunl.mac, None);
        assert_eq!(skip_reason(&tunl, &addr), Some("not an Ethernet interface"));
    }
}
