//! What the VMM's binaries (`boxlite-vmm`, `boxlite-vsock`) share at their
//! edge: logging to stderr and one-line error reports.

/// Logs to stderr with `RUST_LOG` (default `info`). Colours only on a
/// terminal: the runtime sends stderr to a log file whose last line ends
/// up in error messages.
pub fn init_stderr_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

pub use crate::devices::virtio::fs::error_chain;
