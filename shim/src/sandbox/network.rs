//! The pod's network: which network namespace the booting container's spec
//! names, wiring it to the VM (boxlite_runtime::network: a tap per pod
//! interface, tc mirred both ways), and configuring the guest's NICs
//! like the pod's interfaces (same MAC, addresses, MTU, routes).
//!
//! Only the container that boots the VM (the pod sandbox under CRI, the
//! container itself under `ctr run`) decides the network. Pod members name
//! the sandbox's namespaces by `/proc/<pid>/ns/...` with the guest pid the
//! shim reported, which are valid paths inside the guest, so their specs go
//! to the agent unchanged.

use std::path::{Path, PathBuf};

use boxlite_protocol::agent::{ip_address::Family, Interface, IpAddress, Route};
use boxlite_runtime::network::{
    IpFamily, MacAddr, PodNetwork, PodRoute, RouteScope, WiredInterface,
};
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::agent_client::GuestAgent;
use crate::error::{Result, ShimError};

/// What the booting container's spec says about the network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodNetns {
    /// No network namespace at all: the host's network. A VM has its own
    /// network stack and cannot share the host's.
    Host,
    /// A new, empty namespace (`ctr run` without `--with-ns`): the VM gets
    /// no NIC and the container only `lo`, as under runc.
    NewEmpty,
    /// An existing namespace set up by CNI (CRI, `ctr run --with-ns`):
    /// wired to the VM.
    Path(PathBuf),
}

/// Reads the network namespace entry of `spec`.
pub fn pod_netns(spec: &Spec) -> PodNetns {
    let entry = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| ns.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    match entry {
        None => PodNetns::Host,
        Some(n) => match n.path() {
            Some(p) if !p.as_os_str().is_empty() => PodNetns::Path(p.clone()),
            _ => PodNetns::NewEmpty,
        },
    }
}

/// The refusal of a host-network pod.
pub fn host_network_refused(sandbox_id: &str) -> ShimError {
    ShimError::InvalidArgument(format!(
        "sandbox {sandbox_id:?}: the spec has no network namespace, i.e. it asks for the \
         host's network; a VM cannot share the host's network stack. Give the pod its own \
         network namespace (hostNetwork: false), or run it with runc"
    ))
}

/// The booting container joins the VM's network (which is the pod's): the
/// host path of the pod's namespace means nothing inside the guest, so its
/// entry goes from the spec the agent gets.
pub fn drop_network_namespace(spec: &mut Spec) {
    let Some(mut linux) = spec.linux().clone() else {
        return;
    };
    if let Some(ns) = linux.namespaces().clone() {
        let kept: Vec<_> = ns
            .into_iter()
            .filter(|n| n.typ() != LinuxNamespaceType::Network)
            .collect();
        linux.set_namespaces(Some(kept));
    }
    spec.set_linux(Some(linux));
}

/// What a sandbox records to tear its network down, even after a crash.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetworkRecord {
    pub netns: PathBuf,
    pub taps: Vec<String>,
    /// The shim made this namespace (a bind-mounted file in the sandbox
    /// directory, see [`super::netns_holder`]) and removes it too.
    #[serde(default)]
    pub owned: bool,
}

impl NetworkRecord {
    pub fn of(netns: &Path, net: &PodNetwork, owned: bool) -> Self {
        Self {
            netns: netns.to_owned(),
            taps: net.tap_names(),
            owned,
        }
    }

    /// Removes the taps and tc filters, and the namespace if the shim made
    /// it; logs what fails (the sandbox is going away either way).
    pub async fn teardown(&self, sandbox_id: &str) {
        if let Err(e) = boxlite_runtime::network::teardown(&self.netns, &self.taps).await {
            tracing::error!(
                sandbox_id,
                netns = %self.netns.display(),
                error = %boxlite_protocol::error_chain::chain(&e),
                "pod network teardown failed"
            );
        }
        if self.owned {
            super::netns_holder::remove_owned_netns(&self.netns);
        }
    }
}

/// Gives the guest the pod's interfaces (matched by MAC) and routes.
/// `guest_macs`: the MACs the guest's NICs have now when they are not the
/// pod's (a VM restored from a template has the template's, in device
/// order, the pod's interfaces' order); the agent gives each the pod's.
pub async fn configure_guest(
    sandbox_id: &str,
    agent: &GuestAgent,
    net: &PodNetwork,
    guest_macs: Option<&[MacAddr]>,
) -> Result<()> {
    let mut guest_names = Vec::new();
    for (i, iface) in net.interfaces.iter().enumerate() {
        let object = format!(
            "interface {} ({}) of sandbox {sandbox_id:?}",
            iface.name, iface.mac
        );
        let current = match guest_macs {
            None => None,
            Some(macs) => Some(macs.get(i).ok_or_else(|| {
                ShimError::Internal(format!(
                    "{object}: the restored VM has {} NICs, the pod {}",
                    macs.len(),
                    net.interfaces.len()
                ))
            })?),
        };
        let configured = agent
            .update_interface(
                object,
                interface_request(iface),
                current.map(|m| m.to_string()),
            )
            .await?;
        guest_names.push((iface.name.clone(), configured.name));
    }
    if net.routes.is_empty() {
        return Ok(());
    }
    let routes = net
        .routes
        .iter()
        .map(|r| route_request(r, &guest_names))
        .collect::<Result<Vec<_>>>()?;
    agent.update_routes(sandbox_id, routes).await
}

fn family(f: IpFamily) -> Family {
    match f {
        IpFamily::V4 => Family::V4,
        IpFamily::V6 => Family::V6,
    }
}

/// The guest NIC with this MAC gets the pod interface's addresses and MTU;
/// the name is left to the guest (its kernel names NICs in probe order).
fn interface_request(iface: &WiredInterface) -> Interface {
    Interface {
        name: String::new(),
        hw_addr: iface.mac.to_string(),
        addresses: iface
            .addresses
            .iter()
            .map(|a| IpAddress {
                family: family(a.family()).into(),
                address: a.addr.to_string(),
                prefix_len: a.prefix_len.into(),
                ..Default::default()
            })
            .collect(),
        mtu: iface.mtu,
        ..Default::default()
    }
}

/// A pod route for the guest, its device renamed to the guest NIC's name.
fn route_request(r: &PodRoute, guest_names: &[(String, String)]) -> Result<Route> {
    let device = guest_names
        .iter()
        .find(|(pod, _)| *pod == r.device)
        .map(|(_, guest)| guest.clone())
        .ok_or_else(|| {
            ShimError::Internal(format!(
                "route {:?} leaves through {:?}, which is not a wired interface",
                r.destination, r.device
            ))
        })?;
    Ok(Route {
        dest: r.destination.map(|d| d.to_string()).unwrap_or_default(),
        gateway: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
        device,
        source: r.source.map(|s| s.to_string()).unwrap_or_default(),
        scope: match r.scope {
            RouteScope::Universe => 0,
            RouteScope::Link => 253,
            RouteScope::Host => 254,
            RouteScope::Other(n) => n.into(),
        },
        family: family(r.family).into(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_runtime::network::IpNet;
    use oci_spec::runtime::{LinuxBuilder, LinuxNamespaceBuilder, SpecBuilder};

    fn spec_with(ns: Vec<(LinuxNamespaceType, Option<&str>)>) -> Spec {
        let namespaces = ns
            .into_iter()
            .map(|(typ, path)| {
                let mut b = LinuxNamespaceBuilder::default().typ(typ);
                if let Some(p) = path {
                    b = b.path(p);
                }
                b.build().unwrap()
            })
            .collect::<Vec<_>>();
        SpecBuilder::default()
            .linux(
                LinuxBuilder::default()
                    .namespaces(namespaces)
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    }

    #[test]
    fn reads_the_network_namespace_entry() {
        let cri = spec_with(vec![
            (LinuxNamespaceType::Pid, None),
            (LinuxNamespaceType::Network, Some("/var/run/netns/cni-1")),
        ]);
        assert_eq!(
            pod_netns(&cri),
            PodNetns::Path("/var/run/netns/cni-1".into())
        );
        let ctr = spec_with(vec![(LinuxNamespaceType::Network, None)]);
        assert_eq!(pod_netns(&ctr), PodNetns::NewEmpty);
        let host = spec_with(vec![(LinuxNamespaceType::Pid, None)]);
        assert_eq!(pod_netns(&host), PodNetns::Host);
        assert!(host_network_refused("p1")
            .to_string()
            .contains("a VM cannot share the host's network stack"));
    }

    #[test]
    fn the_booting_container_loses_only_its_network_entry() {
        let mut spec = spec_with(vec![
            (LinuxNamespaceType::Pid, None),
            (LinuxNamespaceType::Network, Some("/var/run/netns/cni-1")),
            (LinuxNamespaceType::Ipc, None),
        ]);
        drop_network_namespace(&mut spec);
        let kinds: Vec<_> = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert_eq!(kinds, [LinuxNamespaceType::Pid, LinuxNamespaceType::Ipc]);
    }

    #[test]
    fn routes_name_the_guest_nic_and_keep_their_parts() {
        let names = vec![("eth0".to_string(), "eth1".to_string())];
        let default = PodRoute::default_via("10.1.0.1".parse().unwrap(), "eth0");
        let r = route_request(&default, &names).unwrap();
        assert_eq!(
            (
                r.dest.as_str(),
                r.gateway.as_str(),
                r.device.as_str(),
                r.scope
            ),
            ("", "10.1.0.1", "eth1", 0)
        );
        let on_link = PodRoute {
            family: IpFamily::V6,
            destination: Some(IpNet {
                addr: "fd00::".parse().unwrap(),
                prefix_len: 64,
            }),
            gateway: None,
            device: "eth0".into(),
            source: Some("fd00::5".parse().unwrap()),
            scope: RouteScope::Link,
            metric: None,
        };
        let r = route_request(&on_link, &names).unwrap();
        assert_eq!(
            (r.dest.as_str(), r.source.as_str(), r.scope),
            ("fd00::/64", "fd00::5", 253)
        );
        assert_eq!(r.family.enum_value_or_default(), Family::V6);
        let elsewhere = PodRoute {
            device: "eth9".into(),
            ..default
        };
        assert!(route_request(&elsewhere, &names).is_err());
    }
}
