//! The checks of every request field, and the replies built back.

use super::*;

fn addr(family: Family, address: &str, prefix_len: u32) -> agent::IpAddress {
    agent::IpAddress {
        family: family.into(),
        address: address.into(),
        prefix_len,
        ..Default::default()
    }
}

fn iface_req(
    name: &str,
    mac: &str,
    addrs: Vec<agent::IpAddress>,
    mtu: u32,
) -> agent::UpdateInterfaceRequest {
    agent::UpdateInterfaceRequest {
        interface: Some(agent::Interface {
            name: name.into(),
            hw_addr: mac.into(),
            addresses: addrs,
            mtu,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

fn route(dest: &str, gateway: &str, device: &str, scope: u32, family: Family) -> agent::Route {
    agent::Route {
        dest: dest.into(),
        gateway: gateway.into(),
        device: device.into(),
        scope,
        family: family.into(),
        ..Default::default()
    }
}

fn routes_req(routes: Vec<agent::Route>) -> agent::UpdateRoutesRequest {
    agent::UpdateRoutesRequest {
        routes: Some(agent::Routes {
            routes,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

fn invalid_text(e: NetworkError) -> String {
    assert!(matches!(e, NetworkError::Invalid { .. }), "{e:?}");
    e.to_string()
}

#[test]
fn interface_by_mac_with_both_families() {
    let req = iface_req(
        "",
        "02:00:00:00:00:09",
        vec![
            addr(Family::V4, "10.88.0.5", 16),
            addr(Family::V6, "fd00:88::5", 64),
        ],
        1400,
    );
    let c = InterfaceConfig::validate(&req).unwrap();
    assert_eq!(
        c.link,
        LinkSelector {
            name: None,
            mac: "02:00:00:00:00:09".parse().ok()
        }
    );
    assert_eq!(
        c.addresses
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>(),
        ["10.88.0.5/16", "fd00:88::5/64"]
    );
    assert_eq!(c.mtu, Some(1400));
    let none = iface_req("eth0", "", vec![], 0);
    assert_eq!(InterfaceConfig::validate(&none).unwrap().mtu, None);
}

#[test]
fn a_current_mac_finds_the_link_and_hw_addr_becomes_its_new_one() {
    let mut req = iface_req("", "02:00:00:00:00:0a", vec![], 0);
    assert_eq!(InterfaceConfig::validate(&req).unwrap().new_mac, None);
    req.current_hw_addr = "02:00:00:00:00:09".into();
    let c = InterfaceConfig::validate(&req).unwrap();
    assert_eq!(c.link.mac, "02:00:00:00:00:09".parse().ok(), "found by it");
    assert_eq!(c.new_mac, "02:00:00:00:00:0a".parse().ok());

    req.current_hw_addr = "nope".into();
    assert_eq!(
        invalid_text(InterfaceConfig::validate(&req).unwrap_err()),
        "UpdateInterface: current_hw_addr \"nope\": not a MAC address like aa:bb:cc:dd:ee:ff"
    );
    let mut by_name = iface_req("eth0", "", vec![], 0);
    by_name.current_hw_addr = "02:00:00:00:00:09".into();
    assert_eq!(
        invalid_text(InterfaceConfig::validate(&by_name).unwrap_err()),
        "UpdateInterface: current_hw_addr \"02:00:00:00:00:09\": it needs interface.hw_addr, the \
         MAC to give the link"
    );
}

#[test]
fn interface_refusals_name_the_object() {
    let cases = [
        (
            iface_req("", "", vec![], 0),
            "UpdateInterface: interface: neither name nor hw_addr",
        ),
        (
            iface_req("", "02:00:00:00:00", vec![], 0),
            "hw_addr \"02:00:00:00:00\"",
        ),
        (
            iface_req("a/b", "", vec![], 0),
            "UpdateInterface: name: \"a/b\"",
        ),
        (
            iface_req("averyveryverylongname", "", vec![], 0),
            "not an interface name",
        ),
        (
            iface_req("eth0", "", vec![addr(Family::V4, "10.88.0.5", 99)], 0),
            "UpdateInterface: address 1: 10.88.0.5/99: prefix_len must be 1 to 32",
        ),
        (
            iface_req("eth0", "", vec![addr(Family::V6, "fd00::5", 129)], 0),
            "fd00::5/129: prefix_len must be 1 to 128",
        ),
        (
            iface_req("eth0", "", vec![addr(Family::V4, "10.88.0.5", 0)], 0),
            "prefix_len must be 1 to 32",
        ),
        (
            iface_req(
                "eth0",
                "",
                vec![
                    addr(Family::V4, "10.88.0.5", 16),
                    addr(Family::V4, "fd00::5", 64),
                ],
                0,
            ),
            "address 2: address fd00::5 is not V4",
        ),
        (
            iface_req("eth0", "", vec![addr(Family::V4, "10.88.0.5/16", 16)], 0),
            "\"10.88.0.5/16\" is not an IP address",
        ),
        (
            iface_req("eth0", "", vec![addr(Family::V4, "nonsense", 16)], 0),
            "\"nonsense\" is not an IP address",
        ),
        (
            iface_req("eth0", "", vec![addr(Family::V4, "224.0.0.1", 4)], 0),
            "224.0.0.1 is not a unicast",
        ),
        (
            iface_req("eth0", "", vec![addr(Family::V6, "::", 64)], 0),
            ":: is not a unicast",
        ),
        (iface_req("eth0", "", vec![], 40), "mtu 40: below 68"),
        (
            iface_req("eth0", "", vec![addr(Family::V6, "fd00::5", 64)], 1200),
            "mtu 1200: below 1280",
        ),
        (
            agent::UpdateInterfaceRequest::new(),
            "UpdateInterface: request: interface is missing",
        ),
    ];
    for (req, want) in cases {
        let text = invalid_text(InterfaceConfig::validate(&req).unwrap_err());
        assert!(text.contains(want), "{text:?} lacks {want:?}");
    }
    let mut unknown_family = addr(Family::V4, "10.0.0.1", 8);
    unknown_family.family = protobuf::EnumOrUnknown::from_i32(7);
    let text = invalid_text(
        InterfaceConfig::validate(&iface_req("eth0", "", vec![unknown_family], 0)).unwrap_err(),
    );
    assert!(text.contains("family 7"), "{text}");
}

#[test]
fn selector_matches_name_mac_or_both() {
    let mac = "02:00:00:00:00:09".parse().ok();
    let other = "02:00:00:00:00:0a".parse().ok();
    let by_mac = LinkSelector { name: None, mac };
    assert!(by_mac.matches("eth0", mac));
    assert!(!by_mac.matches("eth0", other));
    assert!(!by_mac.matches("lo", None));
    let both = LinkSelector {
        name: Some("eth0".into()),
        mac,
    };
    assert!(both.matches("eth0", mac));
    assert!(!both.matches("eth1", mac));
    assert!(!both.matches("eth0", other));
    assert_eq!(both.to_string(), "eth0 with MAC 02:00:00:00:00:09");
    assert_eq!(by_mac.to_string(), "with MAC 02:00:00:00:00:09");
}

#[test]
fn link_local_is_fe80_slash_10_only() {
    let cidr = |s: &str| Cidr {
        ip: s.parse().unwrap(),
        prefix_len: 64,
    };
    assert!(cidr("fe80::1").is_v6_link_local());
    assert!(cidr("febf::1").is_v6_link_local());
    assert!(!cidr("fec0::1").is_v6_link_local());
    assert!(!cidr("fd00::1").is_v6_link_local());
    assert!(!cidr("169.254.0.1").is_v6_link_local());
}

#[test]
fn routes_parse_default_on_link_and_host_routes() {
    let req = routes_req(vec![
        route("", "10.88.0.1", "eth0", 0, Family::V4),
        route("10.88.0.0/16", "", "eth0", 253, Family::V4),
        route("", "fd00:88::1", "", 0, Family::V6),
        route("192.168.1.7", "", "eth0", 253, Family::V4),
    ]);
    let r = validate_routes(&req).unwrap();
    let shown: Vec<_> = r.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        shown,
        [
            "default via 10.88.0.1 dev eth0 scope 0",
            "10.88.0.0/16 dev eth0 scope 253",
            "default via fd00:88::1 scope 0",
            "192.168.1.7/32 dev eth0 scope 253",
        ]
    );
    assert!(r[2].is_v6() && !r[0].is_v6());
    // On-link routes go first; request order is kept otherwise.
    let order: Vec<_> = add_order(&r).iter().map(|r| r.to_string()).collect();
    assert_eq!(order, [&*shown[1], &shown[3], &shown[0], &shown[2]]);
    assert!(validate_routes(&agent::UpdateRoutesRequest::new())
        .unwrap()
        .is_empty());
}

#[test]
fn route_source_is_checked_and_kept() {
    let mut r = route("10.0.0.0/8", "10.88.0.1", "eth0", 0, Family::V4);
    r.source = "10.88.0.5".into();
    let c = validate_routes(&routes_req(vec![r.clone()])).unwrap();
    assert_eq!(c[0].source, Some("10.88.0.5".parse().unwrap()));
    r.source = "fd00::5".into();
    let text = invalid_text(validate_routes(&routes_req(vec![r])).unwrap_err());
    assert!(text.contains("source fd00::5 is not V4"), "{text}");
}

#[test]
fn route_refusals_name_the_route() {
    let cases = [
        (
            route("10.88.0.5/16", "", "eth0", 253, Family::V4),
            "dest 10.88.0.5/16: address bits are set beyond the /16",
        ),
        (
            route("10.88.0.0/33", "", "eth0", 253, Family::V4),
            "prefix length must be 0 to 32",
        ),
        (
            route("10.88.0.0/+8", "", "eth0", 253, Family::V4),
            "prefix length must be 0 to 32",
        ),
        (
            route("fd00::/64", "", "eth0", 0, Family::V4),
            "dest fd00:: is not V4",
        ),
        (
            route("", "fd00::1", "eth0", 0, Family::V4),
            "gateway fd00::1 is not V4",
        ),
        (
            route("", "gateway", "eth0", 0, Family::V4),
            "gateway \"gateway\" is not an IP address",
        ),
        (
            route("10.0.0.0/8", "", "", 0, Family::V4),
            "needs a device, a gateway or both",
        ),
        (
            route("", "fe80::1", "", 0, Family::V6),
            "gateway fe80::1 is link-local: the route needs a device",
        ),
        (
            route("10.0.0.0/8", "", "eth/0", 0, Family::V4),
            "device: \"eth/0\"",
        ),
        (
            route("10.0.0.0/8", "", "eth0", 7, Family::V4),
            "scope 7 is not one of",
        ),
        (
            route("10.0.0.0/8", "", "eth0", 256 + 253, Family::V4),
            "scope 509 is not one of",
        ),
        (
            route("", "10.88.0.1", "eth0", 253, Family::V4),
            "scope 253 cannot have a gateway",
        ),
    ];
    for (r, want) in cases {
        let req = routes_req(vec![route("10.9.0.0/16", "", "eth0", 253, Family::V4), r]);
        let text = invalid_text(validate_routes(&req).unwrap_err());
        assert!(text.starts_with("UpdateRoutes: route 2: "), "{text}");
        assert!(text.contains(want), "{text:?} lacks {want:?}");
    }
}

#[test]
fn duplicate_destinations_are_refused() {
    let req = routes_req(vec![
        route("", "10.88.0.1", "eth0", 0, Family::V4),
        route("", "", "eth0", 0, Family::V6),
        route("0.0.0.0/0", "", "eth0", 0, Family::V4),
    ]);
    let text = invalid_text(validate_routes(&req).unwrap_err());
    assert_eq!(
        text,
        "UpdateRoutes: route 3: same destination as route 1 (0.0.0.0/0)"
    );
}

#[test]
fn host_bits() {
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(host_bits_clear(ip("10.88.0.0"), 16));
    assert!(!host_bits_clear(ip("10.88.0.1"), 16));
    assert!(host_bits_clear(ip("10.88.0.1"), 32));
    assert!(host_bits_clear(ip("0.0.0.0"), 0));
    assert!(!host_bits_clear(ip("fd00::1"), 64));
    assert!(host_bits_clear(ip("fd00::1"), 128));
    assert!(host_bits_clear(ip("::"), 0));
}

#[test]
fn link_state_reply() {
    let s = LinkState {
        name: "eth0".into(),
        mac: "02:00:00:00:00:09".parse().ok(),
        mtu: 1400,
        addresses: vec![Cidr {
            ip: "fd00:88::5".parse().unwrap(),
            prefix_len: 64,
        }],
    };
    let p = s.to_proto();
    assert_eq!(
        (p.name.as_str(), p.hw_addr.as_str(), p.mtu),
        ("eth0", "02:00:00:00:00:09", 1400)
    );
    assert_eq!(p.addresses.len(), 1);
    assert_eq!(p.addresses[0].family.enum_value(), Ok(Family::V6));
    assert_eq!(
        (p.addresses[0].address.as_str(), p.addresses[0].prefix_len),
        ("fd00:88::5", 64)
    );
}
