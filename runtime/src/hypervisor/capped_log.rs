//! Size-capped logs for everything a sandbox's processes print: the guest
//! console and the stdout/stderr of the VMM, the vsock backend and each
//! virtiofsd.
//!
//! The guest can make any of them print without end (a console flood, a
//! stream of bad descriptors the VMM warns about), and the logs live on
//! `/run`, which is host RAM. So no process writes its log file itself: it
//! writes into a pipe, and a pump thread in the shim copies the pipe into a
//! [`CappedLog`], which never lets the file grow past its cap. When an
//! append would pass the cap, the older half is dropped and a marker line
//! says how much; the newest output is always at the end of the file, so
//! readers take the tail by seeking ([`boxlite_protocol::log_tail`]).
//! Compacting in place, rather than rotating to a second file, keeps one
//! file per log and needs no rename in a directory a jailed VMM could race.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// The smallest cap accepted: room for a marker line and some output.
pub const MIN_LOG_CAP: u64 = 16 * 1024;

/// A log file kept at most `cap` bytes long.
#[derive(Debug)]
pub struct CappedLog {
    file: File,
    path: PathBuf,
    /// Bytes in the file now.
    len: u64,
    cap: u64,
    /// Bytes dropped so far, for the marker line.
    dropped: u64,
    /// The length of the marker line at the start of the file (0: none).
    marker_len: u64,
}

impl CappedLog {
    /// Creates (or truncates) `path`, mode 0600, holding at most `cap`
    /// bytes (at least [`MIN_LOG_CAP`]).
    pub fn create(path: &Path, cap: u64) -> std::io::Result<CappedLog> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        Ok(CappedLog {
            file,
            path: path.to_owned(),
            len: 0,
            cap: cap.max(MIN_LOG_CAP),
            dropped: 0,
            marker_len: 0,
        })
    }

    /// Appends `buf`, first dropping the older half of the file when it
    /// would pass its cap. Of a single write longer than half the cap only
    /// the end is kept.
    pub fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let half = self.cap / 2;
        let skipped = (buf.len() as u64).saturating_sub(half);
        let data = &buf[skipped as usize..];
        if skipped > 0 || self.len + data.len() as u64 > self.cap {
            self.dropped += skipped;
            self.compact(data.len() as u64)?;
        }
        self.file.write_all_at(data, self.len)?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Rewrites the file as a marker line and its newest content (from a
    /// line start where there is one), leaving room for `incoming` bytes
    /// (at most half the cap) within the cap.
    fn compact(&mut self, incoming: u64) -> std::io::Result<()> {
        let keep_len = (self.len - self.marker_len).min(self.cap / 2 - incoming);
        let mut kept = vec![0u8; keep_len as usize];
        self.file.read_exact_at(&mut kept, self.len - keep_len)?;
        let from = match kept.iter().position(|&b| b == b'\n') {
            Some(nl) if nl + 1 < kept.len() => nl + 1,
            _ => 0,
        };
        let kept = &kept[from..];
        self.dropped += self.len - self.marker_len - kept.len() as u64;
        let marker = format!(
            "[boxlite: {} earlier bytes of this log dropped to keep it under {} KiB]\n",
            self.dropped,
            self.cap / 1024
        );
        self.file.write_all_at(marker.as_bytes(), 0)?;
        self.file.write_all_at(kept, marker.len() as u64)?;
        self.marker_len = marker.len() as u64;
        self.len = self.marker_len + kept.len() as u64;
        self.file.set_len(self.len)
    }
}

/// A pipe whose read end a pump thread copies into a [`CappedLog`]. Give
/// [`LogPipe::writer`] to the process (as its stdout/stderr, or an fd it
/// inherits); the pump ends when every copy of it is closed.
#[derive(Debug)]
pub struct LogPipe {
    writer: OwnedFd,
    done: mpsc::Receiver<()>,
}

impl LogPipe {
    /// Creates `path` (see [`CappedLog::create`]) and starts its pump.
    pub fn create(path: &Path, cap: u64) -> std::io::Result<LogPipe> {
        let mut log = CappedLog::create(path, cap)?;
        let (reader, writer) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let (tx, done) = mpsc::channel();
        let name = format!(
            "log-{}",
            path.file_name().unwrap_or_default().to_string_lossy()
        );
        std::thread::Builder::new().name(name).spawn(move || {
            pump(File::from(reader), &mut log);
            let _ = tx.send(());
        })?;
        Ok(LogPipe { writer, done })
    }

    /// The write end, for the process.
    pub fn writer(&self) -> &OwnedFd {
        &self.writer
    }

    /// Closes our write end and returns a handle that waits for the pump.
    pub fn into_drain(self) -> LogDrain {
        LogDrain { done: self.done }
    }
}

/// The pump of a [`LogPipe`] after the process got the write end.
#[derive(Debug)]
pub struct LogDrain {
    done: mpsc::Receiver<()>,
}

impl LogDrain {
    /// Waits up to `limit` for the pump to have copied everything (it ends
    /// once the process and anything it forked have closed the pipe).
    /// Returns whether it did.
    pub fn wait(&self, limit: Duration) -> bool {
        !matches!(
            self.done.recv_timeout(limit),
            Err(mpsc::RecvTimeoutError::Timeout)
        )
    }
}

/// Copies `reader` into `log` until end of file. A write error (the disk
/// full) drops that chunk but keeps reading, so the writer never blocks on
/// a full pipe.
fn pump(mut reader: File, log: &mut CappedLog) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut warned = false;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(log = %log.path.display(), error = %e, "cannot read a process's output; its log ends here");
                return;
            }
        };
        if let Err(e) = log.append(&buf[..n]) {
            if !warned {
                tracing::warn!(log = %log.path.display(), error = %e, "cannot write the log; output dropped");
                warned = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn read(path: &Path) -> String {
        String::from_utf8(std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn below_the_cap_everything_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        let mut log = CappedLog::create(&path, 64 * 1024).unwrap();
        log.append(b"one\n").unwrap();
        log.append(b"two\n").unwrap();
        assert_eq!(read(&path), "one\ntwo\n");
    }

    #[test]
    fn a_flood_never_passes_the_cap_and_the_newest_lines_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flood.log");
        let cap = 32 * 1024;
        let mut log = CappedLog::create(&path, cap).unwrap();
        for i in 0..20_000 {
            log.append(format!("line {i}\n").as_bytes()).unwrap();
            assert!(
                std::fs::metadata(&path).unwrap().len() <= cap,
                "at line {i}"
            );
        }
        let text = read(&path);
        assert!(text.starts_with("[boxlite: "), "{}", &text[..80]);
        assert!(text.ends_with("line 19998\nline 19999\n"));
        // Whole lines after the marker, consecutive up to the end.
        let lines: Vec<&str> = text.lines().skip(1).collect();
        let first: usize = lines[0].strip_prefix("line ").unwrap().parse().unwrap();
        for (k, l) in lines.iter().enumerate() {
            assert_eq!(*l, format!("line {}", first + k));
        }
        // The marker counts exactly what is gone.
        let total: u64 = (0..20_000)
            .map(|i| format!("line {i}\n").len() as u64)
            .sum();
        let dropped = total - text.len() as u64 + text.lines().next().unwrap().len() as u64 + 1;
        assert!(
            text.starts_with(&format!("[boxlite: {dropped} earlier bytes")),
            "{dropped}"
        );
    }

    #[test]
    fn one_write_bigger_than_the_cap_keeps_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        let cap = MIN_LOG_CAP;
        let mut log = CappedLog::create(&path, cap).unwrap();
        log.append(b"before\n").unwrap();
        let mut big = vec![b'x'; 3 * cap as usize];
        big.extend_from_slice(b"\nthe end\n");
        log.append(&big).unwrap();
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(len <= cap, "{len}");
        let text = read(&path);
        assert!(!text.contains("before"));
        assert!(text.ends_with("x\nthe end\n"));
    }

    #[test]
    fn a_tiny_cap_is_raised_to_the_minimum() {
        let dir = tempfile::tempdir().unwrap();
        let log = CappedLog::create(&dir.path().join("t.log"), 10).unwrap();
        assert_eq!(log.cap, MIN_LOG_CAP);
    }

    #[test]
    fn the_pump_copies_a_pipe_until_every_writer_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.log");
        let pipe = LogPipe::create(&path, 64 * 1024).unwrap();
        let mut w = File::from(pipe.writer().try_clone().unwrap());
        let drain = pipe.into_drain();
        w.write_all(b"hello\n").unwrap();
        assert!(!drain.wait(Duration::from_millis(50)), "a writer is open");
        drop(w);
        assert!(drain.wait(Duration::from_secs(5)));
        assert_eq!(read(&path), "hello\n");
    }

    #[test]
    fn a_child_flooding_its_stdout_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("child.log");
        let cap = 64 * 1024;
        let pipe = LogPipe::create(&path, cap).unwrap();
        let out = File::from(pipe.writer().try_clone().unwrap());
        let mut child = std::process::Command::new("sh")
            .args(["-c", "yes flood | head -c 4000000; echo; echo last line"])
            .stdout(out)
            .spawn()
            .unwrap();
        let drain = pipe.into_drain();
        assert!(child.wait().unwrap().success());
        assert!(drain.wait(Duration::from_secs(10)));
        assert!(std::fs::metadata(&path).unwrap().len() <= cap);
        assert!(read(&path).ends_with("\nlast line\n"));
    }
}
