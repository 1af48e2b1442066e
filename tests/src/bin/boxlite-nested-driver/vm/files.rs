//! A scenario's files (VM config, guest console, VMM log), what the
//! scenarios read from them, and the tails printed with a verdict.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// Lines of the guest console / VMM log shown with a FAIL.
const CONSOLE_TAIL: usize = 60;
const VMM_LOG_TAIL: usize = 25;

/// A scenario's files: config, guest console, VMM log.
#[derive(Clone)]
pub struct VmFiles {
    pub dir: PathBuf,
    pub console: PathBuf,
    pub vmm_log: PathBuf,
}

impl VmFiles {
    pub fn in_dir(dir: &Path) -> VmFiles {
        VmFiles {
            dir: dir.to_owned(),
            console: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
        }
    }

    /// The VMM's control socket, when the VM serves one.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    pub fn console_text(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub fn console_line(&self, needle: &str) -> Option<String> {
        self.console_text()
            .lines()
            .find(|l| l.contains(needle))
            .map(|l| l.trim().to_owned())
    }

    pub fn vmm_log_line(&self, needle: &str) -> Option<String> {
        fs::read_to_string(&self.vmm_log)
            .ok()?
            .lines()
            .rev()
            .find(|l| l.contains(needle))
            .map(str::to_owned)
    }

    /// The guest clock (`[  secs.micros]` prefix) of the first console line
    /// containing `needle`.
    pub fn guest_time_of(&self, needle: &str) -> Option<f64> {
        let line = self.console_line(needle)?;
        let inner = line.strip_prefix('[')?.split(']').next()?;
        inner.trim().parse().ok()
    }

    pub fn print_tails(&self, scenario: &str) {
        let mut out = String::new();
        for (what, path, n) in [
            ("guest console", &self.console, CONSOLE_TAIL),
            ("boxlite-vmm log", &self.vmm_log, VMM_LOG_TAIL),
        ] {
            let text = fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(
                out,
                "  | --- {scenario}: {what} ({}), last {} of {} lines ---",
                path.display(),
                n.min(lines.len()),
                lines.len()
            );
            for l in &lines[lines.len().saturating_sub(n)..] {
                let _ = writeln!(out, "  | {l}");
            }
        }
        print!("{out}");
    }
}
