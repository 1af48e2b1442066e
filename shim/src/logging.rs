//! Shim logging: `tracing` into containerd's shim log.
//!
//! containerd opens the fifo `log` in the bundle directory (the shim's cwd)
//! for reading before it starts the shim, and copies what arrives into its
//! own log. The filter is `RUST_LOG` if set, else `runtime.log_level` of
//! boxlite.toml; containerd's `-debug` raises it to at least debug. `log`
//! records (containerd-shim, ttrpc) are forwarded into the same output.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// The fifo containerd reads the shim log from, in the shim's cwd.
pub const LOG_FIFO: &str = "log";

fn open_fifo() -> Option<File> {
    // Non-blocking open fails (ENXIO) instead of hanging when nobody reads.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(LOG_FIFO)
        .ok()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
    // Back to blocking writes: a full pipe must not drop log lines.
    // SAFETY: fcntl on an fd we own, with flags read from it.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK);
        }
    }
    Some(file)
}

/// Installs the global subscriber; later calls do nothing.
pub fn init(config_level: &str, debug: bool) {
    let mut filter = std::env::var("RUST_LOG").unwrap_or_else(|_| config_level.to_owned());
    if debug && !filter.contains("debug") && !filter.contains("trace") {
        filter = format!(
            "{filter},containerd_shim_boxlite_v2=debug,boxlite_shim=debug,boxlite_runtime=debug"
        );
    }
    let filter = EnvFilter::try_new(&filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_target(true);
    let result = match open_fifo() {
        Some(file) => builder.with_writer(Mutex::new(file)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
    if result.is_err() {
        // Already initialised (tests).
    }
}
