//! Ending the guest: stopping every process, syncing, rebooting.
//!
//! The VM ends by rebooting: QEMU runs with `-no-reboot` and the kernel with
//! `reboot=t`, so a reboot makes the VMM process exit. PID 1 must never
//! exit or panic (the kernel would panic), so fatal errors also end here.

use std::io::Write;
use std::time::Duration;

use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Grace period between SIGTERM and SIGKILL when the request names none.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest grace period a request may ask for.
pub const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long processes get to disappear after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(2);
const POLL: Duration = Duration::from_millis(50);
/// task_struct flag of kernel threads (include/linux/sched.h).
const PF_KTHREAD: u64 = 0x0020_0000;

#[derive(Debug, thiserror::Error)]
pub enum PowerError {
    #[error("{count} processes survived SIGKILL: {pids:?}")]
    Survivors { count: usize, pids: Vec<i32> },
}

/// Sends SIGTERM to every process but the agent, waits up to `timeout`
/// for them to go, then SIGKILLs the rest. Exited children are collected by
/// the reaper meanwhile, so it must be running.
pub async fn stop_all_processes(timeout: Duration) -> Result<(), PowerError> {
    let before = user_processes();
    if before.is_empty() {
        return Ok(());
    }
    tracing::info!(
        count = before.len(),
        ?timeout,
        "sending SIGTERM to all processes"
    );
    // pid -1: every process the caller may signal except itself (and init).
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    if wait_gone(timeout).await {
        return Ok(());
    }
    let left = user_processes();
    tracing::warn!(count = left.len(), pids = ?left, "processes ignored SIGTERM; sending SIGKILL");
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    if wait_gone(KILL_WAIT).await {
        return Ok(());
    }
    let pids = user_processes();
    Err(PowerError::Survivors {
        count: pids.len(),
        pids,
    })
}

async fn wait_gone(timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if user_processes().is_empty() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Live (non-zombie) user-space processes other than this one.
pub fn user_processes() -> Vec<i32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me && pid != 1)
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
                .is_some_and(|(state, flags)| state != 'Z' && flags & PF_KTHREAD == 0)
        })
        .filter_map(|pid| i32::try_from(pid).ok())
        .collect();
    pids.sort_unstable();
    pids
}

/// State and flags from `/proc/<pid>/stat` (the command name may hold
/// spaces and parentheses, so fields are counted after the last `)`).
fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After state: ppid pgrp session tty_nr tpgid flags.
    let flags = fields.nth(5)?.parse().ok()?;
    Some((state, flags))
}

/// Flushes filesystem buffers and reboots, which ends the VM. Never returns:
/// if the reboot itself fails, PID 1 parks forever rather than exit.
pub fn reboot_now() -> ! {
    nix::unistd::sync();
    let err = reboot(RebootMode::RB_AUTOBOOT).err();
    console(&format!(
        "boxlite-agent: reboot failed ({}); halting here",
        err.map(|e| e.to_string()).unwrap_or_default()
    ));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// For errors PID 1 cannot live with: says so loudly on the console (and in
/// the log), then reboots.
pub fn fatal(message: &str) -> ! {
    tracing::error!("FATAL: {message}; rebooting");
    console(&format!(
        "\n*** boxlite-agent FATAL: {message}\n*** rebooting the VM\n"
    ));
    reboot_now()
}

/// Writes straight to stderr (the console), bypassing the logger.
pub fn console(message: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{message}");
    let _ = err.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat() {
        let stat = "42 (a (weird) name) S 1 42 42 0 -1 4194560 100 0 0 0";
        assert_eq!(parse_stat(stat), Some(('S', 4_194_560)));
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0";
        let (_, flags) = parse_stat(kthread).unwrap();
        assert_ne!(flags & PF_KTHREAD, 0);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn lists_processes_but_not_itself() {
        let me = i32::try_from(std::process::id()).unwrap();
        assert!(!user_processes().contains(&me));
    }
}
