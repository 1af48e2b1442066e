//! The end of a log file, for error reports: the last lines a crashed VMM,
//! helper or guest console, or a failed kernel build, wrote. The one
//! log-tail reader of the project: the runtime's backends (the last line of
//! a helper's log), the shim (the console tail it keeps after the sandbox
//! directory is gone), xtask (a kernel build's log) and the tests use it.
//! It lives here, in the crate every other one already depends on, because
//! it needs nothing but std.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of the end of a log is read: enough for dozens of lines, and a
/// gigabyte of console output is never read whole.
const TAIL_BYTES: u64 = 16 * 1024;
/// A last line longer than this is cut (a guest can print anything).
const MAX_LAST_LINE_CHARS: usize = 300;

/// The last `max_lines` non-empty lines of `log` (from its last 16 KiB),
/// trailing whitespace trimmed, in order; `None` when the file is missing,
/// unreadable or holds only blank lines.
pub fn log_tail(log: &Path, max_lines: usize) -> Option<String> {
    let text = read_end(log, TAIL_BYTES)?;
    let mut lines: Vec<&str> = text
        .lines()
        .rev()
        .map(str::trim_end)
        .filter(|l| !l.is_empty())
        .take(max_lines)
        .collect();
    if lines.is_empty() {
        return None;
    }
    lines.reverse();
    Some(lines.join("\n"))
}

/// The last non-empty line of `log`, trimmed, at most 300 characters.
pub fn last_line(log: &Path) -> Option<String> {
    let line = log_tail(log, 1)?;
    Some(line.trim().chars().take(MAX_LAST_LINE_CHARS).collect())
}

/// The last `max` bytes of `path`, read by seeking, not by reading it all.
fn read_end(path: &Path, max: u64) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    file.seek(SeekFrom::Start(len.saturating_sub(max))).ok()?;
    let mut buf = Vec::new();
    file.read_to_end(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_last_non_empty_lines_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        assert_eq!(log_tail(&log, 3), None, "missing file");
        std::fs::write(&log, "").unwrap();
        assert_eq!(log_tail(&log, 3), None, "empty file");
        std::fs::write(&log, "one\ntwo\n\nthree  \nfour\n\n").unwrap();
        assert_eq!(log_tail(&log, 3).as_deref(), Some("two\nthree\nfour"));
        assert_eq!(log_tail(&log, 10).as_deref(), Some("one\ntwo\nthree\nfour"));
        std::fs::write(&log, format!("first\n  {}  \n\n", "x".repeat(400))).unwrap();
        assert_eq!(last_line(&log), Some("x".repeat(300)));
    }

    #[test]
    fn only_the_end_of_a_big_log_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("big.log");
        let mut text = "early line\n".repeat(10_000);
        text.push_str("the end\n");
        std::fs::write(&log, text).unwrap();
        let tail = log_tail(&log, 100_000).unwrap();
        assert!(tail.ends_with("the end"), "{tail}");
        assert!(tail.len() <= TAIL_BYTES as usize, "{}", tail.len());
    }
}
