//! Fake binaries: shell scripts standing in for a VMM, QEMU, virtiofsd or a
//! hook, in a temp dir; and the checks the tests make around them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes an executable `#!/bin/sh` script `dir/name` running `body`.
pub fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

/// A temp dir for fake binaries and the files they write.
pub struct BinDir {
    tmp: tempfile::TempDir,
}

impl BinDir {
    pub fn new() -> Self {
        Self {
            tmp: tempfile::tempdir().unwrap(),
        }
    }

    /// The dir itself.
    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// `name` in the dir.
    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    /// An executable script `name` running `body` (see [`script`]).
    pub fn script(&self, name: &str, body: &str) -> PathBuf {
        script(self.tmp.path(), name, body)
    }

    /// A plain file `name` (say a kernel image nobody reads).
    pub fn file(&self, name: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, "x").unwrap();
        path
    }

    /// A helper that takes its socket path after `flag`, listens on it
    /// (and writes `<socket>.pid` when `pid_file`, as virtiofsd does) and
    /// sleeps.
    pub fn socket_helper(&self, name: &str, flag: &str, pid_file: bool) -> PathBuf {
        let pid = if pid_file { r#": > "$s.pid""# } else { "" };
        self.script(
            name,
            &format!(
                r#"while [ $# -gt 0 ]; do case "$1" in {flag}) shift; s="$1";; esac; shift; done
{pid}
{}"#,
                listen_and_sleep("$s")
            ),
        )
    }
}

/// A shell line that becomes a process listening on the unix socket
/// `path` (a shell word, such as `"$s"`) for 30 s: a helper's socket that a
/// runtime can connect to, as it does to hand the connection to QEMU.
pub fn listen_and_sleep(path: &str) -> String {
    format!(
        r#"exec /usr/bin/python3 -c 'import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(8)
time.sleep(30)' "{path}""#
    )
}

impl Default for BinDir {
    fn default() -> Self {
        Self::new()
    }
}

/// The sockets and pid files left in `dir` (none when it does not exist),
/// sorted.
pub fn leftovers(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .filter(|n| n.ends_with(".sock") || n.ends_with(".pid"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Whether `pid` is in /proc: reaped children are gone, a zombie would
/// still show up.
pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
