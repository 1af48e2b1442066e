//! `boxlite-vmm --config vm.json`: run one micro-VM until it ends.
//!
//! Exit codes are documented in `docs/vmm.md` and `boxlite_vmm::exit_code`.

use std::path::PathBuf;
use std::process::ExitCode;

use boxlite_vmm::config::{CpuMode, RawImageConfig, VmConfig};
use boxlite_vmm::exit_code;

const USAGE: &str = "usage: boxlite-vmm --config <vm.json> [--no-jail] [--raw-image <file> --load-addr <addr> [--mode real|long]]

  --config      JSON VM description (see docs/vmm.md)
  --no-jail     debugging only: no cgroup, namespaces, pivot_root, rlimits,
                uid change, no_new_privs, landlock or seccomp (same as
                \"jail\": false; logged loudly)
  --raw-image   run raw guest code instead of a kernel (tests and benchmarks only);
                overrides \"kernel\"/\"raw_image\" in the config
  --load-addr   guest-physical load and entry address of the raw image (decimal or 0x hex)
  --mode        CPU mode at the first instruction (default real)
  RUST_LOG      log filter (default info); logs go to stderr";

struct Args {
    config: PathBuf,
    raw_image: Option<PathBuf>,
    load_addr: Option<u64>,
    mode: CpuMode,
    no_jail: bool,
}

fn parse_u64(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let (mut config, mut raw_image, mut load_addr, mut mode) = (None, None, None, CpuMode::Real);
    let mut no_jail = false;
    while let Some(a) = it.next() {
        let mut val = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--config" => config = Some(PathBuf::from(val()?)),
            "--raw-image" => raw_image = Some(PathBuf::from(val()?)),
            "--load-addr" => {
                let v = val()?;
                load_addr = Some(parse_u64(&v).ok_or(format!("--load-addr {v} is not a number"))?)
            }
            "--mode" => {
                mode = match val()?.as_str() {
                    "real" => CpuMode::Real,
                    "long" => CpuMode::Long,
                    other => return Err(format!("--mode {other}: expected real or long")),
                }
            }
            "--no-jail" => no_jail = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        config: config.ok_or("--config is required")?,
        raw_image,
        load_addr,
        mode,
        no_jail,
    })
}

fn main() -> ExitCode {
    boxlite_vmm::cli::init_stderr_logging();

    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            boxlite_vmm::cli::report_usage_error("boxlite-vmm", &msg, USAGE);
            return ExitCode::from(exit_code::CONFIG_ERROR as u8);
        }
    };
    // The same reader the runtime's contract test checks its configs with.
    let mut cfg: VmConfig = match boxlite_vmm::config::read(&args.config) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("{}", boxlite_vmm::cli::error_chain(&e));
            return ExitCode::from(exit_code::CONFIG_ERROR as u8);
        }
    };
    if let Some(path) = args.raw_image {
        let Some(load_addr) = args.load_addr else {
            eprintln!("boxlite-vmm: --raw-image needs --load-addr\n{USAGE}");
            return ExitCode::from(exit_code::CONFIG_ERROR as u8);
        };
        cfg.kernel = None;
        cfg.raw_image = Some(RawImageConfig {
            path,
            load_addr,
            mode: args.mode,
        });
    }
    if args.no_jail {
        tracing::warn!("--no-jail given: the VMM will run without its jail");
        cfg.jail = false;
    }
    // Before anything is opened: the cgroup, then a pid namespace of its
    // own (this process stays behind, waiting; it never returns).
    let parent = match cfg.jail.then(|| boxlite_vmm::jail::isolate_process(&cfg)) {
        None => None,
        Some(Ok(link)) => Some(link),
        Some(Err(e)) => {
            tracing::error!("{}", boxlite_vmm::cli::error_chain(&e));
            return ExitCode::from(exit_code::JAIL_ERROR as u8);
        }
    };
    match boxlite_vmm::run_vm(&cfg, parent.as_ref()) {
        Ok(reason) => ExitCode::from(reason.exit_code() as u8),
        Err(e) => {
            let msg = boxlite_vmm::cli::error_chain(&e);
            tracing::error!(code = e.exit_code(), "{msg}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}
