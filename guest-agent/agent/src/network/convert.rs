//! The pod-network requests checked into plain types, and the replies built
//! back. Pure functions: everything the host can get wrong is refused here,
//! before any netlink message is sent, so a bad request changes nothing.

use std::fmt;
use std::net::IpAddr;

use boxlite_protocol::agent::{self, ip_address::Family};
use boxlite_protocol::mac::MacAddr;

use super::NetworkError;

const UPDATE_INTERFACE: &str = "UpdateInterface";
const UPDATE_ROUTES: &str = "UpdateRoutes";

/// IPv4 needs at least 68 bytes (RFC 791); IPv6 at least 1280 (RFC 8200),
/// and the kernel disables IPv6 on a link whose MTU drops below that.
const MIN_MTU_V4: u32 = 68;
const MIN_MTU_V6: u32 = 1280;

/// rtnetlink route scopes the host may ask for (rtnetlink.h `rt_scope_t`).
const SCOPE_UNIVERSE: u8 = 0;
const SCOPE_SITE: u8 = 200;
const SCOPE_LINK: u8 = 253;
const SCOPE_HOST: u8 = 254;

/// An address with its prefix length, e.g. 10.88.0.5/16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub ip: IpAddr,
    pub prefix_len: u8,
}

impl Cidr {
    /// IPv6 link-local (fe80::/10): the kernel makes one per link and
    /// UpdateInterface leaves them alone.
    pub fn is_v6_link_local(&self) -> bool {
        matches!(self.ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
    }

    fn to_proto(self) -> agent::IpAddress {
        agent::IpAddress {
            family: family_of(self.ip).into(),
            address: self.ip.to_string(),
            prefix_len: self.prefix_len.into(),
            ..Default::default()
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.prefix_len)
    }
}

/// Which link UpdateInterface configures: by name, by MAC, or both must
/// match when both are given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkSelector {
    pub name: Option<String>,
    pub mac: Option<MacAddr>,
}

impl LinkSelector {
    pub fn matches(&self, name: &str, mac: Option<MacAddr>) -> bool {
        self.name.as_deref().is_none_or(|n| n == name) && self.mac.is_none_or(|m| Some(m) == mac)
    }
}

impl fmt::Display for LinkSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.name, self.mac) {
            (Some(n), Some(m)) => write!(f, "{n} with MAC {m}"),
            (Some(n), None) => write!(f, "named {n}"),
            (None, Some(m)) => write!(f, "with MAC {m}"),
            (None, None) => write!(f, "(any)"),
        }
    }
}

/// A checked UpdateInterface request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub link: LinkSelector,
    /// The MAC the link is given before anything else (the request's
    /// hw_addr when it found the link by `current_hw_addr`).
    pub new_mac: Option<MacAddr>,
    pub addresses: Vec<Cidr>,
    /// None leaves the MTU as it is (the request's 0).
    pub mtu: Option<u32>,
}

impl InterfaceConfig {
    pub fn validate(req: &agent::UpdateInterfaceRequest) -> Result<Self, NetworkError> {
        let Some(iface) = req.interface.as_ref() else {
            return Err(invalid(UPDATE_INTERFACE, "request", "interface is missing"));
        };
        let mut link = link_selector(iface)?;
        let new_mac = match req.current_hw_addr.as_str() {
            "" => None,
            current => {
                let Some(new) = link.mac else {
                    return Err(invalid(
                        UPDATE_INTERFACE,
                        format!("current_hw_addr {current:?}"),
                        "it needs interface.hw_addr, the MAC to give the link",
                    ));
                };
                link.mac = Some(parse_mac("current_hw_addr", current)?);
                Some(new)
            }
        };
        let addresses = iface
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| {
                ip_address(a).map_err(|reason| {
                    invalid(UPDATE_INTERFACE, format!("address {}", i + 1), reason)
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mtu = mtu(iface.mtu, &addresses)?;
        Ok(InterfaceConfig {
            link,
            new_mac,
            addresses,
            mtu,
        })
    }
}

fn link_selector(iface: &agent::Interface) -> Result<LinkSelector, NetworkError> {
    let name = match iface.name.as_str() {
        "" => None,
        n => Some(link_name(n).map_err(|r| invalid(UPDATE_INTERFACE, "name", r))?),
    };
    let mac = match iface.hw_addr.as_str() {
        "" => None,
        m => Some(parse_mac("hw_addr", m)?),
    };
    if name.is_none() && mac.is_none() {
        return Err(invalid(
            UPDATE_INTERFACE,
            "interface",
            "neither name nor hw_addr is set",
        ));
    }
    Ok(LinkSelector { name, mac })
}

fn parse_mac(field: &str, mac: &str) -> Result<MacAddr, NetworkError> {
    mac.parse::<MacAddr>().map_err(|_| {
        invalid(
            UPDATE_INTERFACE,
            format!("{field} {mac:?}"),
            "not a MAC address like aa:bb:cc:dd:ee:ff",
        )
    })
}

fn mtu(mtu: u32, addresses: &[Cidr]) -> Result<Option<u32>, NetworkError> {
    if mtu == 0 {
        return Ok(None);
    }
    let min = if addresses.iter().any(|a| a.ip.is_ipv6()) {
        MIN_MTU_V6
    } else {
        MIN_MTU_V4
    };
    if mtu < min {
        let why = format!("below {min}, the least the link's addresses need");
        return Err(invalid(UPDATE_INTERFACE, format!("mtu {mtu}"), why));
    }
    Ok(Some(mtu))
}

/// A Linux interface name: 1..=15 bytes, no '/', blanks or ':' (which
/// would make an alias), and not "." or "..".
fn link_name(name: &str) -> Result<String, String> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':');
    if ok {
        Ok(name.to_string())
    } else {
        Err(format!(
            "{:?} is not an interface name (1 to 15 printable bytes without '/' or ':')",
            name
        ))
    }
}

/// One IpAddress of an Interface: a plain address (no "/len"), its family
/// as declared, and a prefix length 1..=32 or 1..=128. 0 is refused because
/// it is also what an unset prefix_len reads as.
fn ip_address(a: &agent::IpAddress) -> Result<Cidr, String> {
    let family = family(a.family)?;
    let ip = plain_ip(&a.address, "address")?;
    check_family(ip, family, "address")?;
    if ip.is_multicast() || ip.is_unspecified() {
        return Err(format!("address {ip} is not a unicast address"));
    }
    let max = max_prefix(ip);
    let shown = format!("{}/{}", a.address, a.prefix_len);
    match u8::try_from(a.prefix_len) {
        Ok(len) if (1..=max).contains(&len) => Ok(Cidr {
            ip,
            prefix_len: len,
        }),
        _ => Err(format!("{shown}: prefix_len must be 1 to {max}")),
    }
}

/// A checked Route of UpdateRoutes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// 0.0.0.0/0 or ::/0 for the default route.
    pub dest: Cidr,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
    /// Preferred source address (`ip route … src`).
    pub source: Option<IpAddr>,
    pub scope: u8,
}

impl RouteConfig {
    pub fn is_v6(&self) -> bool {
        self.dest.ip.is_ipv6()
    }
}

/// `ip route` syntax, for messages and logs.
impl fmt::Display for RouteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.dest.prefix_len == 0 {
            write!(f, "default")?;
        } else {
            write!(f, "{}", self.dest)?;
        }
        if let Some(gw) = self.gateway {
            write!(f, " via {gw}")?;
        }
        if let Some(dev) = &self.device {
            write!(f, " dev {dev}")?;
        }
        if let Some(src) = self.source {
            write!(f, " src {src}")?;
        }
        write!(f, " scope {}", self.scope)
    }
}

/// The routes of an UpdateRoutes request, checked, in request order.
pub fn validate_routes(req: &agent::UpdateRoutesRequest) -> Result<Vec<RouteConfig>, NetworkError> {
    let routes = req
        .routes
        .as_ref()
        .map(|r| r.routes.as_slice())
        .unwrap_or(&[]);
    let checked = routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            route(r).map_err(|reason| invalid(UPDATE_ROUTES, format!("route {}", i + 1), reason))
        })
        .collect::<Result<Vec<_>, _>>()?;
    no_duplicates(&checked)?;
    Ok(checked)
}

fn route(r: &agent::Route) -> Result<RouteConfig, String> {
    let family = family(r.family)?;
    let dest = route_dest(&r.dest, family)?;
    let gateway = optional_ip(&r.gateway, family, "gateway")?;
    let source = optional_ip(&r.source, family, "source")?;
    let device = match r.device.as_str() {
        "" => None,
        d => Some(link_name(d).map_err(|e| format!("device: {e}"))?),
    };
    if device.is_none() && gateway.is_none() {
        return Err("needs a device, a gateway or both".into());
    }
    // A link-local address means something only on one link.
    if let (Some(gw @ IpAddr::V6(_)), None) = (gateway, &device) {
        let gw_cidr = Cidr {
            ip: gw,
            prefix_len: 128,
        };
        if gw_cidr.is_v6_link_local() {
            return Err(format!(
                "gateway {gw} is link-local: the route needs a device"
            ));
        }
    }
    let scope = route_scope(r.scope)?;
    if gateway.is_some() && scope >= SCOPE_LINK {
        return Err(format!(
            "scope {scope} cannot have a gateway (only 0 universe or 200 site can)"
        ));
    }
    Ok(RouteConfig {
        dest,
        gateway,
        device,
        source,
        scope,
    })
}

/// Empty: the default route of `family`. Otherwise CIDR with the host
/// bits clear (the kernel refuses 10.88.0.5/16); a bare address is a host
/// route, as with `ip route`.
fn route_dest(dest: &str, family: Family) -> Result<Cidr, String> {
    if dest.is_empty() {
        let ip = match family {
            Family::V4 => IpAddr::from([0u8; 4]),
            Family::V6 => IpAddr::from([0u8; 16]),
        };
        return Ok(Cidr { ip, prefix_len: 0 });
    }
    let (addr, len) = match dest.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (dest, None),
    };
    let ip = plain_ip(addr, "dest")?;
    check_family(ip, family, "dest")?;
    let max = max_prefix(ip);
    let prefix_len = match len {
        None => max,
        Some(l) => match l.parse::<u8>() {
            Ok(n) if n <= max && !l.starts_with('+') => n,
            _ => return Err(format!("dest {dest:?}: prefix length must be 0 to {max}")),
        },
    };
    if !host_bits_clear(ip, prefix_len) {
        return Err(format!(
            "dest {dest}: address bits are set beyond the /{prefix_len} prefix"
        ));
    }
    Ok(Cidr { ip, prefix_len })
}

fn host_bits_clear(ip: IpAddr, prefix_len: u8) -> bool {
    let (bits, width) = match ip {
        IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32u32),
        IpAddr::V6(v6) => (u128::from(v6), 128u32),
    };
    let host_bits = width - u32::from(prefix_len);
    // 1 << 128 overflows: a /0 IPv6 prefix has every bit as host bit.
    let mask = 1u128.checked_shl(host_bits).map_or(u128::MAX, |b| b - 1);
    bits & mask == 0
}

fn route_scope(scope: u32) -> Result<u8, String> {
    match u8::try_from(scope) {
        Ok(s @ (SCOPE_UNIVERSE | SCOPE_SITE | SCOPE_LINK | SCOPE_HOST)) => Ok(s),
        _ => Err(format!(
            "scope {scope} is not one of 0 (universe), 200 (site), 253 (link), 254 (host)"
        )),
    }
}

/// Two routes to the same destination would make the second one replace
/// or fail on the first: refuse that rather than guess.
fn no_duplicates(routes: &[RouteConfig]) -> Result<(), NetworkError> {
    for (i, r) in routes.iter().enumerate() {
        if let Some(j) = routes[..i].iter().position(|p| p.dest == r.dest) {
            return Err(invalid(
                UPDATE_ROUTES,
                format!("route {}", i + 1),
                format!("same destination as route {} ({})", j + 1, r.dest),
            ));
        }
    }
    Ok(())
}

/// The order to add routes in: those without a gateway first, since a
/// route via a gateway needs a route that reaches the gateway.
pub fn add_order(routes: &[RouteConfig]) -> Vec<&RouteConfig> {
    let (direct, via): (Vec<_>, Vec<_>) = routes.iter().partition(|r| r.gateway.is_none());
    direct.into_iter().chain(via).collect()
}

fn family(f: protobuf::EnumOrUnknown<Family>) -> Result<Family, String> {
    f.enum_value()
        .map_err(|v| format!("family {v} is neither V4 (0) nor V6 (1)"))
}

fn family_of(ip: IpAddr) -> Family {
    if ip.is_ipv4() {
        Family::V4
    } else {
        Family::V6
    }
}

fn check_family(ip: IpAddr, family: Family, what: &str) -> Result<(), String> {
    if family_of(ip) == family {
        Ok(())
    } else {
        Err(format!("{what} {ip} is not {family:?} as the family says"))
    }
}

fn plain_ip(s: &str, what: &str) -> Result<IpAddr, String> {
    s.parse()
        .map_err(|_| format!("{what} {s:?} is not an IP address"))
}

fn optional_ip(s: &str, family: Family, what: &str) -> Result<Option<IpAddr>, String> {
    if s.is_empty() {
        return Ok(None);
    }
    let ip = plain_ip(s, what)?;
    check_family(ip, family, what)?;
    Ok(Some(ip))
}

fn max_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

fn invalid(
    rpc: &'static str,
    object: impl Into<String>,
    reason: impl Into<String>,
) -> NetworkError {
    NetworkError::Invalid {
        rpc,
        object: object.into(),
        reason: reason.into(),
    }
}

/// What a link looks like after UpdateInterface, for the reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkState {
    pub name: String,
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    pub addresses: Vec<Cidr>,
}

impl LinkState {
    pub fn to_proto(&self) -> agent::Interface {
        agent::Interface {
            name: self.name.clone(),
            hw_addr: self.mac.map(|m| m.to_string()).unwrap_or_default(),
            addresses: self.addresses.iter().map(|a| a.to_proto()).collect(),
            mtu: self.mtu,
            ..Default::default()
        }
    }
}

#[cfg(test)]
#[path = "convert_tests.rs"]
mod tests;
