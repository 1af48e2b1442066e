//! UpdateInterface and UpdateRoutes against the real kernel: the host-mode
//! agent runs inside a throwaway network namespace (`ip netns add`) holding
//! a veth link with a known MAC, and the tests compare what `ip -j` shows
//! there with what was asked. Only these tests shell out to `ip`; the agent
//! itself speaks rtnetlink.
//!
//! A veth (its peer in the same namespace) stands in for the guest's
//! virtio-net link: like it, it has carrier, and unlike `dummy` it needs no
//! module that minimal kernels leave out.
//!
//! They need root (netns, links): every test is `#[ignore = "needs root
//! …"]`, run as root with `--ignored --test-threads=1` (the second phase of
//! scripts/test.sh).

mod common;

use std::process::Command;
use std::time::Duration;

use boxlite_protocol::agent::ip_address::Family;
use boxlite_protocol::agent::{
    Interface, IpAddress, Route, Routes, UpdateInterfaceRequest, UpdateRoutesRequest,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::health::CheckRequest;
use boxlite_protocol::health_ttrpc::HealthClient;
use boxlite_test_support::netns as support;
use common::{connect_when_serving, status};
use serde_json::Value;
use ttrpc::context::{self, Context};
use ttrpc::Code;

const MAC: &str = "02:00:00:00:00:09";
const LINK: &str = "eth0";
const PEER: &str = "peer0";

/// A network namespace (boxlite-test-support's, deleted on drop, also when
/// a test panics) holding the veth this file checks.
struct Netns(support::Netns);

impl Netns {
    fn create() -> Netns {
        let ns = Netns(support::Netns::add(""));
        // Created down, without addresses: the agent has to do the rest.
        ns.0.ip(&[
            "link", "add", LINK, "address", MAC, "type", "veth", "peer", "name", PEER,
        ]);
        ns.0.ip(&["link", "set", PEER, "up"]);
        ns
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["-j"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.0.ip(&all)).expect("ip -j prints JSON")
    }

    /// `ip -j addr show dev eth0`: the one link object.
    fn link(&self) -> Value {
        self.json(&["addr", "show", "dev", LINK])[0].clone()
    }

    /// "addr/len" of every address of eth0 but the IPv6 link-local ones.
    fn addresses(&self) -> Vec<String> {
        let link = self.link();
        let mut out: Vec<String> = link["addr_info"]
            .as_array()
            .expect("addr_info")
            .iter()
            .filter(|a| a["scope"] != "link" || a["family"] != "inet6")
            .map(|a| format!("{}/{}", str_of(&a["local"]), a["prefixlen"]))
            .collect();
        out.sort();
        out
    }

    /// The main table of one family as "dst [via gw] dev [proto]" lines,
    /// sorted; `proto` only when the kernel made the route.
    fn routes(&self, family: &str) -> Vec<String> {
        let table = self.json(&[family, "route", "show", "table", "main"]);
        let mut out: Vec<String> = table
            .as_array()
            .expect("routes")
            .iter()
            .map(|r| {
                let mut line = str_of(&r["dst"]);
                if let Some(gw) = r["gateway"].as_str() {
                    line += &format!(" via {gw}");
                }
                line += &format!(" dev {}", str_of(&r["dev"]));
                if r["protocol"] == "kernel" {
                    line += " kernel";
                }
                line
            })
            .collect();
        out.sort();
        out
    }
}

fn str_of(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("not a string: {v}"))
        .to_string()
}

/// The host-mode agent running inside a [`Netns`]. Field order matters:
/// the agent is killed (in `drop`) before the namespace goes.
struct Agent {
    agent: common::Agent,
    ns: Netns,
}

impl Agent {
    fn start() -> Agent {
        let ns = Netns::create();
        let mut ip = Command::new("ip");
        ip.args(["netns", "exec", &ns.0.name])
            .arg(common::AGENT_BINARY);
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = common::Agent::spawn(dir, ip, &[], &[]);
        Agent { agent, ns }
    }

    async fn connect(&self) -> (HealthClient, AgentClient) {
        let timeout = Duration::from_secs(10);
        let stderr = || self.agent.stderr();
        connect_when_serving(&self.agent.socket(), timeout, ctx, stderr).await
    }
}

fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(10).as_nanos() as i64)
}

fn addr(address: &str, prefix_len: u32) -> IpAddress {
    let family = if address.contains(':') {
        Family::V6
    } else {
        Family::V4
    };
    IpAddress {
        family: family.into(),
        address: address.into(),
        prefix_len,
        ..Default::default()
    }
}

fn iface(name: &str, mac: &str, addresses: Vec<IpAddress>, mtu: u32) -> UpdateInterfaceRequest {
    UpdateInterfaceRequest {
        interface: Some(Interface {
            name: name.into(),
            hw_addr: mac.into(),
            addresses,
            mtu,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

fn route(dest: &str, gateway: &str, device: &str, scope: u32) -> Route {
    let v6 = dest.contains(':') || gateway.contains(':');
    Route {
        dest: dest.into(),
        gateway: gateway.into(),
        device: device.into(),
        scope,
        family: if v6 { Family::V6 } else { Family::V4 }.into(),
        ..Default::default()
    }
}

fn routes(list: Vec<Route>) -> UpdateRoutesRequest {
    UpdateRoutesRequest {
        routes: Some(Routes {
            routes: list,
            ..Default::default()
        })
        .into(),
        ..Default::default()
    }
}

/// Addresses of a reply as sorted "addr/len".
fn reply_addresses(i: &Interface) -> Vec<String> {
    let mut out: Vec<String> = i
        .addresses
        .iter()
        .map(|a| {
            let v6 = a.family.enum_value() == Ok(Family::V6);
            assert_eq!(v6, a.address.contains(':'), "family of {}", a.address);
            format!("{}/{}", a.address, a.prefix_len)
        })
        .collect();
    out.sort();
    out
}

/// eth0 at 10.88.0.5/16 and fd00:88::5/64, found by MAC.
async fn configure(client: &AgentClient) -> Interface {
    let req = iface(
        "",
        MAC,
        vec![addr("10.88.0.5", 16), addr("fd00:88::5", 64)],
        1400,
    );
    client
        .update_interface(ctx(), &req)
        .await
        .expect("UpdateInterface")
}

#[tokio::test]
#[ignore = "needs root (network namespaces and links)"]
async fn a_link_found_by_its_current_mac_gets_the_new_one_first() {
    // A VM restored from a template: its link has the template's MAC, the
    // pod's is another.
    const POD_MAC: &str = "02:00:00:00:00:0a";
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let mut req = iface("", POD_MAC, vec![addr("10.88.0.6", 16)], 0);
    req.current_hw_addr = MAC.into();
    let reply = client
        .update_interface(ctx(), &req)
        .await
        .expect("UpdateInterface by the current MAC");
    assert_eq!(
        (reply.name.as_str(), reply.hw_addr.as_str()),
        (LINK, POD_MAC)
    );
    let link = agent.ns.link();
    assert_eq!(link["address"], POD_MAC, "{link}");
    assert_eq!(link["operstate"], "UP", "{link}");
    assert_eq!(agent.ns.addresses(), ["10.88.0.6/16"]);

    // Again, as a retry would: the link already has the pod's MAC and is
    // no longer found by the template's.
    let (code, msg) = status(client.update_interface(ctx(), &req).await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    // By the pod's MAC it is.
    let reply = client
        .update_interface(ctx(), &iface("", POD_MAC, vec![addr("10.88.0.6", 16)], 0))
        .await
        .expect("by the new MAC");
    assert_eq!(reply.hw_addr, POD_MAC);
}

#[tokio::test]
#[ignore = "needs root (network namespaces and links)"]
async fn update_interface_by_mac_sets_addresses_mtu_and_up_then_replaces_them() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    assert_eq!(agent.ns.addresses(), Vec::<String>::new());

    // Upper case on purpose: MACs match in either case.
    let req = iface(
        "",
        &MAC.to_uppercase(),
        vec![addr("10.88.0.5", 16), addr("fd00:88::5", 64)],
        1400,
    );
    let reply = client
        .update_interface(ctx(), &req)
        .await
        .expect("UpdateInterface");
    assert_eq!(
        (reply.name.as_str(), reply.hw_addr.as_str(), reply.mtu),
        (LINK, MAC, 1400)
    );
    assert_eq!(reply_addresses(&reply), ["10.88.0.5/16", "fd00:88::5/64"]);
    let link = agent.ns.link();
    assert_eq!(link["mtu"], 1400, "{link}");
    assert_eq!(link["operstate"], "UP", "{link}");
    assert!(
        link["flags"].as_array().unwrap().iter().any(|f| f == "UP"),
        "{link}"
    );
    assert_eq!(agent.ns.addresses(), ["10.88.0.5/16", "fd00:88::5/64"]);

    // A second call replaces the set: 10.88.0.5 stays, the rest changes;
    // mtu 0 leaves the MTU alone. By name this time.
    let req = iface(
        LINK,
        "",
        vec![
            addr("10.88.0.5", 16),
            addr("10.89.0.7", 24),
            addr("fd00:89::7", 64),
        ],
        0,
    );
    let reply = client
        .update_interface(ctx(), &req)
        .await
        .expect("second UpdateInterface");
    assert_eq!(
        reply_addresses(&reply),
        ["10.88.0.5/16", "10.89.0.7/24", "fd00:89::7/64"]
    );
    assert_eq!(reply.mtu, 1400);
    assert_eq!(
        agent.ns.addresses(),
        ["10.88.0.5/16", "10.89.0.7/24", "fd00:89::7/64"]
    );
    assert_eq!(agent.ns.link()["mtu"], 1400);
    // The kernel's IPv6 link-local address was left alone.
    let kept = agent.ns.link()["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["family"] == "inet6" && a["scope"] == "link");
    assert!(kept, "{}", agent.ns.link());

    // Both MAC and name given: both must match.
    let req = iface(LINK, MAC, vec![addr("10.88.0.5", 16)], 0);
    let reply = client
        .update_interface(ctx(), &req)
        .await
        .expect("by name and MAC");
    assert_eq!(reply_addresses(&reply), ["10.88.0.5/16"]);
    assert_eq!(agent.ns.addresses(), ["10.88.0.5/16"]);
}

#[tokio::test]
#[ignore = "needs root (network namespaces and links)"]
async fn update_routes_replaces_the_main_table_and_keeps_kernel_routes() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    configure(&client).await;
    // A route someone else added: UpdateRoutes replaces it.
    agent.ns.0.ip(&[
        "route",
        "add",
        "10.77.0.0/16",
        "dev",
        LINK,
        "proto",
        "static",
    ]);

    // The default route first: the agent must add the on-link one before.
    let req = routes(vec![
        route("", "10.88.0.1", LINK, 0),
        route("10.99.0.0/16", "", LINK, 253),
        route("", "fd00:88::1", LINK, 0),
    ]);
    let reply = client
        .update_routes(ctx(), &req)
        .await
        .expect("UpdateRoutes");
    assert_eq!(reply.routes, req.routes.routes);
    assert_eq!(
        agent.ns.routes("-4"),
        [
            "10.88.0.0/16 dev eth0 kernel",
            "10.99.0.0/16 dev eth0",
            "default via 10.88.0.1 dev eth0",
        ]
    );
    let scope = agent.ns.json(&["route", "show", "10.99.0.0/16"]);
    assert_eq!(scope[0]["scope"], "link", "{scope}");
    assert_eq!(
        agent.ns.routes("-6"),
        [
            "default via fd00:88::1 dev eth0",
            "fd00:88::/64 dev eth0 kernel",
            "fe80::/64 dev eth0 kernel",
            "fe80::/64 dev peer0 kernel",
        ]
    );

    // Again, with a gateway only an on-link host route reaches (given
    // after it) and the kernel's connected route asked for explicitly:
    // the old routes go, the kernel's route stays the kernel's.
    let req = routes(vec![
        route("", "169.254.1.1", LINK, 0),
        route("169.254.1.1/32", "", LINK, 253),
        route("10.88.0.0/16", "", LINK, 253),
    ]);
    client
        .update_routes(ctx(), &req)
        .await
        .expect("second UpdateRoutes");
    assert_eq!(
        agent.ns.routes("-4"),
        [
            "10.88.0.0/16 dev eth0 kernel",
            "169.254.1.1 dev eth0",
            "default via 169.254.1.1 dev eth0",
        ]
    );
    assert_eq!(
        agent.ns.routes("-6"),
        [
            "fd00:88::/64 dev eth0 kernel",
            "fe80::/64 dev eth0 kernel",
            "fe80::/64 dev peer0 kernel",
        ]
    );

    // No routes: only the kernel's are left.
    client
        .update_routes(ctx(), &routes(vec![]))
        .await
        .expect("empty UpdateRoutes");
    assert_eq!(agent.ns.routes("-4"), ["10.88.0.0/16 dev eth0 kernel"]);
}

#[tokio::test]
#[ignore = "needs root (network namespaces and links)"]
async fn bad_requests_name_the_problem_change_nothing_and_the_agent_keeps_serving() {
    let agent = Agent::start();
    let (health, client) = agent.connect().await;
    configure(&client).await;
    client
        .update_routes(ctx(), &routes(vec![route("", "10.88.0.1", LINK, 0)]))
        .await
        .expect("UpdateRoutes");
    let addresses = agent.ns.addresses();
    let table = agent.ns.routes("-4");

    let cases: Vec<(ttrpc::Result<String>, Code, Vec<&str>)> = vec![
        (
            client
                .update_interface(ctx(), &iface("", "02:00:00:00:00:0a", vec![], 0))
                .await
                .map(|i| i.name),
            Code::NOT_FOUND,
            vec![
                "UpdateInterface: no link with MAC 02:00:00:00:00:0a",
                "lo",
                "eth0",
                "peer0",
            ],
        ),
        (
            client
                .update_interface(ctx(), &iface("eth9", "", vec![], 0))
                .await
                .map(|i| i.name),
            Code::NOT_FOUND,
            vec!["no link named eth9"],
        ),
        (
            client
                .update_interface(ctx(), &iface("", MAC, vec![addr("10.88.0.5", 99)], 0))
                .await
                .map(|i| i.name),
            Code::INVALID_ARGUMENT,
            vec!["10.88.0.5/99", "prefix_len"],
        ),
        (
            client
                .update_interface(ctx(), &iface("", "02:00:00:00:00", vec![], 0))
                .await
                .map(|i| i.name),
            Code::INVALID_ARGUMENT,
            vec!["hw_addr \"02:00:00:00:00\""],
        ),
        (
            client
                .update_interface(ctx(), &iface(LINK, "", vec![addr("fd00::5", 64)], 1000))
                .await
                .map(|i| i.name),
            Code::INVALID_ARGUMENT,
            vec!["mtu 1000"],
        ),
        (
            client
                .update_routes(ctx(), &routes(vec![route("10.5.0.0/16", "", "eth9", 253)]))
                .await
                .map(|r| format!("{r:?}")),
            Code::INVALID_ARGUMENT,
            vec!["UpdateRoutes", "no link named eth9", "lo, peer0, eth0"],
        ),
        (
            client
                .update_routes(ctx(), &routes(vec![route("10.5.0.1/16", "", LINK, 253)]))
                .await
                .map(|r| format!("{r:?}")),
            Code::INVALID_ARGUMENT,
            vec!["route 1", "10.5.0.1/16"],
        ),
    ];
    for (result, code, words) in cases {
        let (got, msg) = status(result);
        assert_eq!(got, code, "{msg}");
        for w in words {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
        // Still serving, and nothing changed.
        health
            .check(ctx(), &CheckRequest::new())
            .await
            .expect("health after error");
        assert_eq!(agent.ns.addresses(), addresses);
        assert_eq!(agent.ns.routes("-4"), table);
    }

    // The kernel refusing (no route reaches this gateway) is INTERNAL with
    // the kernel's words.
    let (code, msg) = status(
        client
            .update_routes(ctx(), &routes(vec![route("", "192.0.2.1", LINK, 0)]))
            .await,
    );
    assert_eq!(code, Code::INTERNAL, "{msg}");
    assert!(
        msg.contains("add route default via 192.0.2.1 dev eth0")
            && msg.contains("Network is unreachable"),
        "{msg}"
    );
    health
        .check(ctx(), &CheckRequest::new())
        .await
        .expect("health after error");
    // A good request still works afterwards.
    client
        .update_routes(ctx(), &routes(vec![route("", "10.88.0.1", LINK, 0)]))
        .await
        .expect("UpdateRoutes after errors");
    assert_eq!(agent.ns.routes("-4"), table);
}
