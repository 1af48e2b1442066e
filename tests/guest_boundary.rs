//! The guest's boundary as a container sees it: no container reaches the
//! guest agent's vsock ports, and a guest cannot swap the share's paths
//! under the shim (docs/security.md). The agent accepts the
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

/// A guest that swaps the share's path components in a loop, from a
/// privileged container that mounts the share itself: `mv` of every
/// directory the shim made or mounts on (`<cid>`, `<cid>/rootfs`,
/// `<cid>/volumes/<n>`) with a symlink to `/` planted in its place, and new
/// entries at the top. Meanwhile 50 containers are created in the same
/// sandbox. The guest's view of the share is read-only where the shim
/// works (docs/security.md, "The share"), so every swap is refused, every
/// create succeeds, and nothing appears or is mounted outside the sandbox
/// directory.
const SWAPPER: &str = r#"
bb=/bin/busybox
$bb mkdir -p /s
$bb mount -t virtiofs shared /s || { echo mount-failed > /out/result; exit 1; }
echo ready > /out/ready
moved=0 refused=0
while [ ! -e /out/stop ]; do
  for e in /s/* /s/*/* /s/*/volumes/*; do
    [ -e "$e" ] || continue
    case "$e" in *.swapped) continue ;; esac
    if $bb mv "$e" "$e.swapped" 2>/dev/null; then
      moved=$((moved+1)); $bb ln -s / "$e" 2>/dev/null
    else
      refused=$((refused+1))
    fi
  done
  $bb mkdir /s/planted 2>/dev/null && moved=$((moved+1))
  $bb ln -s /etc /s/evil 2>/dev/null && moved=$((moved+1))
done
echo "moved=$moved refused=$refused" > /out/result
"#;

#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn a_guest_swapping_share_paths_cannot_steer_50_creates() {
    use std::time::{Duration, Instant};
    let c = Containerd::with_image();
    let state = c.state_dir();
    let outside = || -> Vec<std::path::PathBuf> {
        boxlite_tests::containerd::mounts_under(std::path::Path::new("/"))
            .into_iter()
            .filter(|m| !m.starts_with(&state))
            .collect()
    };
    let mounts_before = outside();
    let out = tempfile::tempdir().unwrap();
    let volume = format!(
        "type=bind,src={},dst=/out,options=rbind:rw",
        out.path().display()
    );
    c.run_detached_cmd(
        &["--privileged", "--mount", &volume],
        "swapper",
        &["/bin/sh", "-c", SWAPPER],
    );
    let until = Instant::now() + Duration::from_secs(60);
    while !out.path().join("ready").exists() {
        let result = std::fs::read_to_string(out.path().join("result")).unwrap_or_default();
        assert!(result.is_empty(), "the swapper did not start: {result}");
        assert!(
            Instant::now() < until,
            "the swapper never mounted the share"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for i in 0..50 {
        let id = format!("member{i}");
        let out = c.run_rm(
            &[
                "--annotation",
                "io.kubernetes.cri.sandbox-id=swapper",
                "--annotation",
                "io.kubernetes.cri.container-type=container",
            ],
            &id,
            &["cat", "/etc/passwd"],
        );
        assert!(
            out.status.success() && text(&out.stdout).starts_with("root:x:0:0"),
            "{id}: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    std::fs::write(out.path().join("stop"), "").unwrap();
    let until = Instant::now() + Duration::from_secs(60);
    let result = loop {
        let r = std::fs::read_to_string(out.path().join("result")).unwrap_or_default();
        if !r.is_empty() {
            break r;
        }
        assert!(Instant::now() < until, "the swapper never reported");
        std::thread::sleep(Duration::from_millis(200));
    };
    let counts: Vec<u64> = result
        .split_whitespace()
        .filter_map(|kv| kv.split_once('=')?.1.parse().ok())
        .collect();
    assert_eq!(counts.len(), 2, "{result}");
    assert_eq!(
        counts[0], 0,
        "the guest moved a path of the share: {result}"
    );
    assert!(counts[1] > 50, "the swapper hardly tried: {result}");
    assert_eq!(outside(), mounts_before, "mounts outside the sandbox dirs");
    c.kill_and_delete("swapper");
    c.assert_nothing_left();
}
