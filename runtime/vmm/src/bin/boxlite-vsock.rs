//! `boxlite-vsock`: the guest's vsock device as a vhost-user backend, for
//! the QEMU backend (`-device vhost-user-vsock-device`). The host side is
//! the hybrid unix socket of the built-in VMM (docs/vmm.md, "vsock").
//!
//! One process per VM: it serves one frontend and exits when that frontend
//! disconnects (QEMU ended). The arguments are those of
//! `vhost-device-vsock`, so either binary fits `hypervisor.vhost_vsock_binary`.
//!
//! Exit codes: 0 the frontend disconnected; 1 bad arguments; 2 the device
//! or the vhost-user daemon failed (the reason is logged).

use std::path::PathBuf;
use std::process::ExitCode;

use boxlite_vmm::devices::virtio::vsock::vhost_user;

const USAGE: &str =
    "usage: boxlite-vsock --guest-cid <cid> --socket <vhost-user socket> --uds-path <hybrid socket>

  --guest-cid   the guest's CID (3 ..= 4294967294)
  --socket      vhost-user socket to listen on for the frontend (QEMU)
  --uds-path    hybrid vsock socket: host clients connect here and send
                `CONNECT <port>`; guest connections to host port P go to
                `<uds-path>_P`
  RUST_LOG      log filter (default info); logs go to stderr";

struct Args {
    cid: u64,
    socket: PathBuf,
    uds_path: PathBuf,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut cid, mut socket, mut uds_path) = (None, None, None);
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
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        cid: cid.ok_or("--guest-cid is required")?,
        socket: socket.ok_or("--socket is required")?,
        uds_path: uds_path.ok_or("--uds-path is required")?,
    })
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
    tracing::info!(
        cid = args.cid,
        socket = %args.socket.display(),
        uds_path = %args.uds_path.display(),
        "serving vhost-user vsock"
    );
    match vhost_user::serve(args.cid, &args.socket, &args.uds_path) {
        Ok(()) => {
            tracing::info!("frontend disconnected; exiting");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let msg = boxlite_vmm::cli::error_chain(&e);
            tracing::error!("{msg}");
            ExitCode::from(2)
        }
    }
}
