//! runc's default HOME for a user the container's `/etc/passwd` does not
//! know.
//!
//! runc gives a process whose env has no (or an empty) `HOME` its user's
//! home from the container's `/etc/passwd`, and `/` when the uid has no
//! entry there. libcontainer does the first part itself (inside the
//! container, after pivot_root) but leaves `HOME` out for an unknown uid, so
//! a program run as `--user 4242` saw no `HOME` under BoxLite and `HOME=/`
//! under runc (found by tests/runc_differential.rs).
//!
//! The passwd file is the container's, i.e. written by whatever runs in it:
//! it is opened without following a final symlink and without blocking,
//! must be a regular file, and is read up to [`MAX_PASSWD_LEN`] bytes, so a
//! container cannot make the agent read `/dev/zero` or wait on a fifo.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// How much of a container's `/etc/passwd` is read.
pub const MAX_PASSWD_LEN: u64 = 1024 * 1024;

/// Sets `HOME=/` in `process`'s env when it has no non-empty `HOME` and its
/// uid has no entry in `<root>/etc/passwd` (`root`: the container's root as
/// the agent sees it). A passwd file that cannot be read counts as one
/// without the entry, as for runc.
pub fn runc_default_home(process: &mut oci_spec::runtime::Process, root: &Path) {
    let env = process.env().clone().unwrap_or_default();
    if env
        .iter()
        .any(|e| e.strip_prefix("HOME=").is_some_and(|v| !v.is_empty()))
    {
        return;
    }
    let uid = process.user().uid().to_string();
    let passwd = read_passwd(&root.join("etc/passwd")).unwrap_or_default();
    let known = passwd
        .lines()
        .any(|l| l.split(':').nth(2) == Some(uid.as_str()));
    if !known {
        let mut env: Vec<String> = env
            .into_iter()
            .filter(|e| !e.starts_with("HOME="))
            .collect();
        env.push("HOME=/".to_owned());
        process.set_env(Some(env));
    }
}

/// The first [`MAX_PASSWD_LEN`] bytes of a regular file, not through a
/// final symlink and without blocking on a fifo.
fn read_passwd(path: &Path) -> Option<String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut text = Vec::new();
    file.take(MAX_PASSWD_LEN).read_to_end(&mut text).ok()?;
    Some(String::from_utf8_lossy(&text).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(uid: u32, env: &[&str]) -> oci_spec::runtime::Process {
        let mut p = oci_spec::runtime::Process::default();
        p.set_user(oci_spec::runtime::User::default().set_uid(uid).clone());
        p.set_env(Some(env.iter().map(|e| e.to_string()).collect()));
        p
    }

    fn home(root: &Path, uid: u32, env: &[&str]) -> Vec<String> {
        let mut p = process(uid, env);
        runc_default_home(&mut p, root);
        p.env().clone().unwrap()
    }

    #[test]
    fn home_defaults_to_slash_for_a_uid_without_passwd_entry() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("etc")).unwrap();
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        // Known users: left to libcontainer (their passwd home), as is a set HOME.
        assert_eq!(home(root.path(), 1000, &["PATH=/bin"]), ["PATH=/bin"]);
        assert_eq!(home(root.path(), 4242, &["HOME=/data"]), ["HOME=/data"]);
        // Unknown uid: runc's default, also for an empty HOME.
        assert_eq!(
            home(root.path(), 4242, &["PATH=/bin"]),
            ["PATH=/bin", "HOME=/"]
        );
        assert_eq!(
            home(root.path(), 4242, &["HOME=", "A=b"]),
            ["A=b", "HOME=/"]
        );
    }

    /// A passwd the container planted as a symlink (here to a file that
    /// would list the uid), a fifo or a device is not read: the uid counts
    /// as unknown, and nothing blocks.
    #[test]
    fn a_planted_passwd_is_not_followed_or_waited_on() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc");
        std::fs::create_dir_all(&etc).unwrap();
        let elsewhere = root.path().join("elsewhere");
        std::fs::write(&elsewhere, "app:x:1000:1000::/home/app:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink(&elsewhere, etc.join("passwd")).unwrap();
        assert_eq!(home(root.path(), 1000, &[]), ["HOME=/"]);
        std::fs::remove_file(etc.join("passwd")).unwrap();
        nix::unistd::mkfifo(&etc.join("passwd"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert_eq!(home(root.path(), 1000, &[]), ["HOME=/"]);
    }
}
