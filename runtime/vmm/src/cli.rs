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

/// A bad command line: `<program>: <msg>` (when there is one, `--help`
/// has none) and the usage text, on stderr.
pub fn report_usage_error(program: &str, msg: &str, usage: &str) {
    if !msg.is_empty() {
        eprintln!("{program}: {msg}");
    }
    eprintln!("{usage}");
}

/// An error with its causes, `: `-separated (the project's one way to print them).
pub use boxlite_protocol::error_chain::chain as error_chain;
