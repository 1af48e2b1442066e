//! Checks on what the host sends for a container or an exec: ids, the OCI
//! runtime spec, the OCI Process, and the stdio declaration. Everything here
//! is a caller mistake (INVALID_ARGUMENT) when it fails.

use std::path::{Path, PathBuf};

use boxlite_protocol::ids;
use oci_spec::runtime::{LinuxResources, Process, Spec};

use super::error::ContainerError;
use crate::config::Config;

/// Longest spec or Process JSON accepted.
pub const MAX_SPEC_LEN: usize = 4 * 1024 * 1024;
/// Parent cgroup of containers that name no cgroupsPath.
pub const DEFAULT_CGROUP_PARENT: &str = "/boxlite";

/// Which stdio streams a process has (from the request's StdioConfig).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub terminal: bool,
}

/// A checked CreateContainer request.
#[derive(Debug, Clone)]
pub struct CreateRequest {
    pub id: String,
    /// The spec to write to the bundle: root.path resolved, cgroupsPath set.
    pub spec: Spec,
    pub cgroup_path: PathBuf,
    pub stdio: Stdio,
}

/// A checked ExecProcess request.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub container_id: String,
    pub exec_id: String,
    pub process: Process,
    pub stdio: Stdio,
}

/// Checks the id in request field `field` with containerd's rule
/// ([`ids::validate`]); `kind` names the id in the message.
fn check_id(field: &'static str, kind: &'static str, id: &str) -> Result<(), ContainerError> {
    ids::validate(kind, id).map_err(|source| ContainerError::InvalidId { field, source })
}

fn check_stdio(stdio: Stdio, process_terminal: bool) -> Result<(), ContainerError> {
    if stdio.terminal != process_terminal {
        return Err(ContainerError::InvalidSpec(format!(
            "stdio.terminal is {} but process.terminal is {process_terminal}",
            stdio.terminal
        )));
    }
    if stdio.terminal && stdio.stderr {
        return Err(ContainerError::InvalidSpec(
            "stdio.stderr must be false with a terminal: stderr is merged into stdout".into(),
        ));
    }
    Ok(())
}

fn parse_json<T: serde::de::DeserializeOwned>(
    what: &'static str,
    json: &[u8],
) -> Result<T, ContainerError> {
    if json.len() > MAX_SPEC_LEN {
        return Err(ContainerError::InvalidSpec(format!(
            "{what} is {} bytes, the limit is {MAX_SPEC_LEN}",
            json.len()
        )));
    }
    serde_json::from_slice(json)
        .map_err(|e| ContainerError::InvalidSpec(format!("{what} does not parse: {e}")))
}

fn check_process(process: &Process) -> Result<(), ContainerError> {
    let args = process.args().as_deref().unwrap_or_default();
    if args.is_empty() && process.command_line().is_none() {
        return Err(ContainerError::InvalidSpec(
            "process.args is empty".to_string(),
        ));
    }
    for (i, r) in process.rlimits().iter().flatten().enumerate() {
        if r.soft() > r.hard() {
            return Err(ContainerError::InvalidSpec(format!(
                "process.rlimits[{i}] {}: the soft limit {} is above the hard limit {}",
                r.typ(),
                r.soft(),
                r.hard()
            )));
        }
    }
    if !process.cwd().is_absolute() {
        return Err(ContainerError::InvalidSpec(format!(
            "process.cwd {:?} is not an absolute path",
            process.cwd()
        )));
    }
    Ok(())
}

/// Checks a CreateContainer request. The root path is a guest path; it is
/// resolved (under `--root` in host mode) and must be an existing directory.
pub fn validate_create(
    config: &Config,
    id: &str,
    spec_json: &[u8],
    stdio: Stdio,
) -> Result<CreateRequest, ContainerError> {
    check_id("container_id", "container", id)?;
    let mut spec: Spec = parse_json("oci_spec_json", spec_json)?;
    let process = spec
        .process()
        .as_ref()
        .ok_or_else(|| ContainerError::InvalidSpec("the spec has no process".into()))?;
    check_process(process)?;
    check_stdio(stdio, process.terminal().unwrap_or(false))?;
    if spec.hooks().is_some() {
        return Err(ContainerError::InvalidSpec(
            "the spec has hooks: OCI hooks run on the host, the shim must remove them".into(),
        ));
    }
    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| ContainerError::InvalidSpec("the spec has no root".into()))?;
    let guest_root = crate::paths::guest_path("root.path", &root.path().to_string_lossy())
        .map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
    let rootfs = config.resolve(&guest_root);
    if !rootfs.is_dir() {
        return Err(ContainerError::RootfsMissing(guest_root));
    }
    let mut root = root.clone();
    root.set_path(rootfs);
    spec.set_root(Some(root));

    let mut linux = spec.linux().clone().unwrap_or_default();
    // Enforced after create by the container helper (device_filter); a rule
    // it cannot express fails here, before anything exists.
    super::device_filter::container_rules(&linux).map_err(ContainerError::InvalidSpec)?;
    let cgroup_path = match linux.cgroups_path() {
        Some(p) if p.to_string_lossy().contains(':') => {
            return Err(ContainerError::InvalidSpec(format!(
                "linux.cgroupsPath {p:?} is a systemd path; the guest has no systemd"
            )))
        }
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => Path::new("/").join(p),
        None => Path::new(DEFAULT_CGROUP_PARENT).join(id),
    };
    linux.set_cgroups_path(Some(cgroup_path.clone()));
    spec.set_linux(Some(linux));
    Ok(CreateRequest {
        id: id.to_string(),
        spec,
        cgroup_path,
        stdio,
    })
}

/// Checks an ExecProcess request.
pub fn validate_exec(
    container_id: &str,
    exec_id: &str,
    process_json: &[u8],
    stdio: Stdio,
) -> Result<ExecRequest, ContainerError> {
    check_id("container_id", "container", container_id)?;
    check_id("exec_id", "exec", exec_id)?;
    let process: Process = parse_json("process_json", process_json)?;
    check_process(&process)?;
    check_stdio(stdio, process.terminal().unwrap_or(false))?;
    Ok(ExecRequest {
        container_id: container_id.to_string(),
        exec_id: exec_id.to_string(),
        process,
        stdio,
    })
}

/// Checks UpdateContainer's resources. Device cgroup rules are dropped, as
/// `runc update` does (containerd sends the container's whole resources,
/// rules included): they are set at create only (see [`super::device_filter`]).
pub fn parse_resources(json: &[u8]) -> Result<LinuxResources, ContainerError> {
    let mut resources: LinuxResources = parse_json("resources_json", json)?;
    resources.set_devices(None);
    Ok(resources)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host_config(root: &Path) -> Config {
        let mut c = Config::guest(None);
        c.mode = crate::config::Mode::Host;
        c.root = root.to_path_buf();
        c
    }

    fn spec_json(extra: &str) -> Vec<u8> {
        format!(
            r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["sh"],"user":{{"uid":0,"gid":0}}}},
               "root":{{"path":"/rootfs"}}{extra}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn ids_follow_containerd_rules() {
        let dir = tempfile::tempdir().unwrap();
        let config = host_config(dir.path());
        for good in ["c1", "a.b_c-d", &"x".repeat(ids::MAX_ID_LEN)] {
            check_id("container_id", "container", good).unwrap();
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "a+b",
            "é",
            &"x".repeat(ids::MAX_ID_LEN + 1),
        ] {
            let e = validate_create(&config, bad, &spec_json(""), Stdio::default()).unwrap_err();
            assert!(matches!(e, ContainerError::InvalidId { .. }), "{e}");
            assert!(e.to_string().starts_with("container_id"), "{e}");
            let e = validate_exec("c1", bad, b"{}", Stdio::default()).unwrap_err();
            assert!(e.to_string().starts_with("exec_id"), "{e}");
        }
    }

    #[test]
    fn create_resolves_root_and_sets_a_cgroup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let config = host_config(dir.path());
        let req = validate_create(&config, "c1", &spec_json(""), Stdio::default()).unwrap();
        assert_eq!(
            req.spec.root().as_ref().unwrap().path(),
            &dir.path().join("rootfs")
        );
        assert_eq!(req.cgroup_path, PathBuf::from("/boxlite/c1"));
        let req = validate_create(
            &config,
            "c1",
            &spec_json(r#","linux":{"cgroupsPath":"pods/x"}"#),
            Stdio::default(),
        )
        .unwrap();
        assert_eq!(req.cgroup_path, PathBuf::from("/pods/x"));
    }

    #[test]
    fn create_refuses_bad_specs_clearly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let config = host_config(dir.path());
        let cases: Vec<(Vec<u8>, Stdio, &str)> = vec![
            (b"{not json".to_vec(), Stdio::default(), "does not parse"),
            (
                br#"{"ociVersion":"1.0.2","root":{"path":"/rootfs"}}"#.to_vec(),
                Stdio::default(),
                "no process",
            ),
            (
                br#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":[],"user":{"uid":0,"gid":0}},"root":{"path":"/rootfs"}}"#
                    .to_vec(),
                Stdio::default(),
                "process.args is empty",
            ),
            (
                spec_json(r#","hooks":{"poststart":[{"path":"/bin/true"}]}"#),
                Stdio::default(),
                "hooks",
            ),
            (
                spec_json(r#","linux":{"cgroupsPath":"system.slice:x:y"}"#),
                Stdio::default(),
                "systemd",
            ),
            (
                spec_json(""),
                Stdio {
                    terminal: true,
                    ..Stdio::default()
                },
                "stdio.terminal is true",
            ),
        ];
        for (json, stdio, want) in cases {
            let e = validate_create(&config, "c1", &json, stdio).unwrap_err();
            assert!(matches!(e, ContainerError::InvalidSpec(_)), "{e}");
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
        let missing = br#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0}},"root":{"path":"/nope"}}"#;
        let e = validate_create(&config, "c1", missing, Stdio::default()).unwrap_err();
        assert!(matches!(e, ContainerError::RootfsMissing(_)), "{e}");
    }

    #[test]
    fn device_rules_are_checked_at_create_and_dropped_at_update() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("rootfs")).unwrap();
        let config = host_config(dir.path());
        let with = |rules: &str| {
            spec_json(&format!(
                r#","linux":{{"resources":{{"devices":{rules}}}}}"#
            ))
        };
        for ok in [
            "[]",
            r#"[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rwm"}]"#,
            r#"[{"allow":false,"type":"c","major":1,"minor":3,"access":"w"}]"#,
            r#"[{"allow":true,"type":"b","major":8,"access":"r"}]"#,
        ] {
            validate_create(&config, "c1", &with(ok), Stdio::default()).unwrap();
        }
        let bad = r#"[{"allow":false,"access":"rwm"},{"allow":true,"type":"c","major":1,"minor":3,"access":"rx"}]"#;
        let e = validate_create(&config, "c1", &with(bad), Stdio::default()).unwrap_err();
        assert!(matches!(e, ContainerError::InvalidSpec(_)), "{e}");
        assert!(e.to_string().contains("linux.resources.devices[1]"), "{e}");
        // UpdateContainer drops the rules, as runc update does.
        let r =
            parse_resources(br#"{"devices":[{"allow":false,"access":"rwm"}],"pids":{"limit":5}}"#)
                .unwrap();
        assert!(r.devices().is_none());
        assert_eq!(r.pids().as_ref().unwrap().limit(), 5);
    }
}
