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

/// Tries to move `path` aside and plant a symlink to `/` in its place, as
/// a guest would through virtiofsd (which serves the share as root, so a
/// host process working on the guest's view of the share can do what any
/// FUSE request can, and more). True if the move succeeded.
fn swap(path: &std::path::Path) -> bool {
    let aside = path.with_extension("swapped");
    if std::fs::rename(path, &aside).is_err() {
        return false;
    }
    let _ = std::os::unix::fs::symlink("/", path);
    true
}

/// Every path a swapping guest would go for in the guest's view of the
/// share: `<cid>`, `<cid>/*` and `<cid>/volumes/*`.
fn share_paths(shared: &std::path::Path) -> Vec<std::path::PathBuf> {
    let list = |d: &std::path::Path| -> Vec<std::path::PathBuf> {
        std::fs::read_dir(d)
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let mut paths = Vec::new();
    for cid in list(shared) {
        for entry in list(&cid) {
            paths.extend(
                list(&entry)
                    .into_iter()
                    .filter(|_| entry.ends_with("volumes")),
            );
            paths.push(entry);
        }
        paths.push(cid);
    }
    paths
}

/// A guest that swaps the share's path components in a loop (through the
/// guest's view, `<sandbox>/shared/`, as virtiofsd would on its requests:
/// moving every `<cid>`, `<cid>/*` and `<cid>/volumes/*` aside for a
/// symlink to `/`, and planting new top-level entries) while 50 containers
/// are created in the same sandbox. The shim mounts in `mounts/`, and the
/// guest's view is read-only where the shim works (docs/security.md, "The
/// share"), so every swap is refused, every create succeeds, and no mount
/// appears outside the sandbox directories.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn a_guest_swapping_share_paths_cannot_steer_50_creates() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let c = Containerd::with_image();
    let state = c.state_dir();
    let outside = || -> Vec<std::path::PathBuf> {
        boxlite_tests::containerd::mounts_under(std::path::Path::new("/"))
            .into_iter()
            .filter(|m| !m.starts_with(&state))
            .collect()
    };
    let mounts_before = outside();
    c.run_detached(&[], "swapper");
    let shared = state.join("swapper").join("shared");
    assert!(shared.is_dir(), "no share at {}", shared.display());
    let stop = Arc::new(AtomicBool::new(false));
    let (moved, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let swapper = {
        let (stop, moved, refused, shared) =
            (stop.clone(), moved.clone(), refused.clone(), shared.clone());
        std::thread::spawn(move || {
            let mut what = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for path in share_paths(&shared) {
                    if swap(&path) {
                        moved.fetch_add(1, Ordering::Relaxed);
                        what.push(path);
                    } else {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for planted in [shared.join("planted"), shared.join("swapper/planted")] {
                    if std::fs::create_dir(&planted).is_ok() {
                        moved.fetch_add(1, Ordering::Relaxed);
                        what.push(planted);
                    }
                }
            }
            what
        })
    };
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
    stop.store(true, Ordering::Relaxed);
    let what = swapper.join().expect("swapper thread");
    let (moved, refused) = (
        moved.load(Ordering::Relaxed),
        refused.load(Ordering::Relaxed),
    );
    assert_eq!(moved, 0, "the guest's view let these change: {what:?}");
    assert!(refused > 50, "the swapper hardly tried: {refused} tries");
    assert_eq!(outside(), mounts_before, "mounts outside the sandbox dirs");
    c.kill_and_delete("swapper");
    c.assert_nothing_left();
}
