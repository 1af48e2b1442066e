//! Where in the cgroup tree a sandbox's VM goes: the OCI `cgroupsPath` of
//! the container that boots it, read as runc reads it, as a path relative
//! to the root of every cgroup hierarchy.
//!
//! Two forms reach us:
//! - cgroupfs: `/kubepods/burstable/pod<uid>/<id>` (the kubelet with the
//!   cgroupfs driver), `/<namespace>/<id>` (`ctr run`'s default spec);
//! - systemd: `<slice>:<prefix>:<name>`, e.g.
//!   `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>` (the CRI
//!   plugin with `SystemdCgroup = true`). The slice expands as systemd
//!   nests slices (`a-b.slice` lives in `a.slice`), the unit is
//!   `<prefix>-<name>.scope`: the directory runc's systemd driver ends up
//!   with.
//!
//! With none at all the sandbox goes under the configured parent
//! (`runtime.cgroup_parent`), as `<parent>/<sandbox id>`.

use std::path::{Component, Path, PathBuf};

/// A `cgroupsPath` we cannot place a VM at.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cgroupsPath {path:?} is invalid: {reason}")]
pub struct InvalidCgroupsPath {
    pub path: String,
    pub reason: &'static str,
}

/// The sandbox's cgroup, relative to a hierarchy's root (no leading `/`).
pub fn resolve(
    cgroups_path: Option<&str>,
    parent: &str,
    sandbox_id: &str,
) -> Result<PathBuf, InvalidCgroupsPath> {
    match cgroups_path.filter(|p| !p.is_empty()) {
        None => cgroupfs(&format!("{}/{sandbox_id}", parent.trim_end_matches('/'))),
        Some(p) if is_systemd(p) => systemd(p),
        Some(p) => cgroupfs(p),
    }
}

/// runc's test for the systemd form: three `:`-separated fields, the
/// first a slice (or empty: the default slice).
fn is_systemd(path: &str) -> bool {
    let parts: Vec<&str> = path.split(':').collect();
    parts.len() == 3 && (parts[0].is_empty() || parts[0].ends_with(".slice"))
}

/// A cgroupfs path, absolute or not, taken below the hierarchy's root.
/// `..` is refused rather than resolved: the path comes from a spec, and a
/// VM must never land outside the tree the caller named.
fn cgroupfs(path: &str) -> Result<PathBuf, InvalidCgroupsPath> {
    let bad = |reason| InvalidCgroupsPath {
        path: path.to_owned(),
        reason,
    };
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => {
                let name = name.to_str().ok_or_else(|| bad("it is not UTF-8"))?;
                check_name(name).map_err(bad)?;
                out.push(name);
            }
            Component::ParentDir => return Err(bad("it has a '..' component")),
            Component::Prefix(_) => return Err(bad("it has a prefix")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(bad("it names the root cgroup"));
    }
    Ok(out)
}

/// `slice:prefix:name` → `<expanded slice>/<prefix>-<name>.scope`.
fn systemd(path: &str) -> Result<PathBuf, InvalidCgroupsPath> {
    let bad = |reason| InvalidCgroupsPath {
        path: path.to_owned(),
        reason,
    };
    let mut parts = path.splitn(3, ':');
    let (slice, prefix, name) = match (parts.next(), parts.next(), parts.next()) {
        (Some(s), Some(p), Some(n)) => (s, p, n),
        _ => return Err(bad("it is not slice:prefix:name")),
    };
    // runc's default parent when the slice is empty.
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut out = expand_slice(slice).map_err(bad)?;
    if name.is_empty() {
        return Err(bad("its name is empty"));
    }
    // A name that is itself a slice is the unit; otherwise a scope.
    let unit = if name.ends_with(".slice") {
        name.to_owned()
    } else if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    check_name(&unit).map_err(bad)?;
    out.push(unit);
    Ok(out)
}

/// `kubepods-burstable-pod1.slice` → `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice`
/// (systemd's rule: each `-` opens a nested slice); `-.slice` is the root.
fn expand_slice(slice: &str) -> Result<PathBuf, &'static str> {
    let stem = slice
        .strip_suffix(".slice")
        .ok_or("its slice does not end in .slice")?;
    if slice.contains('/') {
        return Err("its slice has a '/'");
    }
    let mut out = PathBuf::new();
    if stem == "-" {
        return Ok(out);
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err("its slice name is malformed");
    }
    let mut prefix = String::new();
    for part in stem.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        let level = format!("{prefix}.slice");
        check_name(&level)?;
        out.push(level);
    }
    Ok(out)
}

/// One directory name of the cgroup tree: not empty or a dot, no `/`, no
/// control characters, at most `NAME_MAX` bytes.
fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("it has an empty or dot component");
    }
    if name.contains('/') {
        return Err("a unit or slice name has a '/'");
    }
    if name.chars().any(char::is_control) {
        return Err("it has a control character");
    }
    if name.len() > 255 {
        return Err("a component is longer than 255 bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(path: Option<&str>) -> String {
        resolve(path, "/boxlite", "sb1")
            .unwrap()
            .display()
            .to_string()
    }

    #[test]
    fn cgroupfs_paths_are_taken_below_the_root() {
        assert_eq!(
            ok(Some("/kubepods/burstable/pod1/sb1")),
            "kubepods/burstable/pod1/sb1"
        );
        assert_eq!(ok(Some("/default/c1")), "default/c1");
        assert_eq!(ok(Some("relative/c1")), "relative/c1");
        assert_eq!(ok(Some("//a/./b/")), "a/b");
    }

    #[test]
    fn no_path_means_the_configured_parent() {
        assert_eq!(ok(None), "boxlite/sb1");
        assert_eq!(ok(Some("")), "boxlite/sb1");
        assert_eq!(
            resolve(None, "/machine/vms/", "x").unwrap(),
            Path::new("machine/vms/x")
        );
    }

    #[test]
    fn systemd_paths_expand_their_slice() {
        assert_eq!(
            ok(Some("kubepods-burstable-pod1.slice:cri-containerd:sb1")),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1.slice/cri-containerd-sb1.scope"
        );
        assert_eq!(ok(Some(":cri:sb1")), "system.slice/cri-sb1.scope");
        assert_eq!(ok(Some("-.slice::sb1")), "sb1.scope");
        assert_eq!(ok(Some("a.slice:p:b.slice")), "a.slice/b.slice");
    }

    #[test]
    fn paths_that_leave_the_tree_or_are_malformed_are_refused() {
        for (path, reason) in [
            ("/kubepods/../../etc", "it has a '..' component"),
            ("/", "it names the root cgroup"),
            ("a-.slice:p:n", "its slice name is malformed"),
            ("a--b.slice:p:n", "its slice name is malformed"),
            ("a.slice:p:", "its name is empty"),
            ("/a/b\nc", "it has a control character"),
        ] {
            let err = resolve(Some(path), "/boxlite", "sb1").unwrap_err();
            assert_eq!(err.reason, reason, "{path}");
            assert!(err.to_string().contains(&format!("{path:?}")), "{err}");
        }
        // `..` in the name of a systemd unit is one component, not a walk up.
        let err = resolve(Some("a.slice:p:../x"), "/b", "s").unwrap_err();
        assert_eq!(err.reason, "a unit or slice name has a '/'");
    }
}
