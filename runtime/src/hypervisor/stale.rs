//! Cleaning up after a crashed shim: the processes a sandbox directory's
//! pid files name, and the sockets left behind.

use std::path::Path;

/// After a crashed shim: kills every process recorded in a `*.pid` file of
/// `dir` whose command line still mentions `dir` (so a recycled pid is left
/// alone), then removes the pid files and every `*.sock` file. Returns the
/// pids it killed. Logs and skips what it cannot read.
pub fn cleanup_stale_processes(dir: &Path) -> Vec<u32> {
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return killed;
    };
    let needle = dir.to_string_lossy().into_owned();
    for entry in entries.flatten() {
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str());
        match ext {
            Some("pid") => {
                let pid = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    .filter(|p| *p > 1);
                if let Some(pid) = pid {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    if cmdline.contains(needle.as_str()) {
                        // A jailed boxlite-vmm's VM runs in its child.
                        super::process::kill_children(pid.unsigned_abs());
                        let target = nix::unistd::Pid::from_raw(pid);
                        match nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL) {
                            Ok(()) => killed.push(pid.unsigned_abs()),
                            Err(e) => tracing::warn!(pid, error = %e, "cannot kill stale process"),
                        }
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
            Some("sock") => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::time::Duration;

    #[test]
    fn stale_cleanup_kills_only_our_processes() {
        let dir = tempfile::tempdir().unwrap();
        // A process that mentions the dir, one that does not.
        // argv[0] carries the dir, as our helpers carry it in their arguments.
        let mut ours = std::process::Command::new("sleep")
            .arg0(dir.path().join("sleep"))
            .arg("30")
            .spawn()
            .unwrap();
        let mut theirs = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // spawn() returns once the child is in exec, but the kernel lets the
        // parent go before it sets up the new argv: /proc/<pid>/cmdline
        // reads empty for a moment. Stale processes are long past that.
        wait_for_cmdline(ours.id(), &dir.path().to_string_lossy());
        std::fs::write(dir.path().join("ours.pid"), ours.id().to_string()).unwrap();
        std::fs::write(dir.path().join("theirs.pid"), theirs.id().to_string()).unwrap();
        std::fs::write(dir.path().join("garbage.pid"), "not a pid").unwrap();
        std::fs::write(dir.path().join("vsock.sock"), "").unwrap();
        std::fs::write(dir.path().join("console.log"), "kept").unwrap();

        let killed = cleanup_stale_processes(dir.path());
        assert_eq!(killed, [ours.id()]);
        assert!(ours.wait().unwrap().code().is_none());
        assert!(theirs.try_wait().unwrap().is_none());
        theirs.kill().unwrap();
        theirs.wait().unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["console.log"]);
    }

    fn wait_for_cmdline(pid: u32, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid}: cmdline never showed {needle}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
