//! The helper's side of the protocol: parse the request, run
//! libcontainer, fix up what it leaves undone, and report the pid.

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;

use super::{HelperOp, HelperRequest, HelperResult, HELPER_ARG, RESULT_FD};

/// Helper entry point (from `main`): returns the exit code.
pub fn helper_main(args: &[String]) -> i32 {
    let Some(json) = args.first() else {
        eprintln!("boxlite-agent {HELPER_ARG}: missing request");
        return 2;
    };
    let req: HelperRequest = match serde_json::from_str(json) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("boxlite-agent {HELPER_ARG}: bad request: {e}");
            return 2;
        }
    };
    install_log(&req.log_path);
    let result = match run(&req) {
        Ok(pid) => HelperResult::Started { pid },
        Err(error) => HelperResult::Failed { error },
    };
    let ok = matches!(result, HelperResult::Started { .. });
    // SAFETY: the agent passes fd RESULT_FD open for this; nothing else in
    // the helper owns it.
    let mut agent = unsafe {
        <std::os::unix::net::UnixStream as std::os::fd::FromRawFd>::from_raw_fd(RESULT_FD)
    };
    let sent = serde_json::to_vec(&result)
        .map_err(|e| e.to_string())
        .and_then(|mut line| {
            line.push(b'\n');
            std::io::Write::write_all(&mut agent, &line).map_err(|e| e.to_string())
        });
    if let Err(e) = sent {
        eprintln!("boxlite-agent {HELPER_ARG}: cannot send the result to the agent: {e}");
        return 1;
    }
    if !ok {
        return 1;
    }
    // Stay the process's parent until the agent has registered its pid
    // (an ack byte, or EOF if the agent went away).
    let mut ack = [0u8; 1];
    let _ = std::io::Read::read(&mut agent, &mut ack);
    0
}

/// Warnings and errors of the helper and libcontainer, to `path`. Without
/// it (the file cannot be made), the helper still works, just quieter.
fn install_log(path: &std::path::Path) {
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(file))
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .without_time()
        .try_init();
}

fn run(req: &HelperRequest) -> Result<i32, String> {
    let builder = ContainerBuilder::new(req.container_id.clone(), SyscallType::default())
        .with_root_path(req.state_root.clone())
        .map_err(|e| boxlite_protocol::error_chain::chain(&e))?
        .with_console_socket(req.console_socket.clone());
    match &req.op {
        HelperOp::Create { bundle } => {
            let container = builder
                .as_init(bundle.clone())
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| boxlite_protocol::error_chain::chain(&e))?;
            let pid = container
                .pid()
                .map(|p| p.as_raw())
                .ok_or("libcontainer created the container but reported no pid")?;
            let config = bundle.join("config.json");
            let finish = oci_spec::runtime::Spec::load(&config)
                .map_err(|e| format!("cannot read {}: {e}", config.display()))
                .and_then(|spec| {
                    fix_mounts(&spec, pid)?;
                    bring_up_loopback(&spec, pid)?;
                    apply_device_rules(&spec)
                });
            if let Err(e) = finish {
                // The container exists but differs from the spec: kill it;
                // the agent removes what is left.
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                return Err(e);
            }
            Ok(pid)
        }
        HelperOp::Exec { process_json } => builder
            .as_tenant()
            .with_process(Some(process_json.clone()))
            .with_detach(true)
            .build()
            .map(|p| p.as_raw())
            .map_err(|e| boxlite_protocol::error_chain::chain(&e)),
    }
}

/// Whether the spec asks for a new network namespace (an entry without a
/// path), as opposed to joining one by path or keeping the caller's.
fn creates_network_namespace(spec: &oci_spec::runtime::Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|ns| {
            ns.iter()
                .find(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        })
        .is_some_and(|n| n.path().as_ref().is_none_or(|p| p.as_os_str().is_empty()))
}

/// `lo` up in a network namespace the container got new, as runc does (its
/// "loopback" network, added for exactly this case): the kernel then gives
/// it 127.0.0.1/8 and ::1. libcontainer 0.7 leaves `lo` down, so anything
/// that talks to localhost failed with EADDRNOTAVAIL. A namespace joined by
/// path is someone else's and stays as it is. Network namespaces can be
/// entered by any thread and do not move root or cwd, so the helper enters
/// the container's, flips the flag and comes back.
fn bring_up_loopback(spec: &oci_spec::runtime::Spec, pid: i32) -> Result<(), String> {
    if !creates_network_namespace(spec) {
        return Ok(());
    }
    let open_ns =
        |path: &str| std::fs::File::open(path).map_err(|e| format!("cannot open {path}: {e}"));
    let own = open_ns("/proc/self/ns/net")?;
    let theirs = open_ns(&format!("/proc/{pid}/ns/net"))?;
    nix::sched::setns(&theirs, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot enter the container's network namespace: {e}"))?;
    let result = crate::network::bring_up("lo").map_err(|e| {
        format!(
            "loopback of the container's network namespace: {}",
            boxlite_protocol::error_chain::chain(&e)
        )
    });
    nix::sched::setns(&own, nix::sched::CloneFlags::CLONE_NEWNET)
        .map_err(|e| format!("cannot return to the agent's network namespace: {e}"))?;
    result
}

/// `linux.resources.devices` on cgroup v2 (the guest), which libcontainer
/// leaves out without its libbpf feature: our own device program on the
/// container's cgroup, attached while the container waits for
/// StartContainer, so nothing in it has opened a device yet (runc's init
/// creates the spec's device nodes; creating is not opening). On v1 hosts
/// (host mode) libcontainer's devices controller applies the rules.
fn apply_device_rules(spec: &oci_spec::runtime::Spec) -> Result<(), String> {
    if !matches!(
        libcgroups::common::get_cgroup_setup(),
        Ok(libcgroups::common::CgroupSetup::Unified)
    ) {
        return Ok(());
    }
    let linux = spec.linux().clone().unwrap_or_default();
    let cgroup = linux
        .cgroups_path()
        .clone()
        .ok_or("the spec has no linux.cgroupsPath (the agent always sets one)")?;
    let dir = std::path::Path::new(crate::container::cgroup::CGROUP_ROOT)
        .join(cgroup.strip_prefix("/").unwrap_or(&cgroup));
    let rules = crate::container::device_filter::container_rules(&linux)?;
    crate::container::device_filter::attach(&dir, &rules)
        .map_err(|e| format!("linux.resources.devices: {e}"))
}

/// What libcontainer 0.7 leaves out of the spec's mounts, applied to the
/// created container (its process waits for StartContainer, every mount is
/// in place) from its mount namespace:
/// - propagation options (`private`, `rprivate`, `slave`, `rslave`,
///   `shared`, `rshared`, `unbindable`, `runbindable`) of any mount: its
///   fd-based mount code never sets them; runc applies each after the mount;
/// - `ro` on a `cgroup` mount of a cgroup v1 host: libcontainer mounts the
///   tmpfs and the hierarchies read-write; runc makes them read-only (the
///   guest is cgroup v2, where libcontainer honours `ro`; this is for host
///   mode on v1 hosts).
fn fix_mounts(spec: &oci_spec::runtime::Spec, pid: i32) -> Result<(), String> {
    use std::os::fd::AsRawFd;

    let mut fixes = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let options = m.options().as_deref().unwrap_or_default();
        for o in options {
            let (flag, recursive) = match o.as_str() {
                "private" => (MS_PRIVATE, false),
                "rprivate" => (MS_PRIVATE, true),
                "slave" => (MS_SLAVE, false),
                "rslave" => (MS_SLAVE, true),
                "shared" => (MS_SHARED, false),
                "rshared" => (MS_SHARED, true),
                "unbindable" => (MS_UNBINDABLE, false),
                "runbindable" => (MS_UNBINDABLE, true),
                _ => continue,
            };
            fixes.push((
                m.destination().clone(),
                o.clone(),
                MountAttr::propagation(flag),
                recursive,
            ));
        }
        let v1 = || {
            !matches!(
                libcgroups::common::get_cgroup_setup(),
                Ok(libcgroups::common::CgroupSetup::Unified)
            )
        };
        if m.typ().as_deref() == Some("cgroup") && options.iter().any(|o| o == "ro") && v1() {
            fixes.push((
                m.destination().clone(),
                "ro".into(),
                MountAttr::read_only(),
                true,
            ));
        }
    }
    if fixes.is_empty() {
        return Ok(());
    }
    // Open every mount point through the container's root before entering
    // its mount namespace (its /proc is of another pid namespace).
    let root = format!("/proc/{pid}/root");
    let mut targets = Vec::new();
    for (dest, option, attr, recursive) in fixes {
        let rel = dest.strip_prefix("/").unwrap_or(&dest);
        let path = std::path::Path::new(&root).join(rel);
        let fd = nix::fcntl::open(
            &path,
            nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| {
            format!(
                "mount {}: cannot open it to apply {option:?}: {e}",
                dest.display()
            )
        })?;
        targets.push((dest, option, attr, recursive, fd));
    }
    let open_ns =
        |path: &str| std::fs::File::open(path).map_err(|e| format!("cannot open {path}: {e}"));
    let own = open_ns("/proc/self/ns/mnt")?;
    let theirs = open_ns(&format!("/proc/{pid}/ns/mnt"))?;
    // setns resets root and cwd to the namespace's root; keep both to come
    // back exactly (in the guest the agent's root is a chroot, see "Guest-
    // mode start-up" in docs/agent.md).
    let open_dir = |path: &str| {
        nix::fcntl::open(
            path,
            nix::fcntl::OFlag::O_PATH
                | nix::fcntl::OFlag::O_DIRECTORY
                | nix::fcntl::OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| format!("cannot open {path}: {e}"))
    };
    let (own_root, own_cwd) = (open_dir("/")?, open_dir(".")?);
    nix::sched::setns(&theirs, nix::sched::CloneFlags::CLONE_NEWNS)
        .map_err(|e| format!("cannot enter the container's mount namespace: {e}"))?;
    let mut result = Ok(());
    for (dest, option, attr, recursive, fd) in &targets {
        let flags = libc::AT_EMPTY_PATH | if *recursive { libc::AT_RECURSIVE } else { 0 };
        // SAFETY: mount_setattr(2) with a valid fd, an empty NUL-terminated
        // path and a mount_attr of the size passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                fd.as_raw_fd(),
                c"".as_ptr(),
                flags as libc::c_uint,
                attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            result = Err(format!(
                "mount {}: cannot apply {option:?}: {e}",
                dest.display()
            ));
            break;
        }
    }
    nix::sched::setns(&own, nix::sched::CloneFlags::CLONE_NEWNS)
        .and_then(|()| nix::unistd::fchdir(&own_root))
        .and_then(|()| nix::unistd::chroot("."))
        .and_then(|()| nix::unistd::fchdir(&own_cwd))
        .map_err(|e| format!("cannot return to the agent's mount namespace: {e}"))?;
    result
}

// Propagation types (<linux/mount.h>), as mount_attr.propagation takes them.
const MS_UNBINDABLE: u64 = 1 << 17;
const MS_PRIVATE: u64 = 1 << 18;
const MS_SLAVE: u64 = 1 << 19;
const MS_SHARED: u64 = 1 << 20;

/// `struct mount_attr` of mount_setattr(2).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

impl MountAttr {
    fn propagation(flag: u64) -> Self {
        MountAttr {
            attr_set: 0,
            attr_clr: 0,
            propagation: flag,
            userns_fd: 0,
        }
    }

    fn read_only() -> Self {
        const MOUNT_ATTR_RDONLY: u64 = 0x1;
        MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::creates_network_namespace;

    fn spec_with_namespaces(namespaces: serde_json::Value) -> oci_spec::runtime::Spec {
        serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "/rootfs"},
            "linux": {"namespaces": namespaces},
        }))
        .unwrap()
    }

    #[test]
    fn only_a_network_entry_without_path_is_a_new_namespace() {
        let new = spec_with_namespaces(serde_json::json!([{"type": "pid"}, {"type": "network"}]));
        assert!(creates_network_namespace(&new));
        let empty_path = spec_with_namespaces(serde_json::json!([{"type": "network", "path": ""}]));
        assert!(creates_network_namespace(&empty_path));
        let joined = spec_with_namespaces(
            serde_json::json!([{"type": "network", "path": "/proc/7/ns/net"}]),
        );
        assert!(!creates_network_namespace(&joined));
        let callers = spec_with_namespaces(serde_json::json!([{"type": "pid"}]));
        assert!(!creates_network_namespace(&callers));
    }
}
