//! Kernel command line parameters for the agent (`/proc/cmdline`).
//!
//! The kernel keeps parameters with a dot before the `=` (like
//! `boxlite.hostname=`) for itself instead of handing them to init as
//! arguments, so the agent reads them from `/proc/cmdline`:
//!
//! * `boxlite.hostname=<name>`: hostname of the VM (default [`DEFAULT_HOSTNAME`]).
//! * `boxlite.log=<filter>`: log filter, a level (`debug`) or `RUST_LOG`-style
//!   directives (`info,boxlite_agent=trace`); default `info`.
//!
//! Parsing never fails: bad values are reported as warnings and the default
//! is kept, because PID 1 must come up whatever the host passed.

use std::path::Path;

/// Hostname used when the command line names none.
pub const DEFAULT_HOSTNAME: &str = "boxlite";
/// Where the kernel shows its command line.
pub const PROC_CMDLINE: &str = "/proc/cmdline";

const PARAM_HOSTNAME: &str = "boxlite.hostname";
const PARAM_LOG: &str = "boxlite.log";
const PARAM_PREFIX: &str = "boxlite.";

#[derive(Debug, thiserror::Error)]
pub enum CmdlineError {
    #[error("Failed to read kernel command line {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The agent's parameters from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub hostname: String,
    /// Log filter directives, if given.
    pub log: Option<String>,
    /// Problems found while parsing, to be logged once logging is up.
    pub warnings: Vec<String>,
}

impl Default for BootParams {
    fn default() -> Self {
        BootParams {
            hostname: DEFAULT_HOSTNAME.to_string(),
            log: None,
            warnings: Vec::new(),
        }
    }
}

impl BootParams {
    /// Reads and parses the command line at `path` (normally [`PROC_CMDLINE`]).
    pub fn read(path: &Path) -> Result<Self, CmdlineError> {
        let text = std::fs::read(path).map_err(|source| CmdlineError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self::parse(&String::from_utf8_lossy(&text)))
    }

    /// Parses a command line string.
    pub fn parse(cmdline: &str) -> Self {
        let mut params = BootParams::default();
        for (key, value) in split_params(cmdline) {
            match (key.as_str(), value) {
                (PARAM_HOSTNAME, Some(v)) if v.is_empty() => {}
                (PARAM_HOSTNAME, Some(v)) => match crate::etc::validate_hostname(&v) {
                    Ok(()) => params.hostname = v,
                    Err(e) => params.warnings.push(format!(
                        "ignoring {PARAM_HOSTNAME}={v:?}: {e}; using {:?}",
                        params.hostname
                    )),
                },
                (PARAM_LOG, Some(v)) if v.is_empty() => {}
                (PARAM_LOG, Some(v)) => params.log = Some(v),
                (PARAM_HOSTNAME | PARAM_LOG, None) => params
                    .warnings
                    .push(format!("ignoring {key} without a value")),
                (k, _) if k.starts_with(PARAM_PREFIX) => params
                    .warnings
                    .push(format!("ignoring unknown kernel parameter {k}")),
                _ => {}
            }
        }
        params
    }
}

/// Splits a kernel command line the way the kernel does: parameters are
/// separated by whitespace, double quotes group (and are removed), and
/// everything after a lone `--` belongs to init's argv.
pub fn split_params(cmdline: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut chars = cmdline.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            break;
        }
        let mut token = String::new();
        let mut quoted = false;
        let mut had_eq = false;
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_whitespace() && !quoted {
                break;
            }
            chars.next();
            match c {
                '"' => quoted = !quoted,
                '=' if !had_eq => {
                    had_eq = true;
                    key = std::mem::take(&mut token);
                }
                _ => token.push(c),
            }
        }
        if !had_eq && token == "--" {
            break;
        }
        if had_eq {
            out.push((key, Some(token)));
        } else {
            out.push((token, None));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_like_the_kernel() {
        let got =
            split_params("console=ttyS0  quiet  \"a=b c\" d=\"e f\" x==y -- boxlite.log=trace");
        assert_eq!(
            got,
            vec![
                ("console".to_string(), Some("ttyS0".to_string())),
                ("quiet".to_string(), None),
                ("a".to_string(), Some("b c".to_string())),
                ("d".to_string(), Some("e f".to_string())),
                ("x".to_string(), Some("=y".to_string())),
            ]
        );
        assert!(split_params("").is_empty());
        assert!(split_params(" \n\t").is_empty());
    }

    #[test]
    fn reads_hostname_and_log_level() {
        let p = BootParams::parse(
            "console=ttyS0 reboot=t boxlite.hostname=pod-1 boxlite.log=debug panic=-1\n",
        );
        assert_eq!(p.hostname, "pod-1");
        assert_eq!(p.log.as_deref(), Some("debug"));
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn defaults_when_absent_or_empty() {
        let p = BootParams::parse("console=ttyS0 boxlite.hostname= boxlite.log=");
        assert_eq!(p, BootParams::default());
        assert_eq!(p.hostname, DEFAULT_HOSTNAME);
    }

    #[test]
    fn bad_values_warn_and_keep_defaults() {
        let p = BootParams::parse("boxlite.hostname=-bad_name! boxlite.log boxlite.colour=red");
        assert_eq!(p.hostname, DEFAULT_HOSTNAME);
        assert_eq!(p.log, None);
        assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("boxlite.hostname"));
        assert!(p.warnings[1].contains("boxlite.log without a value"));
        assert!(p.warnings[2].contains("boxlite.colour"));
    }

    #[test]
    fn last_value_wins() {
        let p = BootParams::parse("boxlite.hostname=a boxlite.hostname=b");
        assert_eq!(p.hostname, "b");
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = BootParams::read(Path::new("/nonexistent/cmdline")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/cmdline"));
    }
}
