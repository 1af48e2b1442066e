//! The binary as the DaemonSet runs it: exit codes, the log on stdout,
//! errors on stderr, and `--wait` ending cleanly on SIGTERM.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_boxlite-node-installer");

fn fake_node(dir: &Path) {
    for (path, bytes) in [
        ("payload/bin/containerd-shim-boxlite-v2", "shim"),
        ("payload/share/vmlinux", "kernel"),
        ("payload/etc/boxlite.toml", "[guest]\n"),
        ("host/etc/containerd/config.toml", "version = 2\n"),
    ] {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

fn installer(dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .arg("--host-root")
        .arg(dir.join("host"))
        .args(["--no-restart", "--no-label"])
        .env_remove("NODE_NAME");
    cmd
}

#[test]
fn install_with_wait_stays_up_until_sigterm_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    fake_node(dir.path());
    let mut child = installer(dir.path(), &["install", "--wait"])
        .arg("--payload")
        .arg(dir.path().join("payload"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let waiting = line.ends_with("done; waiting for SIGTERM");
        seen.push(line);
        if waiting {
            break;
        }
    }
    assert!(
        seen.iter()
            .any(|l| l == "boxlite-node-installer: install complete"),
        "{seen:?}"
    );
    // Still running: --wait did not return on its own.
    assert!(child.try_wait().unwrap().is_none(), "{seen:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    // Killed by the signal would be "no exit code"; sigwait makes it exit 0.
    assert_eq!(status.code(), Some(0), "{status:?}");
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    assert_eq!(rest, ["boxlite-node-installer: SIGTERM: exiting"]);
}

#[test]
fn an_error_exits_1_with_the_cause_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    fake_node(dir.path());
    let config = dir.path().join("host/etc/containerd/config.toml");
    std::fs::write(&config, "version = 1\n").unwrap();
    let out = installer(dir.path(), &["install"])
        .arg("--payload")
        .arg(dir.path().join("payload"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        format!(
            "boxlite-node-installer: error: containerd config {}: version = 1 is not supported \
             (containerd 1.6+ writes version 2, containerd 2.x version 3)\n",
            config.display()
        )
    );
}

#[test]
fn labelling_without_a_node_name_is_refused_before_anything_is_done() {
    let dir = tempfile::tempdir().unwrap();
    fake_node(dir.path());
    let out = Command::new(BIN)
        .args(["install", "--no-restart", "--host-root"])
        .arg(dir.path().join("host"))
        .arg("--payload")
        .arg(dir.path().join("payload"))
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("node name unknown: pass --node or set NODE_NAME"),
        "{stderr}"
    );
    assert!(!dir.path().join("host/opt/boxlite").exists());
}

#[test]
fn usage_errors_exit_2() {
    let out = Command::new(BIN).arg("reinstall").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("boxlite-node-installer: unknown subcommand \"reinstall\"\n\nusage:"),
        "{stderr}"
    );
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stdout).unwrap().starts_with("usage:"));
}
