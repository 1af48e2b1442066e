//! What [`super::PodNetwork::wire`] found and built: the pod interfaces with
//! their taps, addresses and routes, in the form the VM and the guest need.

use std::fmt;
use std::net::IpAddr;
use std::os::fd::OwnedFd;

use super::{MacAddr, TapDevice};

/// A pod's network as wired to its VM.
#[derive(Debug)]
pub struct PodNetwork {
    /// The pod interfaces, in ifindex order; `interfaces[n]` is carried by
    /// the tap `tap<n>_bx`. Empty for a netns with nothing but `lo`.
    pub interfaces: Vec<WiredInterface>,
    /// The routes the guest needs to reproduce the pod's routing, in the
    /// order to add them (see [`super`] for which routes are kept).
    pub routes: Vec<PodRoute>,
}

impl PodNetwork {
    /// The taps' names: what a shim records so that [`super::teardown`] can
    /// clean up after it even if it crashes.
    pub fn tap_names(&self) -> Vec<String> {
        self.interfaces.iter().map(|i| i.tap_name.clone()).collect()
    }
}

/// A pod interface (e.g. `eth0` from the CNI) and the tap wired to it.
#[derive(Debug)]
pub struct WiredInterface {
    /// The pod interface's name, e.g. `eth0`; the guest NIC should get it.
    pub name: String,
    /// The pod interface's MAC. The guest NIC must use it: the pod's peers
    /// (bridge, gateway, other pods) have it in their ARP/NDP caches and
    /// the CNI may filter on it.
    pub mac: MacAddr,
    pub mtu: u32,
    /// Global addresses (no link-local ones), IPv4 then IPv6 as the kernel
    /// lists them.
    pub addresses: Vec<IpNet>,
    /// `tap<n>_bx`, in the pod's netns.
    pub tap_name: String,
    /// The tap's fd (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR). Take it with
    /// [`WiredInterface::take_tap`] for [`crate::Hypervisor::add_net`]; the
    /// kernel removes the tap when the last fd on it closes.
    pub tap_fd: Option<OwnedFd>,
}

impl WiredInterface {
    /// The tap fd as a [`TapDevice`], once.
    pub fn take_tap(&mut self) -> Option<TapDevice> {
        self.tap_fd.take().map(TapDevice::Fd)
    }
}

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IpFamily {
    V4,
    V6,
}

impl IpFamily {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => IpFamily::V4,
            IpAddr::V6(_) => IpFamily::V6,
        }
    }
}

/// An address with its prefix length: an interface address
/// (`10.77.0.2/24`) or a route destination (`10.96.0.0/12`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpNet {
    pub fn family(&self) -> IpFamily {
        IpFamily::of(&self.addr)
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// A route of the pod's main table, as the guest should add it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    pub family: IpFamily,
    /// `None` for a default route.
    pub destination: Option<IpNet>,
    pub gateway: Option<IpAddr>,
    /// The pod interface it leaves through (a [`WiredInterface::name`]).
    pub device: String,
    /// Preferred source address (`src` in `ip route`).
    pub source: Option<IpAddr>,
    pub scope: RouteScope,
    /// Route priority (`metric` in `ip route`), when the kernel reports one.
    pub metric: Option<u32>,
}

impl PodRoute {
    /// The default route of `gateway`'s family through `gateway` on pod
    /// interface `device`, with no source or metric (as a plain
    /// `default via <gateway> dev <device>`).
    pub fn default_via(gateway: IpAddr, device: &str) -> Self {
        PodRoute {
            family: IpFamily::of(&gateway),
            destination: None,
            gateway: Some(gateway),
            device: device.to_owned(),
            source: None,
            scope: RouteScope::Universe,
            metric: None,
        }
    }

    pub fn is_default(&self) -> bool {
        self.destination.is_none()
    }
}

/// How far a route's destination is (`scope` in `ip route`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteScope {
    /// `global`: reached through a gateway, or anywhere.
    Universe,
    /// `link`: directly on the device (e.g. Calico's `169.254.1.1 dev eth0`).
    Link,
    /// `host`: this host only.
    Host,
    /// Any other scope, by number (`site` is 200).
    Other(u8),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipnet_display_and_family() {
        let v4 = IpNet {
            addr: "10.77.0.2".parse().unwrap(),
            prefix_len: 24,
        };
        assert_eq!(v4.to_string(), "10.77.0.2/24");
        assert_eq!(v4.family(), IpFamily::V4);
        let v6 = IpNet {
            addr: "fd00::2".parse().unwrap(),
            prefix_len: 64,
        };
        assert_eq!(v6.to_string(), "fd00::2/64");
        assert_eq!(v6.family(), IpFamily::V6);
    }
}
