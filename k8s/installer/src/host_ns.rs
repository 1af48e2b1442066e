//! Running a command on the host from the installer pod: the pod has
//! `hostPID: true`, so `/proc/1` is the host's init and its namespaces are
//! the host's. The child enters them before exec, so `systemctl` talks to
//! the host's systemd as if run from a root shell on the node.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use nix::sched::{setns, CloneFlags};

/// Entered in this order; the mount namespace last, because after it
/// `/proc/1/ns/*` would be resolved in the host's `/proc` (we open them all
/// first anyway, so only the order of effects matters).
const NAMESPACES: [(&str, CloneFlags); 5] = [
    ("pid", CloneFlags::CLONE_NEWPID),
    ("net", CloneFlags::CLONE_NEWNET),
    ("ipc", CloneFlags::CLONE_NEWIPC),
    ("uts", CloneFlags::CLONE_NEWUTS),
    ("mnt", CloneFlags::CLONE_NEWNS),
];

/// A host PATH: the container's own PATH points into the image.
const HOST_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "cannot reach the host's namespaces: this process is PID 1 of its own PID namespace; \
         the installer pod needs `hostPID: true` (k8s/installer.yaml)"
    )]
    NotHostPid,
    #[error("cannot open {path} (the installer needs to run privileged with hostPID): {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("`{command}` in the host's namespaces could not be started: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("`{command}` in the host's namespaces failed ({status}): {stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
}

/// The host's init as the installer pod sees it (hostPID).
pub const HOST_INIT: u32 = 1;

/// Runs `argv` in the namespaces of process `pid` (the host's init,
/// [`HOST_INIT`], outside tests) and waits for it; fails with its exit
/// status and stderr.
pub fn run_on_host(pid: u32, argv: &[String]) -> Result<(), HostError> {
    let command = argv.join(" ");
    let Some((program, args)) = argv.split_first() else {
        return Err(HostError::Spawn {
            command,
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"),
        });
    };
    if pid == HOST_INIT && std::process::id() == HOST_INIT {
        return Err(HostError::NotHostPid);
    }
    // Opened here, before the fork: the child may only make async-signal-safe
    // calls, and setns on an fd is one.
    let mut fds = Vec::with_capacity(NAMESPACES.len());
    for (name, flag) in NAMESPACES {
        let path = format!("/proc/{pid}/ns/{name}");
        let file = File::open(&path).map_err(|source| HostError::Open { path, source })?;
        fds.push((file, flag));
    }
    let mut cmd = Command::new(program);
    cmd.args(args).env("PATH", HOST_PATH).stdin(Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only
    // calls setns(2) and chdir(2) on values prepared before the fork; it
    // allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            for (file, flag) in &fds {
                setns(file, *flag)?;
            }
            // The cwd still points into the container's filesystem.
            nix::unistd::chdir(c"/")?;
            Ok(())
        });
    }
    let output = cmd.output().map_err(|source| HostError::Spawn {
        command: command.clone(),
        source,
    })?;
    if output.status.success() {
        return Ok(());
    }
    // systemctl explains itself over a few lines ("Job for … failed. See …");
    // keep them, on one log line.
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.split_whitespace().collect::<Vec<_>>().join(" ");
    Err(HostError::Failed {
        command,
        status: output.status,
        stderr: if stderr.is_empty() {
            "(no stderr)".to_owned()
        } else {
            stderr.chars().take(1000).collect()
        },
    })
}

/// How containerd is restarted on a systemd node (the default of
/// `--restart-command`).
pub const RESTART_CONTAINERD: &str = "systemctl restart containerd";
