//! Throwaway network namespaces for tests that need root (the runtime's
//! pod networking, the agent's UpdateInterface / UpdateRoutes), made with
//! `ip` (fine in tests; the code under test speaks netlink).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Runs `args[0]` with the rest; panics with its stderr unless it succeeds;
/// returns its stdout.
pub fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A named netns (`ip netns add bxnet-<pid>-<n>[-<role>]`), deleted on drop
/// even if the test panics.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// A new namespace; `role` (may be empty) ends its name.
    pub fn add(role: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut name = format!("bxnet-{}-{n}", std::process::id());
        if !role.is_empty() {
            name = format!("{name}-{role}");
        }
        run(&["ip", "netns", "add", &name]);
        Netns { name }
    }

    /// Its file under /var/run/netns.
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`
    pub fn ip(&self, args: &[&str]) -> String {
        self.run_in("ip", args)
    }

    /// `tc -n <ns> <args>`
    pub fn tc(&self, args: &[&str]) -> String {
        self.run_in("tc", args)
    }

    fn run_in(&self, tool: &str, args: &[&str]) -> String {
        let mut all = vec![tool, "-n", &self.name];
        all.extend_from_slice(args);
        run(&all)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Best effort: the test may already have deleted it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
