use std::os::unix::process::CommandExt;

use super::*;

/// A directory tree standing in for two hierarchies (`cgroup.procs` files
/// made by hand, as the kernel would).
fn fake_hierarchies(root: &Path) -> Vec<Hierarchy> {
    ["unified", "memory"]
        .iter()
        .map(|n| {
            let mount = root.join(n);
            std::fs::create_dir_all(mount.join("kubepods/pod1")).unwrap();
            Hierarchy {
                mount,
                v1_cpuset: false,
                v2: *n == "unified",
            }
        })
        .collect()
}

#[test]
fn only_what_the_sandbox_made_is_recorded_and_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let h = fake_hierarchies(tmp.path());
    let record_dir = tmp.path().join("sandbox");
    std::fs::create_dir(&record_dir).unwrap();
    let mut cg = PodCgroup::create(&h, Path::new("kubepods/pod1/sb1/vm"), &record_dir).unwrap();
    assert_eq!(
        cg.leaves(),
        [
            tmp.path().join("unified/kubepods/pod1/sb1/vm"),
            tmp.path().join("memory/kubepods/pod1/sb1/vm")
        ]
    );
    let record = std::fs::read_to_string(record_dir.join(RECORD_FILE)).unwrap();
    let u = tmp.path().join("unified/kubepods/pod1");
    let m = tmp.path().join("memory/kubepods/pod1");
    // The leaf only: `sb1`, made on the way, is a parent others may share.
    assert_eq!(
        record,
        format!(
            "{}\n{}\n",
            u.join("sb1/vm").display(),
            m.join("sb1/vm").display()
        )
    );
    cg.remove().unwrap();
    assert!(!u.join("sb1/vm").exists() && !m.join("sb1/vm").exists());
    // The pod's own cgroup (the kubelet's) and the shared parent stay.
    assert!(u.join("sb1").is_dir() && m.join("sb1").is_dir());
    assert!(!record_dir.join(RECORD_FILE).exists());
    cg.remove().unwrap();
}

#[test]
fn a_leftover_sandbox_directory_is_the_sandboxs_and_goes_with_it() {
    let tmp = tempfile::tempdir().unwrap();
    let h = fake_hierarchies(tmp.path());
    // A crashed run's leftover of the same sandbox.
    for hierarchy in &h {
        std::fs::create_dir(hierarchy.mount.join("kubepods/pod1/sb1")).unwrap();
    }
    let mut cg = PodCgroup::create(&h, Path::new("kubepods/pod1/sb1"), tmp.path()).unwrap();
    cg.remove().unwrap();
    for hierarchy in &h {
        assert!(!hierarchy.mount.join("kubepods/pod1/sb1").exists());
        assert!(hierarchy.mount.join("kubepods/pod1").is_dir());
    }
}

#[test]
fn a_failed_create_removes_what_it_made() {
    let tmp = tempfile::tempdir().unwrap();
    let mut h = fake_hierarchies(tmp.path());
    // The second hierarchy cannot take the new directory: a file is in the way.
    std::fs::write(h[1].mount.join("kubepods/pod1/sb1"), "").unwrap();
    h.truncate(2);
    let err = PodCgroup::create(&h, Path::new("kubepods/pod1/sb1/vm"), tmp.path()).unwrap_err();
    assert!(
        err.to_string().starts_with(&format!(
            "cannot create cgroup {}",
            h[1].mount.join("kubepods/pod1/sb1/vm").display()
        )),
        "{err}"
    );
    assert!(!h[0].mount.join("kubepods/pod1/sb1/vm").exists());
}

#[test]
fn a_record_cannot_steer_removal_outside_the_cgroup_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    std::fs::write(
        tmp.path().join(RECORD_FILE),
        format!(
            "{}\n/sys/fs/cgroup/../../{}\n",
            victim.display(),
            victim.display()
        ),
    )
    .unwrap();
    remove_recorded(tmp.path()).unwrap();
    assert!(victim.is_dir());
    assert!(!tmp.path().join(RECORD_FILE).exists());
}

#[test]
fn the_joiner_writes_the_child_into_every_procs_file() {
    let tmp = tempfile::tempdir().unwrap();
    let h = fake_hierarchies(tmp.path());
    let cg = PodCgroup::create(&h, Path::new("kubepods/pod1"), tmp.path()).unwrap();
    for leaf in cg.leaves() {
        std::fs::write(leaf.join("cgroup.procs"), "").unwrap();
    }
    let joiner = cg.joiner();
    let mut cmd = std::process::Command::new("true");
    // SAFETY: `join` only opens, writes and closes.
    unsafe { cmd.pre_exec(move || joiner.join()) };
    assert!(cmd.status().unwrap().success());
    for leaf in cg.leaves() {
        assert_eq!(
            std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap(),
            "0"
        );
    }
}

#[test]
fn a_joiner_that_cannot_join_fails_the_spawn() {
    let tmp = tempfile::tempdir().unwrap();
    let h = fake_hierarchies(tmp.path());
    // A plain directory, no cgroup.procs: not a cgroup.
    let cg = PodCgroup::create(&h, Path::new("kubepods/pod1/x"), tmp.path()).unwrap();
    let joiner = cg.joiner();
    let mut cmd = std::process::Command::new("true");
    // SAFETY: as above.
    unsafe { cmd.pre_exec(move || joiner.join()) };
    let err = cmd.status().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

/// The real thing, on this host's hierarchies (v1, v2 or hybrid).
#[test]
#[ignore = "needs root and a mounted cgroup hierarchy"]
fn a_process_spawned_with_the_joiner_is_in_the_cgroup_of_every_hierarchy() {
    let hierarchies = host_hierarchies().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let relative = PathBuf::from(format!("boxlite-test-{}/sb", std::process::id()));
    let mut cg = PodCgroup::create(&hierarchies, &relative, tmp.path()).unwrap();
    let joiner = cg.joiner();
    let mut cmd = std::process::Command::new("sleep");
    cmd.arg("30");
    // SAFETY: `join` only opens, writes and closes.
    unsafe { cmd.pre_exec(move || joiner.join()) };
    let mut child = cmd.spawn().unwrap();
    let pid = child.id();
    assert_eq!(cg.pids(), [pid]);
    // /proc/<pid>/cgroup: one line per hierarchy, each naming our path.
    let lines = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = format!("/{}", relative.display());
    for line in lines.lines() {
        assert!(line.ends_with(&want), "{line} (all: {lines})");
    }
    // Busy while the process lives: removal waits, then names the cgroup.
    let err = cg.remove().unwrap_err();
    assert!(matches!(err, CgroupError::Busy { .. }), "{err}");
    child.kill().unwrap();
    child.wait().unwrap();
    cg.remove().unwrap();
    for h in &hierarchies {
        let parent = h.mount.join(relative.parent().unwrap());
        assert!(!h.mount.join(&relative).exists(), "{}", h.mount.display());
        // The parent made on the way is shared, so it stays: ours to clean.
        std::fs::remove_dir(&parent).unwrap();
    }
}
