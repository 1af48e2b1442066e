//! Logging: `tracing` events go to stderr (the console in guest mode) and
//! to the in-memory ring that feeds the log stream ([`stream`]).
//!
//! Lines carry the kernel's monotonic clock (`[   1.234567]`), so they line
//! up with the kernel's own console messages. `log` records (from ttrpc) are
//! forwarded into `tracing`.

pub mod ring;
pub mod stream;

use std::io::Write;
use std::str::FromStr;
use std::sync::Arc;

use nix::time::{clock_gettime, ClockId};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

pub use ring::LogHub;

#[derive(Debug, thiserror::Error)]
pub enum LoggingError {
    #[error("log filter directive {0:?} is neither a level nor target=level")]
    BadDirective(String),
    #[error("Failed to install the global log subscriber")]
    Install(#[source] tracing_subscriber::util::TryInitError),
}

/// Parses a `RUST_LOG`-style filter: comma-separated levels
/// (`trace`..`error`, `off`) and `target=level` pairs. Stricter than
/// `Targets::from_str`, which reads a misspelt level as a target name and
/// silently turns everything else off.
pub fn parse_filter(filter: &str) -> Result<Targets, LoggingError> {
    let mut targets = Targets::new().with_default(LevelFilter::INFO);
    for directive in filter.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bad = || LoggingError::BadDirective(directive.to_string());
        match directive.split_once('=') {
            Some((target, level)) => {
                let level = LevelFilter::from_str(level.trim()).map_err(|_| bad())?;
                if target.trim().is_empty() {
                    return Err(bad());
                }
                targets = targets.with_target(target.trim().to_string(), level);
            }
            None => {
                let level = LevelFilter::from_str(directive).map_err(|_| bad())?;
                targets = targets.with_default(level);
            }
        }
    }
    Ok(targets)
}

/// Installs the global subscriber. A bad filter falls back to `info`; the
/// problem is returned so the caller can log it once logging works.
pub fn init(filter: &str, hub: Arc<LogHub>) -> Result<Option<LoggingError>, LoggingError> {
    let (targets, warning) = match parse_filter(filter) {
        Ok(t) => (t, None),
        Err(e) => (Targets::new().with_default(LevelFilter::INFO), Some(e)),
    };
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_timer(MonotonicTime)
        .with_writer(TeeMakeWriter { hub })
        .with_filter(targets);
    tracing_subscriber::registry()
        .with(layer)
        .try_init()
        .map_err(LoggingError::Install)?;
    Ok(warning)
}

/// Milliseconds on the kernel's monotonic clock (time since boot, not
/// counting suspend).
pub fn monotonic_ms() -> u64 {
    match clock_gettime(ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => {
            let secs = u64::try_from(ts.tv_sec()).unwrap_or(0);
            let ms = u64::try_from(ts.tv_nsec() / 1_000_000).unwrap_or(0);
            secs.saturating_mul(1000).saturating_add(ms)
        }
        Err(_) => 0,
    }
}

/// `[secs.micros]` on the monotonic clock, like the kernel's printk times.
struct MonotonicTime;

impl FormatTime for MonotonicTime {
    fn format_time(&self, w: &mut Writer<'_>) -> std::fmt::Result {
        match clock_gettime(ClockId::CLOCK_MONOTONIC) {
            Ok(ts) => write!(w, "[{:5}.{:06}]", ts.tv_sec(), ts.tv_nsec() / 1000),
            Err(_) => write!(w, "[?]"),
        }
    }
}

/// Hands each formatted event to stderr and the ring.
struct TeeMakeWriter {
    hub: Arc<LogHub>,
}

impl<'a> MakeWriter<'a> for TeeMakeWriter {
    type Writer = TeeWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        TeeWriter {
            hub: &self.hub,
            buf: Vec::with_capacity(256),
        }
    }
}

/// Collects one event; on drop writes it to stderr and publishes it.
struct TeeWriter<'a> {
    hub: &'a LogHub,
    buf: Vec<u8>,
}

impl Write for TeeWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for TeeWriter<'_> {
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        // The console may be gone (closed fd, hung serial); the ring still
        // gets the line.
        let _ = std::io::stderr().lock().write_all(&self.buf);
        self.hub.publish(&String::from_utf8_lossy(&self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_levels_and_targets() {
        for ok in [
            "",
            "debug",
            "info,ttrpc=warn",
            "boxlite_agent=trace, off",
            "WARN",
        ] {
            assert!(parse_filter(ok).is_ok(), "{ok}");
        }
        for bad in ["verbose", "ttrpc=loud", "=debug", "debug,chatty"] {
            let e = parse_filter(bad).unwrap_err();
            assert!(e.to_string().contains("neither a level"), "{bad}: {e}");
        }
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert!(monotonic_ms() >= a + 5);
    }
}
