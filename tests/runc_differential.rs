//! Real workloads behave as under runc: each case runs the same container
//! (same image, same ctr options, same command) under containerd's runc
//! shim and under BoxLite, in one private containerd 1.6, and compares what
//! a user sees — stdout, stderr, exit code of every step — after the
//! expected differences (`boxlite_tests::differential::EXPECTED_DIFFERENCES`,
//! docs/shim.md "Differences from runc") are normalised away. Anything
//! else that differs fails the test, printed as a diff (runc `-`, BoxLite
//! `+`).
//!
//! The image is Debian 12 with python3, built from Debian packages by
//! mmdebstrap and cached (`boxlite_tests::debian_image`; the first run
//! builds it, about two minutes). The probes are Python scripts in
//! `tests/differential/`.
//!
//! `#[ignore]`d: they need root, containerd, ctr, runc, QEMU, virtiofsd,
//! boxlite-vsock, mmdebstrap (and the Debian mirror, for the first build)
//! and the guest assets. Build the shim and `cargo xtask guest` first, then:
//!
//! ```text
//! cargo test -p boxlite-tests --test runc_differential -- --ignored --test-threads=1
//! ```

use std::path::Path;

use boxlite_tests::containerd::{text, Containerd};
use boxlite_tests::debian_image::{
    debian_image_archive, DEBIAN_APP_IMAGE, DEBIAN_IMAGE, DEBIAN_UID_IMAGE,
};
use boxlite_tests::differential::{Outcome, Report, Side};
use boxlite_tests::oci_image::sha256;

const PROBE: &str = include_str!("differential/probe.py");
const WORKLOADS: &str = include_str!("differential/workloads.py");

/// A private containerd with the Debian images imported.
fn containerd() -> Containerd {
    let archive = debian_image_archive();
    let c = Containerd::start();
    let out = c.ctr(&["image", "import", archive.to_str().unwrap()]);
    assert!(out.status.success(), "import: {}", text(&out.stderr));
    c
}

/// `python3 -c <probe> sections…`.
fn probe<'a>(sections: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["python3", "-c", PROBE];
    args.extend_from_slice(sections);
    args
}

/// A host directory for one side's volume, empty, under the containerd's
/// temp dir (removed with it).
fn host_dir(side: &Side, name: &str) -> std::path::PathBuf {
    let dir = side
        .c
        .dir
        .path()
        .join("volumes")
        .join(side.runtime.label())
        .join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// What the host sees in a directory afterwards: names, sizes, owners,
/// modes (one step of the transcript).
fn host_view(dir: &Path) -> Outcome {
    use std::os::unix::fs::MetadataExt;
    let mut entries: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            // The content as the host reads it back, for files.
            let digest = if m.is_file() {
                format!(" sha256 {}", sha256(&e.path()))
            } else {
                String::new()
            };
            format!(
                "{} size {} owner {}:{} mode {:o}{digest}",
                e.file_name().to_string_lossy(),
                m.len(),
                m.uid(),
                m.gid(),
                m.mode()
            )
        })
        .collect();
    entries.sort();
    Outcome {
        code: Some(0),
        stdout: entries.join("\n") + "\n",
        stderr: String::new(),
    }
}

/// Python doing real work on the Debian image: an HTTP server and client
/// on localhost (IPv4 and IPv6), a multiprocessing pool, lock, semaphore
/// and shared memory (/dev/shm), sqlite3 in WAL mode, 64 MiB written to
/// /tmp and to a rw bind volume (read back, and seen by the host), threads;
/// as the init and as a `ctr task exec`.
#[test]
#[ignore = "needs root, containerd, ctr, runc, QEMU, virtiofsd, boxlite-vsock, mmdebstrap and the guest assets"]
fn python_workloads() {
    let workloads = [
        "python3",
        "-c",
        WORKLOADS,
        "http",
        "multiprocessing",
        "sqlite",
        "threads",
        "write:/tmp:64",
        "write:/data:64",
    ];
    let c = containerd();
    let mut report = Report::new(&c);
    report.case("python workloads", |side| {
        let vol = host_dir(side, "data");
        let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
        side.run(
            "workloads",
            &["--mount", &mount],
            DEBIAN_IMAGE,
            "py1",
            &workloads,
        );
        side.record("host view of /data", host_view(&vol));
    });
    // The same programs as an exec into a running container (its own
    // process, joined to the init's namespaces and cgroup).
    report.case("python workloads, exec", |side| {
        let vol = host_dir(side, "data-exec");
        let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", vol.display());
        side.start_detached(
            &["--mount", &mount],
            DEBIAN_IMAGE,
            "py2",
            &["sleep", "infinity"],
        );
        side.exec("workloads", "py2", &[], &workloads);
        side.remove("py2");
        side.record("host view of /data", host_view(&vol));
    });
    report.finish();
    c.assert_nothing_left();
}

/// What a process sees of its container: identity, environment, working
/// directory, umask, capabilities, NoNewPrivs and seccomp, rlimits, the
/// image's /etc/hosts, hostname and resolv.conf, /dev and its modes, masked
/// and read-only /proc paths, mounts; for the init (`ctr run`) and for
/// `ctr task exec` into a running container (with `--cwd`).
#[test]
#[ignore = "needs root, containerd, ctr, runc, QEMU, virtiofsd, boxlite-vsock, mmdebstrap and the guest assets"]
fn process_view() {
    let c = containerd();
    let mut report = Report::new(&c);
    let all = [
        "identity", "status", "limits", "files", "dev", "proc", "mounts", "kernel", "seccomp",
    ];
    report.case("init process", |side| {
        side.run(
            "probe",
            &["--env", "DIFFTEST=a value with spaces", "--cwd", "/usr/lib"],
            DEBIAN_IMAGE,
            "view1",
            &probe(&all),
        );
    });
    report.case("exec process", |side| {
        side.start_detached(&[], DEBIAN_IMAGE, "view2", &["sleep", "infinity"]);
        side.exec("probe", "view2", &[], &probe(&all));
        side.exec(
            "probe --cwd",
            "view2",
            &["--cwd", "/var"],
            &probe(&["identity"]),
        );
        side.remove("view2");
    });
    report.finish();
    c.assert_nothing_left();
}

/// Security options of `ctr run`: the default seccomp profile, capabilities
/// added and dropped, `--allow-new-privs`; as the init and in an exec.
#[test]
#[ignore = "needs root, containerd, ctr, runc, QEMU, virtiofsd, boxlite-vsock, mmdebstrap and the guest assets"]
fn security_options() {
    let c = containerd();
    let mut report = Report::new(&c);
    report.case("seccomp and capabilities", |side| {
        side.run(
            "default profile, caps changed",
            &[
                "--seccomp",
                "--cap-drop",
                "CAP_CHOWN",
                "--cap-add",
                "CAP_NET_ADMIN",
            ],
            DEBIAN_IMAGE,
            "sec1",
            &probe(&["status", "seccomp"]),
        );
        side.start_detached(
            &["--allow-new-privs", "--cap-add", "CAP_SYS_ADMIN"],
            DEBIAN_IMAGE,
            "sec2",
            &["sleep", "infinity"],
        );
        side.exec(
            "new privs allowed",
            "sec2",
            &[],
            &probe(&["status", "seccomp"]),
        );
        side.exec(
            "chown and a mount",
            "sec2",
            &[],
            &[
                "bash",
                "-c",
                "chown 1000:1000 /tmp && stat -c %u:%g /tmp; \
                 mkdir -p /mnt/t && mount -t tmpfs -o size=1m t /mnt/t && echo mounted",
            ],
        );
        side.remove("sec2");
    });
    report.finish();
    c.assert_nothing_left();
}

/// Users and groups: the image's `User` (uid, primary and supplementary
/// groups resolved from its /etc/passwd and /etc/group by containerd),
/// `ctr task exec --user` by name and by number, NSS lookups (getent, id,
/// whoami) and the owner of files created in a rw volume.
#[test]
#[ignore = "needs root, containerd, ctr, runc, QEMU, virtiofsd, boxlite-vsock, mmdebstrap and the guest assets"]
fn users_and_groups() {
    let c = containerd();
    let mut report = Report::new(&c);
    report.case("image user", |side| {
        let vol = host_dir(side, "home");
        std::fs::set_permissions(&vol, std::os::unix::fs::PermissionsExt::from_mode(0o777))
            .unwrap();
        let mount = format!("type=bind,src={},dst=/vol,options=rbind:rw", vol.display());
        side.run(
            "probe as app",
            &["--mount", &mount],
            DEBIAN_APP_IMAGE,
            "user1",
            &[
                "bash",
                "-c",
                &format!(
                    "python3 -c '{}' identity status; id; whoami; getent passwd app; \
                     getent group difftest; touch /vol/by-app; mkdir /vol/dir-by-app; \
                     touch /root/x; echo \"touch /root: $?\"",
                    PROBE.replace('\'', "'\\''")
                ),
            ],
        );
        side.record("host view of the volume", host_view(&vol));
    });
    report.case("image user without passwd entry", |side| {
        side.run(
            "probe as 4242",
            &[],
            DEBIAN_UID_IMAGE,
            "user3",
            &probe(&["identity", "status"]),
        );
    });
    report.case("exec users", |side| {
        side.start_detached(&[], DEBIAN_IMAGE, "user2", &["sleep", "infinity"]);
        for user in ["app", "1001", "worker", "1000:1500", "nobody", "4242"] {
            side.exec(
                &format!("--user {user}"),
                "user2",
                &["--user", user],
                &probe(&["identity", "status"]),
            );
        }
        side.exec(
            "id and whoami as worker",
            "user2",
            &["--user", "worker"],
            &["bash", "-c", "id; whoami; id app; getent passwd worker"],
        );
        side.remove("user2");
    });
    report.finish();
    c.assert_nothing_left();
}

/// Signals and exit codes: SIGTERM to a PID 1 that traps it, a PID 1
/// without a handler ignoring SIGTERM then dying of SIGKILL (137), a
/// handler that carries on (SIGUSR1), exit codes 0–255 of the init and of
/// execs, execs killed by a signal (128 + signal, from inside and from
/// `ctr task kill --exec-id`).
#[test]
#[ignore = "needs root, containerd, ctr, runc, QEMU, virtiofsd, boxlite-vsock, mmdebstrap and the guest assets"]
fn signals_and_exit_codes() {
    let c = containerd();
    let mut report = Report::new(&c);
    let limit = std::time::Duration::from_secs(120);
    report.case("PID 1 traps SIGTERM", |side| {
        let init = side.spawn_run(
            &[],
            DEBIAN_IMAGE,
            "sig1",
            &[
                "bash",
                "-c",
                // No output after the USR1 handler but its own: if USR1
                // lands just before `wait` starts, bash runs the handler
                // and then waits the whole 600 s, so a line printed after
                // `wait` would come on one side and not on the other.
                "trap 'echo got TERM; exit 42' TERM; \
                 trap 'echo got USR1' USR1; echo ready; \
                 while :; do sleep 600 & wait $!; done",
            ],
        );
        init.wait_for_line("ready", limit);
        side.kill("sig1", None, "SIGUSR1");
        // The shell carries on after the USR1 handler: the TERM handler
        // below still runs and sets the exit code.
        init.wait_for_line("got USR1", limit);
        side.kill("sig1", None, "SIGTERM");
        side.finish("init", init);
    });
    report.case("PID 1 without handlers", |side| {
        let init = side.spawn_run(
            &[],
            DEBIAN_IMAGE,
            "sig2",
            &["bash", "-c", "echo ready; exec sleep infinity"],
        );
        init.wait_for_line("ready", limit);
        // PID 1 of a pid namespace gets no signal it has no handler for:
        // SIGTERM and SIGINT change nothing, SIGKILL (from outside) ends it.
        side.kill("sig2", None, "SIGTERM");
        side.kill("sig2", None, "SIGINT");
        side.exec("still running", "sig2", &[], &["echo", "alive"]);
        side.kill("sig2", None, "SIGKILL");
        side.finish("init", init);
    });
    report.case("init exit codes", |side| {
        for code in ["0", "3", "255"] {
            side.run(
                &format!("exit {code}"),
                &[],
                DEBIAN_IMAGE,
                "code1",
                &[
                    "bash",
                    "-c",
                    &format!("echo out; echo err >&2; exit {code}"),
                ],
            );
        }
        // A signal PID 1 sends itself without a handler is dropped too.
        side.run(
            "init kills itself",
            &[],
            DEBIAN_IMAGE,
            "code1",
            &["bash", "-c", "kill -TERM $$; kill -KILL $$; echo survived"],
        );
    });
    report.case("exec exit codes and signals", |side| {
        side.start_detached(&[], DEBIAN_IMAGE, "code2", &["sleep", "infinity"]);
        for code in [
            "0", "1", "2", "64", "126", "127", "128", "129", "200", "254", "255", "256",
        ] {
            side.exec(
                &format!("exit {code}"),
                "code2",
                &[],
                &["bash", "-c", &format!("exit {code}")],
            );
        }
        side.exec(
            "not found",
            "code2",
            &[],
            &["bash", "-c", "no-such-command"],
        );
        side.exec(
            "not executable",
            "code2",
            &[],
            &["bash", "-c", "/etc/passwd"],
        );
        for signal in ["TERM", "KILL", "SEGV", "ABRT", "HUP"] {
            side.exec(
                &format!("killed by SIG{signal}"),
                "code2",
                &[],
                &["bash", "-c", &format!("kill -{signal} $$")],
            );
        }
        let (exec_id, exec) =
            side.spawn_exec("code2", &["bash", "-c", "echo ready; exec sleep infinity"]);
        exec.wait_for_line("ready", limit);
        side.kill("code2", Some(&exec_id), "SIGTERM");
        side.finish("exec after kill --exec-id SIGTERM", exec);
        side.remove("code2");
    });
    report.finish();
    c.assert_nothing_left();
}

/// Mounts: bind volumes rw and ro (`rbind:ro`), a tmpfs with size and
/// mode, a read-only rootfs; what the process sees (mount flags, writes
/// refused with EROFS) and what the host sees afterwards.
#[test]
#[ignore = "needs root, containerd, ctr, runc, QEMU, virtiofsd, boxlite-vsock, mmdebstrap and the guest assets"]
fn mounts() {
    let c = containerd();
    let mut report = Report::new(&c);
    report.case("volumes and tmpfs", |side| {
        let rw = host_dir(side, "rw");
        let ro = host_dir(side, "ro");
        std::fs::write(ro.join("in"), "from the host\n").unwrap();
        std::fs::write(rw.join("in"), "from the host\n").unwrap();
        let rw_opt = format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display());
        let ro_opt = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
        let tmpfs = "type=tmpfs,src=tmpfs,dst=/scratch,options=size=8m:mode=1770:nosuid:nodev";
        let script = format!(
            "python3 -c '{}' mounts; \
             cat /ro/in /rw/in; echo written > /rw/out; echo \"write /rw: $?\"; \
             echo x > /ro/out; echo \"write /ro: $?\"; \
             stat -c '%a %U:%G' /scratch; df -k --output=size /scratch | tail -1; \
             head -c 9M /dev/zero > /scratch/fill; echo \"fill /scratch: $?\"; \
             echo x > /etc/x; echo \"write rootfs: $?\"",
            PROBE.replace('\'', "'\\''")
        );
        side.run(
            "mounts",
            &["--mount", &rw_opt, "--mount", &ro_opt, "--mount", tmpfs],
            DEBIAN_IMAGE,
            "mnt1",
            &["bash", "-c", &script],
        );
        side.record("host view of /rw", host_view(&rw));
        side.record("host view of /ro", host_view(&ro));
        side.run(
            "read-only rootfs",
            &["--read-only"],
            DEBIAN_IMAGE,
            "mnt2",
            &[
                "bash",
                "-c",
                &format!(
                    "echo x > /etc/x; echo \"write rootfs: $?\"; echo x > /tmp/x; \
                     echo \"write /tmp: $?\"; echo x > /dev/shm/x; \
                     echo \"write /dev/shm: $?\"; python3 -c '{}' mounts",
                    PROBE.replace('\'', "'\\''")
                ),
            ],
        );
    });
    report.finish();
    c.assert_nothing_left();
}
