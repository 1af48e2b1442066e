//! Links and their addresses: finding a link by name or MAC, its MTU,
//! up state and address set.

use futures::TryStreamExt;
use rtnetlink::packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use rtnetlink::packet_route::link::{LinkAttribute, LinkMessage};
use rtnetlink::LinkUnspec;

use boxlite_protocol::mac::MacAddr;

use super::convert::{Cidr, InterfaceConfig, LinkState};
use super::{Netlink, NetworkError};

/// What the RPCs need to know of a link.
#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mac: Option<MacAddr>,
    pub mtu: u32,
    /// The device's MTU range, when the kernel reports it.
    pub mtu_range: Option<(u32, u32)>,
}

impl Link {
    fn from_message(msg: &LinkMessage) -> Link {
        let mut link = Link {
            index: msg.header.index,
            name: String::new(),
            mac: None,
            mtu: 0,
            mtu_range: None,
        };
        let (mut min, mut max) = (None, None);
        for attr in &msg.attributes {
            match attr {
                LinkAttribute::IfName(n) => link.name = n.clone(),
                // Only a 6-byte link-layer address is a MAC.
                LinkAttribute::Address(a) => {
                    link.mac = <[u8; 6]>::try_from(&a[..]).ok().map(MacAddr)
                }
                LinkAttribute::Mtu(m) => link.mtu = *m,
                LinkAttribute::MinMtu(m) => min = Some(*m),
                LinkAttribute::MaxMtu(m) => max = Some(*m),
                _ => {}
            }
        }
        // A max of 0 means the driver sets no limit.
        link.mtu_range = min.zip(max).filter(|(_, max)| *max > 0);
        link
    }
}

/// Every link, in index order, to find one by name or MAC and to list
/// them in errors.
pub async fn links(nl: &Netlink) -> Result<Vec<Link>, NetworkError> {
    let msgs: Vec<LinkMessage> = nl
        .handle
        .link()
        .get()
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl.failed("list links", e))?;
    Ok(msgs.iter().map(Link::from_message).collect())
}

/// "lo, eth0" for error messages.
pub fn names(links: &[Link]) -> String {
    let names: Vec<_> = links.iter().map(|l| l.name.as_str()).collect();
    names.join(", ")
}

/// Sets the MTU (if asked), replaces the addresses, brings the link up and
/// reads it back. Addresses that stay are replaced in place rather than
/// removed and re-added, so their connected routes and the sockets bound
/// to them survive a repeated call.
pub async fn update_interface(
    nl: &Netlink,
    cfg: &InterfaceConfig,
) -> Result<LinkState, NetworkError> {
    let all = links(nl).await?;
    let Some(link) = all.iter().find(|l| cfg.link.matches(&l.name, l.mac)) else {
        return Err(NetworkError::NoLink {
            rpc: nl.rpc,
            selector: cfg.link.to_string(),
            links: names(&all),
        });
    };
    if let Some(mac) = cfg.new_mac.filter(|m| link.mac != Some(*m)) {
        set_mac(nl, link, mac).await?;
    }
    if let Some(mtu) = cfg.mtu {
        set_mtu(nl, link, mtu).await?;
    }
    replace_addresses(nl, link, &cfg.addresses).await?;
    set_up(nl, link).await?;
    read_back(nl, link.index, &cfg.addresses).await
}

/// Gives the link another MAC: down first (not every driver changes it
/// live; `update_interface` brings the link up again after).
async fn set_mac(nl: &Netlink, link: &Link, mac: MacAddr) -> Result<(), NetworkError> {
    let down = LinkUnspec::new_with_index(link.index).down().build();
    change_link(nl, down, || format!("set {} down", link.name)).await?;
    let msg = LinkUnspec::new_with_index(link.index)
        .address(mac.0.to_vec())
        .build();
    change_link(nl, msg, || format!("set MAC {mac} on {}", link.name)).await?;
    tracing::info!(link = %link.name, old = ?link.mac, new = %mac, "link MAC changed");
    Ok(())
}

async fn set_mtu(nl: &Netlink, link: &Link, mtu: u32) -> Result<(), NetworkError> {
    if let Some((min, max)) = link.mtu_range.filter(|(min, max)| mtu < *min || mtu > *max) {
        return Err(NetworkError::Invalid {
            rpc: nl.rpc,
            object: format!("mtu {mtu}"),
            reason: format!("{} takes {min} to {max}", link.name),
        });
    }
    let msg = LinkUnspec::new_with_index(link.index).mtu(mtu).build();
    change_link(nl, msg, || format!("set mtu {mtu} on {}", link.name)).await
}

async fn set_up(nl: &Netlink, link: &Link) -> Result<(), NetworkError> {
    let msg = LinkUnspec::new_with_index(link.index).up().build();
    change_link(nl, msg, || format!("bring {} up", link.name)).await
}

/// One RTM_SETLINK; a failure says `what` was being done.
async fn change_link(
    nl: &Netlink,
    msg: LinkMessage,
    what: impl FnOnce() -> String,
) -> Result<(), NetworkError> {
    nl.handle
        .link()
        .change(msg)
        .execute()
        .await
        .map_err(|e| nl.failed(what(), e))
}

/// The address messages of one link, both families.
async fn address_messages(nl: &Netlink, link: &Link) -> Result<Vec<AddressMessage>, NetworkError> {
    nl.handle
        .address()
        .get()
        .set_link_index_filter(link.index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl.failed(format!("list the addresses of {}", link.name), e))
}

/// The address of an address message: IFA_LOCAL when present (for IPv4 on
/// a point-to-point link IFA_ADDRESS is the peer), else IFA_ADDRESS.
pub fn cidr_of(msg: &AddressMessage) -> Option<Cidr> {
    let mut address = None;
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => {
                return Some(Cidr {
                    ip: *ip,
                    prefix_len: msg.header.prefix_len,
                })
            }
            AddressAttribute::Address(ip) => address = Some(*ip),
            _ => {}
        }
    }
    address.map(|ip| Cidr {
        ip,
        prefix_len: msg.header.prefix_len,
    })
}

/// Removes every address not asked for (IPv6 link-local ones excepted:
/// the kernel owns them and IPv6 needs them), then adds or updates the
/// asked ones. Removal comes first so that an unwanted IPv4 primary taking
/// its secondaries with it cannot remove an address just added.
async fn replace_addresses(nl: &Netlink, link: &Link, wanted: &[Cidr]) -> Result<(), NetworkError> {
    for msg in address_messages(nl, link).await? {
        let Some(cidr) = cidr_of(&msg) else { continue };
        if wanted.contains(&cidr) || cidr.is_v6_link_local() {
            continue;
        }
        match nl.handle.address().del(msg).execute().await {
            Ok(()) => tracing::info!(link = %link.name, address = %cidr, "address removed"),
            // Already gone with a deleted primary.
            Err(rtnetlink::Error::NetlinkError(m)) if m.raw_code() == -libc::EADDRNOTAVAIL => {}
            Err(e) => return Err(nl.failed(format!("remove address {cidr} from {}", link.name), e)),
        }
    }
    for cidr in wanted {
        add_address(nl, link, cidr).await?;
    }
    Ok(())
}

/// Adds `cidr`, or updates it if present. IPv6 addresses skip duplicate
/// address detection: the pod's addresses are unique by allocation, and
/// DAD would leave them unusable ("tentative") for a second or more after
/// the reply, when containers may already bind them.
async fn add_address(nl: &Netlink, link: &Link, cidr: &Cidr) -> Result<(), NetworkError> {
    let mut req = nl
        .handle
        .address()
        .add(link.index, cidr.ip, cidr.prefix_len)
        .replace();
    if cidr.ip.is_ipv6() {
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
    }
    req.execute()
        .await
        .map_err(|e| nl.failed(format!("add address {cidr} to {}", link.name), e))?;
    tracing::info!(link = %link.name, address = %cidr, "address set");
    Ok(())
}

/// The link as it is now. Kernel-made IPv6 link-local addresses are left
/// out unless they were asked for, so the reply shows what was configured.
async fn read_back(nl: &Netlink, index: u32, asked: &[Cidr]) -> Result<LinkState, NetworkError> {
    let msgs: Vec<LinkMessage> = nl
        .handle
        .link()
        .get()
        .match_index(index)
        .execute()
        .try_collect()
        .await
        .map_err(|e| nl.failed(format!("read back link {index}"), e))?;
    let Some(link) = msgs.first().map(Link::from_message) else {
        return Err(NetworkError::NoLink {
            rpc: nl.rpc,
            selector: format!("with index {index} (it went away)"),
            links: names(&links(nl).await?),
        });
    };
    let addresses = address_messages(nl, &link)
        .await?
        .iter()
        .filter_map(cidr_of)
        .filter(|c| !c.is_v6_link_local() || asked.contains(c))
        .collect();
    Ok(LinkState {
        name: link.name,
        mac: link.mac,
        mtu: link.mtu,
        addresses,
    })
}
