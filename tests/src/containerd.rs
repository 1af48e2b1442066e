//! A private containerd for the end-to-end tests: its own config, root,
//! state and socket in a temp dir (never the system's), the shim under
//! test as `containerd-shim-boxlite-v2` on its PATH, and the checks that
//! nothing was left behind.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use boxlite_protocol::mountinfo;

use crate::oci_image::{busybox_image, run};
use crate::{guest_assets, processes_mentioning, sockets_under};

pub const RUNTIME: &str = "io.containerd.boxlite.v2";
pub const IMAGE: &str = "docker.io/library/busybox:boxlite";

/// The backend the tests ask for in `boxlite.toml`: `$BOXLITE_TEST_BACKEND`
/// ("builtin" or "qemu"), else none (the config's `auto`). The nested
/// node's e2e run sets "builtin" (docs/testing-nested.md), so the same
/// tests run on boxlite-vmm there and on QEMU here.
pub fn test_backend() -> Option<String> {
    std::env::var("BOXLITE_TEST_BACKEND")
        .ok()
        .filter(|b| !b.is_empty())
}

/// `[templates]` of the tests' `boxlite.toml`: on when
/// `$BOXLITE_TEST_TEMPLATES` is `on` (the nested node's builtin run), in
/// `$BOXLITE_TEST_TEMPLATES_DIR` (shared by the run's tests, so the first
/// builds the template the others restore from) or else a directory of the
/// test's own. A test can switch them with [`Containerd::set_config`]
/// (keys `enabled` and `dir`).
fn test_templates(test_dir: &Path) -> (bool, PathBuf) {
    let on = std::env::var("BOXLITE_TEST_TEMPLATES").is_ok_and(|v| v == "on");
    let dir = std::env::var_os("BOXLITE_TEST_TEMPLATES_DIR")
        .filter(|d| !d.is_empty())
        .map_or_else(|| test_dir.join("templates"), PathBuf::from);
    (on, dir)
}

/// How the runtime logs the backend it picked (`hypervisor selected`),
/// e.g. `backend=Builtin` for "builtin".
fn backend_log_field(backend: &str) -> String {
    let mut name = backend.to_owned();
    if let Some(first) = name.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    format!("backend={name}")
}

/// The shim binary cargo built next to this test's target directory.
pub fn shim_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BOXLITE_SHIM") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/containerd-shim-boxlite-v2
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("containerd-shim-boxlite-v2");
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build -p containerd-shim-boxlite-v2` first (or set BOXLITE_SHIM)",
        bin.display()
    );
    bin
}

/// Shim sockets containerd-shim puts under /run/containerd/s.
pub fn shim_sockets() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/run/containerd/s")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    found.sort();
    found
}

/// A private containerd: its own config, root, state and socket.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub child: Child,
    /// Shim sockets that existed before this containerd ran anything.
    sockets_before: Vec<PathBuf>,
}

impl Containerd {
    /// A private containerd with the boxlite runtime registered.
    pub fn start() -> Self {
        Self::start_with(|_| String::new())
    }

    /// The same with `extra(temp dir)` appended to containerd's config file
    /// (e.g. the CRI plugin's settings).
    pub fn start_with(extra: impl FnOnce(&Path) -> String) -> Self {
        // Short path: unix socket paths under it must stay < 108 bytes.
        let dir = tempfile::Builder::new()
            .prefix("bxc")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let bin = d.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        symlink(shim_binary(), bin.join("containerd-shim-boxlite-v2")).unwrap();
        let assets = guest_assets();
        let hypervisor = test_backend()
            .map(|b| format!("[hypervisor]\nbackend = {b:?}\n"))
            .unwrap_or_default();
        let (templates_on, templates_dir) = test_templates(d);
        std::fs::write(
            d.join("boxlite.toml"),
            format!(
                "{hypervisor}[guest]\nkernel = {:?}\ninitramfs = {:?}\nmemory_mib = 256\n\
                 memory_headroom_mib = 0\n\
                 [timeouts]\nagent_ready_secs = 60\n\
                 [runtime]\nstate_dir = {:?}\nlog_level = \"debug\"\n\
                 allowed_annotations = [\"io.boxlite.guest.memory_mib\"]\n\
                 sandbox_log_max_kib = 4096\nhost_memory_floor_mib = 256\n\
                 [templates]\nenabled = {templates_on}\ndir = {templates_dir:?}\n",
                assets.kernel,
                assets.initramfs,
                d.join("run")
            ),
        )
        .unwrap();
        std::fs::write(
            d.join("config.toml"),
            format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\n\
                 [grpc]\naddress = {sock:?}\n[ttrpc]\naddress = \"{sock}.ttrpc\"\n\
                 [debug]\nlevel = \"debug\"\n\
                 [plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.boxlite]\n    runtime_type = \"{RUNTIME}\"\n\
                 pod_annotations = [\"io.boxlite.*\"]\n\
                 [plugins.\"io.containerd.internal.v1.opt\"]\n    path = {opt:?}\n{extra}",
                root = d.join("root"),
                state = d.join("state"),
                sock = d.join("c.sock").display(),
                opt = d.join("opt"),
                extra = extra(d),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("BOXLITE_CONFIG", d.join("boxlite.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd is installed (apt-get install containerd)");
        let c = Containerd {
            dir,
            child,
            sockets_before: shim_sockets(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up; log:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        c
    }

    /// Sets `key = value` (value in TOML syntax) in the shim's boxlite.toml,
    /// replacing the line that sets `key` (each new shim reads the file).
    pub fn set_config(&self, key: &str, value: &str) {
        let path = self.dir.path().join("boxlite.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let sets_key = |l: &str| l.split('=').next().is_some_and(|k| k.trim() == key);
        assert!(
            text.lines().any(sets_key),
            "boxlite.toml sets no {key}:\n{text}"
        );
        let edited: Vec<String> = text
            .lines()
            .map(|l| {
                if sets_key(l) {
                    format!("{key} = {value}")
                } else {
                    l.to_owned()
                }
            })
            .collect();
        std::fs::write(&path, edited.join("\n") + "\n").unwrap();
    }

    pub fn ctr(&self, args: &[&str]) -> Output {
        run(&mut self.ctr_cmd(args))
    }

    /// `ctr --address <ours> args…`, bounded by `timeout` so a hang fails
    /// the test instead of blocking the run.
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.args(["-k", "10", "300", "ctr", "--address"])
            .arg(self.dir.path().join("c.sock"))
            .args(args);
        cmd
    }

    /// A containerd with the busybox image imported.
    pub fn with_image() -> Self {
        let c = Containerd::start();
        let img = c.dir.path().join("img");
        std::fs::create_dir_all(&img).unwrap();
        let archive = busybox_image(&img, IMAGE, &["sh"]);
        let out = c.ctr(&["image", "import", archive.to_str().unwrap()]);
        assert!(out.status.success(), "import: {}", text(&out.stderr));
        c
    }

    /// `ctr run --rm --runtime boxlite [opts…] IMAGE id args…`.
    pub fn run_rm(&self, opts: &[&str], id: &str, args: &[&str]) -> Output {
        let mut a = vec!["run", "--rm", "--runtime", RUNTIME];
        a.extend_from_slice(opts);
        a.push(IMAGE);
        a.push(id);
        a.extend_from_slice(args);
        self.ctr(&a)
    }

    /// `ctr run -d … id sleep 600`: a running container to work on.
    pub fn run_detached(&self, opts: &[&str], id: &str) {
        self.run_detached_cmd(opts, id, &["sleep", "600"]);
    }

    /// `ctr run -d … id args…`.
    pub fn run_detached_cmd(&self, opts: &[&str], id: &str, args: &[&str]) {
        let mut a = vec!["run", "-d", "--runtime", RUNTIME];
        a.extend_from_slice(opts);
        a.extend_from_slice(&[IMAGE, id]);
        a.extend_from_slice(args);
        let out = self.ctr(&a);
        assert!(
            out.status.success(),
            "ctr run -d {id}: {}",
            text(&out.stderr)
        );
    }

    /// The task's status as `ctr task ls` shows it (RUNNING, PAUSED, …).
    pub fn task_status(&self, id: &str) -> String {
        let out = self.ctr(&["task", "ls"]);
        text(&out.stdout)
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
            .and_then(|l| l.split_whitespace().nth(2))
            .unwrap_or("")
            .to_owned()
    }

    /// SIGKILL the task, wait for it to stop, delete task and container.
    pub fn kill_and_delete(&self, id: &str) {
        let out = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        assert!(out.status.success(), "kill {id}: {}", text(&out.stderr));
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.task_status(id) != "STOPPED" {
            assert!(Instant::now() < deadline, "{id} did not stop");
            std::thread::sleep(Duration::from_millis(200));
        }
        let out = self.ctr(&["task", "delete", id]);
        assert!(
            out.status.success(),
            "task delete {id}: {}",
            text(&out.stderr)
        );
        let out = self.ctr(&["container", "delete", id]);
        assert!(
            out.status.success(),
            "container delete {id}: {}",
            text(&out.stderr)
        );
    }

    /// With `$BOXLITE_TEST_BACKEND` set, every sandbox this containerd
    /// booted so far ran on that backend (and at least one did): a run
    /// meant for boxlite-vmm must not pass on QEMU.
    pub fn assert_ran_on_the_test_backend(&self) {
        let Some(backend) = test_backend() else {
            return;
        };
        let log = self.log();
        let picks: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("hypervisor selected"))
            .collect();
        let want = backend_log_field(&backend);
        assert!(
            !picks.is_empty() && picks.iter().all(|l| l.contains(&want)),
            "BOXLITE_TEST_BACKEND={backend}, but the runtime picked: {picks:#?}"
        );
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn log(&self) -> String {
        String::from_utf8_lossy(
            &std::fs::read(self.dir.path().join("containerd.log")).unwrap_or_default(),
        )
        .into_owned()
    }

    /// No VM process, helper, socket, mount or sandbox directory is left.
    pub fn assert_nothing_left(&self) {
        let state = self.state_dir();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let procs = processes_mentioning(&state);
            let left = left_in_state_dir(&state);
            let mounts = mounts_under(&state);
            let shim_sockets: Vec<PathBuf> = shim_sockets()
                .into_iter()
                .filter(|s| !self.sockets_before.contains(s))
                .collect();
            if procs.is_empty() && left.is_empty() && mounts.is_empty() && shim_sockets.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "left behind: processes {procs:?}, entries {left:?}, mounts {mounts:?}, \
                 sockets {:?}, shim sockets {shim_sockets:?}",
                sockets_under(&state)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The shim's records' directory beside the sandbox directories.
pub const SHIM_RECORDS: &str = ".shim";

/// The sandbox directories under the runtime's state dir, and the shim
/// records in its `.shim` directory (which itself stays).
pub fn left_in_state_dir(state: &Path) -> Vec<PathBuf> {
    use boxlite_runtime::hypervisor::jail_ids;
    let entries = |dir: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    // Two directories of the runtime itself stay: the shim's records and
    // the jail uid leases (with their lock file). What is in them is not
    // meant to: a record or a lease left names a sandbox not cleaned up.
    let records = state.join(SHIM_RECORDS);
    let leases = state.join(jail_ids::LEASE_DIR);
    let mut left: Vec<PathBuf> = entries(state)
        .into_iter()
        .filter(|p| *p != records && *p != leases)
        .collect();
    left.extend(entries(&records));
    left.extend(
        entries(&leases)
            .into_iter()
            .filter(|p| *p != leases.join(jail_ids::LOCK_FILE)),
    );
    left
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The temp dir goes with this value: show what the shims
            // logged (containerd forwards their logs) before it does.
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(120)..];
            eprintln!(
                "---- containerd log, last {} lines ----\n{}\n----",
                tail.len(),
                tail.join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Whatever a failed test left: its shims and their VMs and helpers
        // (every process naming the temp dir), their sockets, and mounts,
        // before the temp dir goes.
        for (pid, _) in processes_mentioning(self.dir.path()) {
            // SAFETY: kill(2) with a pid read from /proc; no memory involved.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        if std::thread::panicking() {
            for sock in shim_sockets() {
                if !self.sockets_before.contains(&sock) {
                    let _ = std::fs::remove_file(sock);
                }
            }
        }
        for m in mounts_under(self.dir.path()) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
    }
}

/// Mount points at or under `dir`, deepest first; none when mountinfo
/// cannot be read (a cleanup then has nothing to unmount).
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let text = std::fs::read(mountinfo::MOUNTINFO).unwrap_or_default();
    mountinfo::mount_points_under(&text, dir)
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
