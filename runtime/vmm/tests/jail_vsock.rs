//! The jail of the `boxlite-vsock` binary (the qemu backend's vhost-user
//! vsock backend), seen from outside (root): every escape the
//! `--test-escape` hook tries, on the main thread and on a thread made
//! after the jail (as the vhost-user threads are), is denied; the serving
//! process runs as the jail uid with no capabilities, `no_new_privs`,
//! seccomp and namespaces of its own, still answers host clients on its
//! hybrid socket, and ends on the SIGTERM the process the runtime tracks
//! passes on. The data
//! path under the jail is the qemu backend's end-to-end suite (every VM
//! there runs this binary jailed).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use boxlite_vmm::config::{EscapeProbe, JailUser};

mod common;
use common::{assert_jailed, jailed_child, EscapeTargets};

const UID: u32 = 4_000_223;
const GID: u32 = 4_000_224;

fn command(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_boxlite-vsock"));
    cmd.arg("--guest-cid")
        .arg("3")
        .arg("--socket")
        .arg(dir.join("vhost-vsock.sock"))
        .arg("--uds-path")
        .arg(dir.join("vsock.sock"))
        .arg("--jail-user")
        .arg(format!("{UID}:{GID}"));
    cmd
}

fn try_escape(dir: &Path, probe: &EscapeProbe) -> (ExitStatus, String) {
    let out = command(dir)
        .arg("--test-escape")
        .arg(serde_json::to_string(probe).expect("probe json"))
        .output()
        .expect("run boxlite-vsock");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs root"]
fn every_escape_from_the_vsock_jail_is_denied() {
    let targets = EscapeTargets::new();
    let dir = tempfile::tempdir().expect("tempdir");
    for probe in &targets.probes(dir.path()) {
        let (st, log) = try_escape(dir.path(), probe);
        let what = format!("{probe:?}: {st:?}\n{log}");
        assert!(!log.contains("escape was allowed"), "{what}");
        // Denied with an error on both threads, or the process killed by
        // seccomp (the waiting parent re-raises the signal).
        let denied = st.code() == Some(0) && log.matches("escape denied").count() == 2;
        assert!(denied || st.signal() == Some(libc::SIGSYS), "{what}");
        assert!(log.contains("jail applied"), "{what}");
    }
    targets.assert_untouched(dir.path());
}

#[test]
#[ignore = "needs root"]
fn the_vsock_backend_serves_unprivileged_in_namespaces_of_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut parent = command(dir.path())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let child = jailed_child(parent.id());
    assert_jailed(child, JailUser { uid: UID, gid: GID });

    // Jailed, it still serves host clients on its hybrid socket: a line
    // that is not `CONNECT <port>` is answered by closing the connection
    // (end of file, not a timeout).
    let mut client = UnixStream::connect(dir.path().join("vsock.sock")).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    client.write_all(b"HELLO\n").expect("write");
    let mut line = String::new();
    let read = BufReader::new(&client).read_line(&mut line);
    assert_eq!(read.ok(), Some(0), "{line:?}");
    assert_eq!(
        parent.try_wait().expect("wait"),
        None,
        "a host client does not end it"
    );

    // SIGTERM to the tracked process ends both: the parent forwards it
    // and the jailed one, init of its pid namespace, handles it.
    // SAFETY: integers only.
    assert_eq!(unsafe { libc::kill(parent.id() as i32, libc::SIGTERM) }, 0);
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = parent.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < end, "SIGTERM did not end the backend");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status:?}");
    let end = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{child}")).exists()
        && !std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| s.contains(") Z "))
    {
        assert!(
            Instant::now() < end,
            "jailed process {child} outlived its parent"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
