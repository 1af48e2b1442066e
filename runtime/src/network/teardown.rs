//! Teardown, run on the netns thread: the pod interfaces' ingress qdiscs
//! (with their redirect filters) and the taps.

use std::collections::{HashMap, HashSet};

use super::error::{netlink_errno, Ctx, NetworkError};
use super::inspect::{self, Link};
use super::tap::is_tap_name;
use super::tc;
use super::wire::connect;

/// Undoes a wiring of the current netns; see [`super::teardown`].
pub(crate) async fn teardown_here(ctx: Ctx, tap_names: Vec<String>) -> Result<(), NetworkError> {
    let handle = connect(&ctx)?;
    let links = inspect::links(&handle)
        .await
        .map_err(|e| ctx.error(None, "list the links", e))?;
    let taps: HashMap<u32, &str> = links
        .iter()
        .filter(|l| tap_names.contains(&l.name))
        .map(|l| (l.index, l.name.as_str()))
        .collect();
    let present: HashSet<u32> = links.iter().map(|l| l.index).collect();

    for link in links.iter().filter(|l| is_pod_side(l, &taps)) {
        let ours = redirects_to_ours(&handle, link, &taps, &present)
            .await
            .map_err(|e| {
                ctx.error(
                    Some(&link.name),
                    format!("list the ingress filters of {}", link.name),
                    e,
                )
            })?;
        if ours {
            remove_ingress(&handle, link.index).await.map_err(|e| {
                ctx.error(
                    Some(&link.name),
                    format!("remove the ingress qdisc of {}", link.name),
                    e,
                )
            })?;
        }
    }
    for (&index, &name) in &taps {
        delete_link(&handle, index)
            .await
            .map_err(|e| ctx.error(Some(name), format!("delete tap {name}"), e))?;
    }
    Ok(())
}

/// A link that may carry one end of our redirects: not loopback, not a tap.
fn is_pod_side(link: &Link, taps: &HashMap<u32, &str>) -> bool {
    !link.loopback && !taps.contains_key(&link.index) && !is_tap_name(&link.name)
}

/// Whether `link`'s ingress qdisc is ours: one of its filters redirects to
/// a tap being torn down, or to a device that no longer exists (its tap
/// went away when the VMM closed the last fd on it, and the kernel now
/// reports the target as ifindex 0). Nothing else in a pod's netns
/// redirects ingress traffic, and an ingress qdisc somebody else added is
/// left alone.
async fn redirects_to_ours(
    handle: &rtnetlink::Handle,
    link: &Link,
    taps: &HashMap<u32, &str>,
    present: &HashSet<u32>,
) -> Result<bool, rtnetlink::Error> {
    if !tc::has_ingress_qdisc(handle, link.index).await? {
        return Ok(false);
    }
    let targets = tc::ingress_mirred_targets(handle, link.index).await?;
    Ok(targets
        .iter()
        .any(|t| taps.contains_key(t) || !present.contains(t)))
}

/// Removes the ingress qdisc of `index`; gone already is fine (a second
/// teardown racing this one).
async fn remove_ingress(handle: &rtnetlink::Handle, index: u32) -> Result<(), rtnetlink::Error> {
    match tc::del_ingress_qdisc(handle, index).await {
        Err(e)
            if matches!(
                netlink_errno(&e),
                Some(libc::ENOENT | libc::EINVAL | libc::ENODEV)
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Deletes link `index`; gone already is fine (a non-persistent tap
/// disappears when its last fd closes).
async fn delete_link(handle: &rtnetlink::Handle, index: u32) -> Result<(), rtnetlink::Error> {
    match handle.link().del(index).execute().await {
        Err(e) if netlink_errno(&e) == Some(libc::ENODEV) => Ok(()),
        other => other,
    }
}
