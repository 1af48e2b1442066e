//! The driver's settings: the `boxlite.*` words of the test host's kernel
//! command line (or `BOXLITE_NESTED_CMDLINE` outside PID 1) and the
//! `BOXLITE_NESTED_ROOT` / `BOXLITE_NESTED_WORK` places.

use std::path::PathBuf;
use std::time::Duration;

/// Every scenario, in the order run when `boxlite.scenarios` is not given.
pub const ALL_SCENARIOS: &str = boxlite_tests::NESTED_SCENARIOS;
/// Per-scenario timeout when `boxlite.timeout` is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Where things are and the settings from the command line.
pub struct Settings {
    pub root: PathBuf,
    pub work: PathBuf,
    pub timeout: Duration,
    pub vmm_log: String,
    pub guest_cmdline: String,
    /// Print the console and VMM log tails for passing scenarios too.
    pub verbose: bool,
    /// Run boxlite-vmm with its jail (default); `boxlite.jail=0` passes
    /// `--no-jail`, for debugging a test-host kernel without landlock.
    pub jail: bool,
}

impl Settings {
    pub fn vmm(&self) -> PathBuf {
        self.root.join("usr/bin/boxlite-vmm")
    }
    pub fn guest_kernel(&self) -> PathBuf {
        self.root.join("guest/vmlinux")
    }
    pub fn guest_initramfs(&self) -> PathBuf {
        self.root.join("guest/initramfs.cpio.gz")
    }
    pub fn virtiofsd(&self) -> PathBuf {
        self.root.join("usr/bin/virtiofsd")
    }
    /// Only in a test host built with `cargo xtask testhost --with-qemu`.
    pub fn qemu(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }
    /// The `blk` scenario's raw image.
    pub fn disk_image(&self) -> PathBuf {
        self.work.join("disk.img")
    }
    /// virtiofsd's vhost-user socket for the `fs` scenario.
    pub fn fs_socket(&self) -> PathBuf {
        self.work.join("virtiofsd/fs.sock")
    }
}

/// The scenarios to run (comma-separated) and the settings, from the
/// command line and the environment.
pub fn from_cmdline() -> (String, Settings) {
    let cmdline = match std::env::var("BOXLITE_NESTED_CMDLINE") {
        Ok(words) if std::process::id() != 1 => words,
        _ => std::fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    };
    let param = |name: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    let scenarios = param("boxlite.scenarios").unwrap_or_else(|| ALL_SCENARIOS.to_owned());
    let settings = Settings {
        root: std::env::var_os("BOXLITE_NESTED_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/")),
        work: std::env::var_os("BOXLITE_NESTED_WORK")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/boxlite-nested")),
        timeout: param("boxlite.timeout")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TIMEOUT),
        vmm_log: param("boxlite.vmm_log").unwrap_or_else(|| "info".to_owned()),
        verbose: param("boxlite.verbose").is_some_and(|v| v == "1"),
        jail: param("boxlite.jail").as_deref() != Some("0"),
        guest_cmdline: param("boxlite.guest_cmdline")
            .map(|v| v.replace('+', " "))
            .unwrap_or_default(),
    };
    (scenarios, settings)
}
