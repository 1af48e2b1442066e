//! The tc plumbing of the tcfilter model: an ingress qdisc on each side and
//! a match-all u32 filter whose mirred action redirects every frame to the
//! other side's egress.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::tc::{
    TcActionAttribute, TcActionMirrorOption, TcActionOption, TcAttribute, TcFilterU32Option,
    TcHandle, TcMessage, TcOption,
};
use rtnetlink::Handle;

/// `ffff:`, the handle of every ingress qdisc (and the parent of its filters).
const INGRESS_HANDLE: u32 = 0xffff_0000;

/// tc matches the filter protocol against `skb->protocol`, which is in
/// network byte order, so "all" is ETH_P_ALL big-endian (what `tc ...
/// protocol all` sends). rtnetlink writes the field as given.
const PROTOCOL_ALL: u16 = (libc::ETH_P_ALL as u16).to_be();

/// `tc qdisc add dev <ifindex> handle ffff: ingress`.
pub(crate) async fn add_ingress_qdisc(
    handle: &Handle,
    ifindex: u32,
) -> Result<(), rtnetlink::Error> {
    handle.qdisc().add(ifindex as i32).ingress().execute().await
}

/// `tc qdisc del dev <ifindex> ingress`; the qdisc's filters go with it.
pub(crate) async fn del_ingress_qdisc(
    handle: &Handle,
    ifindex: u32,
) -> Result<(), rtnetlink::Error> {
    let mut req = handle.qdisc().del(ifindex as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = INGRESS_HANDLE.into();
    req.execute().await
}

/// `tc filter add dev <from> parent ffff: protocol all u32 match u8 0 0
/// action mirred egress redirect dev <to>`: every frame arriving on `from`
/// leaves through `to`, and the stack of `from`'s netns never sees it.
pub(crate) async fn add_redirect(
    handle: &Handle,
    from: u32,
    to: u32,
) -> Result<(), rtnetlink::Error> {
    handle
        .traffic_filter(from as i32)
        .add()
        .parent(INGRESS_HANDLE)
        .protocol(PROTOCOL_ALL)
        .redirect(to)?
        .execute()
        .await
}

/// Whether `ifindex` has an ingress qdisc.
pub(crate) async fn has_ingress_qdisc(
    handle: &Handle,
    ifindex: u32,
) -> Result<bool, rtnetlink::Error> {
    let mut qdiscs = handle.qdisc().get().index(ifindex as i32).execute();
    while let Some(q) = qdiscs.try_next().await? {
        if q.header.index == ifindex as i32 && is_ingress_qdisc(&q) {
            return Ok(true);
        }
    }
    Ok(false)
}

fn is_ingress_qdisc(q: &TcMessage) -> bool {
    q.header.parent == TcHandle::INGRESS
        && q.attributes
            .iter()
            .any(|a| matches!(a, TcAttribute::Kind(k) if k == "ingress"))
}

/// The ifindexes the ingress filters of `ifindex` redirect or mirror to
/// (0 for a target that has been deleted since).
pub(crate) async fn ingress_mirred_targets(
    handle: &Handle,
    ifindex: u32,
) -> Result<Vec<u32>, rtnetlink::Error> {
    let mut filters = handle
        .traffic_filter(ifindex as i32)
        .get()
        .ingress()
        .execute();
    let mut targets = Vec::new();
    while let Some(f) = filters.try_next().await? {
        targets.extend(mirred_targets(&f));
    }
    Ok(targets)
}

/// The mirred targets of one u32 filter message.
fn mirred_targets(filter: &TcMessage) -> Vec<u32> {
    let u32_options = filter.attributes.iter().filter_map(|a| match a {
        TcAttribute::Options(opts) => Some(opts),
        _ => None,
    });
    let actions = u32_options.flatten().filter_map(|o| match o {
        TcOption::U32(TcFilterU32Option::Action(actions)) => Some(actions),
        _ => None,
    });
    let action_options = actions
        .flatten()
        .flat_map(|a| &a.attributes)
        .filter_map(|a| match a {
            TcActionAttribute::Options(opts) => Some(opts),
            _ => None,
        });
    action_options
        .flatten()
        .filter_map(|o| match o {
            TcActionOption::Mirror(TcActionMirrorOption::Parms(m)) => Some(m.ifindex),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtnetlink::packet_route::tc::{TcAction, TcActionMirror, TcMirror, TcMirrorActionType};

    #[test]
    fn protocol_all_is_network_order() {
        assert_eq!(PROTOCOL_ALL.to_ne_bytes(), [0x00, 0x03]);
    }

    fn mirred_filter(ifindex: u32) -> TcMessage {
        let mut mirror = TcMirror::default();
        mirror.eaction = TcMirrorActionType::EgressRedir;
        mirror.ifindex = ifindex;
        let mut action = TcAction::default();
        action.attributes = vec![
            TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
            TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
                mirror,
            ))]),
        ];
        let mut msg = TcMessage::default();
        msg.attributes = vec![
            TcAttribute::Kind("u32".into()),
            TcAttribute::Options(vec![TcOption::U32(TcFilterU32Option::Action(vec![action]))]),
        ];
        msg
    }

    #[test]
    fn finds_mirred_targets() {
        assert_eq!(mirred_targets(&mirred_filter(7)), vec![7]);
        assert_eq!(mirred_targets(&mirred_filter(0)), vec![0]);
        // The hash-table entries a u32 dump starts with carry no action.
        let mut header_only = TcMessage::default();
        header_only.attributes = vec![TcAttribute::Kind("u32".into())];
        assert!(mirred_targets(&header_only).is_empty());
    }

    #[test]
    fn recognises_ingress_qdisc() {
        let mut q = TcMessage::default();
        q.header.parent = TcHandle::INGRESS;
        q.attributes = vec![TcAttribute::Kind("ingress".into())];
        assert!(is_ingress_qdisc(&q));
        q.attributes = vec![TcAttribute::Kind("clsact".into())];
        assert!(!is_ingress_qdisc(&q));
    }
}
