//! The guest's boundary as a container sees it: no container reaches the
//! guest agent's vsock ports (docs/security.md). The agent accepts the
//! host's CID only; without that, a container could open AF_VSOCK sockets
//! to the loopback CID or the guest's own CID and drive the agent API
//! (start a privileged container, read other containers' stdio).
//!
//! The probe is a Python script (`tests/boundary/agent_ports.py`) run in
//! the Debian image of the runc differential suite
//! (`boxlite_tests::debian_image`, cached; the first run builds it).
//!
//! `#[ignore]`d: root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock,
//! mmdebstrap (for the first image build) and the guest assets.

use boxlite_tests::containerd::{text, Containerd, RUNTIME};
use boxlite_tests::debian_image::{debian_image_archive, DEBIAN_IMAGE};

const AGENT_PORTS_PROBE: &str = include_str!("boundary/agent_ports.py");

/// What the probe may report for a try: the connection was not made, or
/// the peer closed it without a byte.
fn refused(outcome: &str) -> bool {
    outcome == "closed" || outcome == "connect-timeout" || outcome.starts_with("connect-error:")
}

/// Runs the probe in a new container with `opts` and returns its lines.
fn probe_agent_ports(c: &Containerd, id: &str, opts: &[&str]) -> Vec<String> {
    let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[DEBIAN_IMAGE, id, "python3", "-c", AGENT_PORTS_PROBE]);
    let out = c.ctr(&args);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "probe in {id}: {stdout}{}",
        text(&out.stderr)
    );
    stdout.lines().map(str::to_owned).collect()
}

#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock, mmdebstrap and the guest assets"]
fn containers_cannot_reach_the_agent() {
    let c = Containerd::start();
    let archive = debian_image_archive();
    let out = c.ctr(&["image", "import", archive.to_str().unwrap()]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));

    // An ordinary container, and a privileged one (all capabilities and
    // devices, but its own namespaces: not the guest's root).
    for (id, opts) in [("plain1", &[][..]), ("priv1", &["--privileged"][..])] {
        let lines = probe_agent_ports(&c, id, opts);
        assert_eq!(lines.len(), 9, "{id}: every CID × port tried: {lines:?}");
        let reached: Vec<&String> = lines
            .iter()
            .filter(|l| !refused(l.rsplit(' ').next().unwrap_or("")))
            .collect();
        assert!(
            reached.is_empty(),
            "{id}: a container reached the agent: {reached:?} (all tries: {lines:?})"
        );
    }
    c.assert_ran_on_the_test_backend();
    c.assert_nothing_left();
}
