//! Cleaning up after a crashed shim: the processes a sandbox directory's
//! pid files name, and the sockets left behind.

use std::path::Path;

/// After a crashed shim: kills every process recorded in a `*.pid` file of
/// `dir` that is still one of this sandbox's — its environment holds
/// `BOXLITE_SANDBOX_DIR=<dir>` as the runtime spawned it, or its command
/// line mentions `dir` — so a recycled pid is left alone; then removes the
/// pid files and every `*.sock` file. Returns the pids it killed. Logs and
/// skips what it cannot read.
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
                    if is_of_sandbox(pid, &needle) {
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

/// Whether process `pid` is one the runtime spawned for the sandbox in
/// directory `dir`: its environment has the exact entry
/// `BOXLITE_SANDBOX_DIR=<dir>`, or its command line mentions `dir`.
fn is_of_sandbox(pid: i32, dir: &str) -> bool {
    let entry = format!("{}={dir}", super::process::SANDBOX_DIR_ENV);
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    if environ.split(|b| *b == 0).any(|e| e == entry.as_bytes()) {
        return true;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains(dir)
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
        // Ours by its environment alone, as QEMU is (its arguments name
        // only fds).
        let mut by_env = std::process::Command::new("sleep")
            .arg("30")
            .env(crate::hypervisor::process::SANDBOX_DIR_ENV, dir.path())
            .spawn()
            .unwrap();
        let mut theirs = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // Another sandbox's, whose directory starts like ours.
        let mut other = std::process::Command::new("sleep")
            .arg("30")
            .env(
                crate::hypervisor::process::SANDBOX_DIR_ENV,
                format!("{}-other", dir.path().display()),
            )
            .spawn()
            .unwrap();
        // spawn() returns once the child is in exec, but the kernel lets the
        // parent go before it sets up the new argv: /proc/<pid>/cmdline
        // reads empty for a moment. Stale processes are long past that.
        wait_for_cmdline(ours.id(), &dir.path().to_string_lossy());
        std::fs::write(dir.path().join("ours.pid"), ours.id().to_string()).unwrap();
        std::fs::write(dir.path().join("theirs.pid"), theirs.id().to_string()).unwrap();
        std::fs::write(dir.path().join("env.pid"), by_env.id().to_string()).unwrap();
        std::fs::write(dir.path().join("other.pid"), other.id().to_string()).unwrap();
        std::fs::write(dir.path().join("garbage.pid"), "not a pid").unwrap();
        std::fs::write(dir.path().join("vsock.sock"), "").unwrap();
        std::fs::write(dir.path().join("console.log"), "kept").unwrap();

        let mut killed = cleanup_stale_processes(dir.path());
        killed.sort();
        let mut want = [ours.id(), by_env.id()];
        want.sort();
        assert_eq!(killed, want);
        assert!(ours.wait().unwrap().code().is_none());
        assert!(by_env.wait().unwrap().code().is_none());
        for p in [&mut theirs, &mut other] {
            assert!(p.try_wait().unwrap().is_none());
            p.kill().unwrap();
            p.wait().unwrap();
        }
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
