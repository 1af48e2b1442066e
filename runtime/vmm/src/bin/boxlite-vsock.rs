//! `boxlite-vsock`: the guest's vsock device as a vhost-user backend, for
//! the QEMU backend (`-device vhost-user-vsock-device`). The host side is
//! the hybrid unix socket of the built-in VMM (docs/vmm.md, "vsock").
//!
//! One process per VM: it serves one frontend and exits when that frontend
//! disconnects (QEMU ended). The arguments are those of
//! `vhost-device-vsock`, so either binary fits `hypervisor.vhost_vsock_binary`.
//!
//! With `--jail-user` (the runtime always passes it) it jails itself as
//! `boxlite-vmm` does (docs/security.md, "The vsock backend's jail"): a pid
//! namespace of its own, then — with both sockets bound and before any
//! thread exists — new mount, ipc, uts and network namespaces with
//! `pivot_root` into an empty read-only tmpfs, rlimits,
//! that uid and gid with no capabilities, `no_new_privs`, landlock (no file
//! access at all) and the `vsock` seccomp profile, which every vhost-user
//! thread inherits and which has no `socket` or `connect`: the listeners of
//! the `--host-port`s the guest may connect to are connected before. The
//! guest's vrings are parsed only after that.
//!
//! Exit codes: 0 the frontend disconnected; 1 bad arguments; 2 the jail,
//! the device or the vhost-user daemon failed (the reason is logged).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use boxlite_vmm::config::{EscapeProbe, JailUser};
use boxlite_vmm::devices::virtio::vsock::vhost_user;
use boxlite_vmm::jail::{self, pidns::ParentLink, JailError, JailPolicy};
use boxlite_vmm::threads::ThreadKind;

const USAGE: &str =
    "usage: boxlite-vsock --guest-cid <cid> --socket <vhost-user socket> --uds-path <hybrid socket>

  --guest-cid   the guest's CID (3 ..= 4294967294)
  --socket      vhost-user socket to listen on for the frontend (QEMU)
  --uds-path    hybrid vsock socket: host clients connect here and send
                `CONNECT <port>`; guest connections to host port P go to
                `<uds-path>_P`
  --host-port   a host port the guest may connect to (repeatable): its
                listener `<uds-path>_P` is connected at start; with
                --jail-user or any --host-port, guest connections to other
                ports are refused
  --jail-user   <uid>:<gid> to jail the backend as (run as root; both
                socket paths absolute, in one directory); without it the
                backend runs unjailed, as started
  RUST_LOG      log filter (default info); logs go to stderr";

struct Args {
    cid: u64,
    socket: PathBuf,
    uds_path: PathBuf,
    /// `--host-port`s: connected before the jail, which allows no
    /// connection of its own.
    host_ports: Vec<u32>,
    jail_user: Option<JailUser>,
    /// `--test-escape <json EscapeProbe>`: the jail's tests try this escape
    /// once jailed, on the main thread and on a new thread, and exit.
    /// Never used in production.
    test_escape: Option<EscapeProbe>,
}

fn parse_user(v: &str) -> Result<JailUser, String> {
    let bad = || format!("--jail-user {v} is not <uid>:<gid>");
    let (uid, gid) = v.split_once(':').ok_or_else(bad)?;
    Ok(JailUser {
        uid: uid.parse().map_err(|_| bad())?,
        gid: gid.parse().map_err(|_| bad())?,
    })
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut cid, mut socket, mut uds_path) = (None, None, None);
    let (mut jail_user, mut test_escape) = (None, None);
    let mut host_ports = Vec::new();
    while let Some(a) = it.next() {
        // `--key=value` and `--key value` both work, as with clap.
        let (key, inline) = match a.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (a.clone(), None),
        };
        let mut val = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or(format!("{key} needs a value"))
        };
        match key.as_str() {
            "--guest-cid" => {
                let v = val()?;
                cid = Some(
                    v.parse::<u64>()
                        .map_err(|_| format!("--guest-cid {v} is not a number"))?,
                );
            }
            "--socket" => socket = Some(PathBuf::from(val()?)),
            "--uds-path" => uds_path = Some(PathBuf::from(val()?)),
            "--jail-user" => jail_user = Some(parse_user(&val()?)?),
            "--host-port" => {
                let v = val()?;
                host_ports.push(
                    v.parse::<u32>()
                        .map_err(|_| format!("--host-port {v} is not a port number"))?,
                );
            }
            "--test-escape" => {
                let v = val()?;
                test_escape =
                    Some(serde_json::from_str(&v).map_err(|e| format!("--test-escape {v}: {e}"))?);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        cid: cid.ok_or("--guest-cid is required")?,
        socket: socket.ok_or("--socket is required")?,
        uds_path: uds_path.ok_or("--uds-path is required")?,
        host_ports,
        jail_user,
        test_escape,
    })
}

/// The directory both sockets live in: the jail's empty root is mounted
/// over it.
fn sandbox_dir(args: &Args) -> Result<PathBuf, String> {
    let dir = |p: &Path| {
        p.parent()
            .filter(|d| d.is_absolute())
            .map(Path::to_path_buf)
    };
    match (dir(&args.uds_path), dir(&args.socket)) {
        (Some(a), Some(b)) if a == b => Ok(a),
        _ => Err(format!(
            "--jail-user needs --socket {} and --uds-path {} as absolute paths in one directory",
            args.socket.display(),
            args.uds_path.display()
        )),
    }
}

/// Jails the process (single-threaded, both sockets bound, the host ports
/// connected): everything of `boxlite-vmm`'s jail, then the `vsock` seccomp
/// profile on this thread, which the threads the vhost-user daemon starts
/// inherit.
fn jail_self(dir: PathBuf, user: JailUser, parent: &ParentLink) -> Result<(), JailError> {
    let policy = JailPolicy {
        mount_point: Some(dir),
        user: Some(user),
        ..JailPolicy::default()
    };
    jail::apply(&policy, Some(parent))?;
    boxlite_vmm::seccomp::apply(ThreadKind::VsockBackend)?;
    tracing::info!(
        syscalls = boxlite_vmm::seccomp::allowed_syscalls(ThreadKind::VsockBackend).len(),
        "vsock seccomp profile loaded; vhost-user threads inherit it"
    );
    Ok(())
}

/// The `--test-escape` hook: tries `probe` on this thread, then on a new
/// one (the vhost-user threads are made the same way). A seccomp kill ends
/// the process with SIGSYS; an escape that goes through exits 3.
fn try_escape(probe: &EscapeProbe) -> ExitCode {
    let on_new_thread = probe.clone();
    let outcomes = [
        ("main", jail::escape_probe::attempt(probe)),
        (
            "spawned",
            std::thread::spawn(move || jail::escape_probe::attempt(&on_new_thread))
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("probe thread panicked"))),
        ),
    ];
    let mut code = ExitCode::SUCCESS;
    for (thread, outcome) in outcomes {
        match outcome {
            Err(e) => tracing::warn!(thread, ?probe, "test hook: escape denied: {e}"),
            Ok(()) => {
                tracing::error!(thread, ?probe, "test hook: the escape was allowed");
                code = ExitCode::from(3);
            }
        }
    }
    code
}

fn main() -> ExitCode {
    boxlite_vmm::cli::init_stderr_logging();
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            boxlite_vmm::cli::report_usage_error("boxlite-vsock", &msg, USAGE);
            return ExitCode::from(1);
        }
    };
    let fail = |msg: String| {
        tracing::error!("{msg}");
        ExitCode::from(2)
    };
    let jail = match args.jail_user {
        Some(user) => {
            let dir = match sandbox_dir(&args) {
                Ok(dir) => dir,
                Err(msg) => {
                    boxlite_vmm::cli::report_usage_error("boxlite-vsock", &msg, USAGE);
                    return ExitCode::from(1);
                }
            };
            // First, before anything is opened: the process the runtime
            // tracks stays behind and only waits.
            match jail::pidns::enter() {
                Ok(parent) => Some((dir, user, parent)),
                Err(e) => return fail(boxlite_vmm::cli::error_chain(&e)),
            }
        }
        None => {
            tracing::warn!("no --jail-user: the vsock backend runs unjailed, as it was started");
            None
        }
    };
    // Jailed, the backend connects nowhere once the guest runs.
    let preconnect = (args.jail_user.is_some() || !args.host_ports.is_empty())
        .then_some(args.host_ports.as_slice());
    let bound = match vhost_user::bind(args.cid, &args.socket, &args.uds_path, preconnect) {
        Ok(bound) => bound,
        Err(e) => return fail(boxlite_vmm::cli::error_chain(&e)),
    };
    if let Some((dir, user, parent)) = jail {
        if let Err(e) = jail_self(dir, user, &parent) {
            return fail(format!(
                "cannot jail the vsock backend: {}",
                boxlite_vmm::cli::error_chain(&e)
            ));
        }
    }
    if let Some(probe) = &args.test_escape {
        return try_escape(probe);
    }
    tracing::info!(
        cid = args.cid,
        socket = %args.socket.display(),
        uds_path = %args.uds_path.display(),
        jailed = args.jail_user.is_some(),
        "serving vhost-user vsock"
    );
    match bound.serve() {
        Ok(()) => {
            tracing::info!("frontend disconnected; exiting");
            ExitCode::SUCCESS
        }
        Err(e) => fail(boxlite_vmm::cli::error_chain(&e)),
    }
}
