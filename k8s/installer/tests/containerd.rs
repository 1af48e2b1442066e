//! The patched config is one containerd accepts: a private containerd
//! (its own root, state and socket in a temp dir, never /run/containerd)
//! starts from `containerd config default` with our runtime registered, and
//! its CRI plugin must load. A control run with a broken registration shows
//! the check can fail.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boxlite_node_installer::containerd_config::register;
use toml_edit::{value, DocumentMut};

/// containerd's own default config, pointed at `dir` for everything it
/// writes or listens on.
fn default_config(dir: &Path) -> String {
    let out = Command::new("containerd")
        .args(["config", "default"])
        .output()
        .expect("containerd is installed (apt-get install containerd)");
    assert!(out.status.success(), "{out:?}");
    let mut doc: DocumentMut = String::from_utf8(out.stdout).unwrap().parse().unwrap();
    let path = |p: &str| dir.join(p).display().to_string();
    doc["root"] = value(path("root"));
    doc["state"] = value(path("state"));
    doc["grpc"]["address"] = value(path("c.sock"));
    doc["ttrpc"]["address"] = value(path("c.sock.ttrpc"));
    doc["plugins"]["io.containerd.internal.v1.opt"]["path"] = value(path("opt"));
    doc.to_string()
}

struct Containerd(Child);

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Debug, PartialEq)]
enum Outcome {
    /// The status column ("ok", "error", "skip") of the CRI plugin's
    /// `ctr plugins ls` line.
    Cri(String),
    /// containerd exited before answering; its log's last line.
    Exited(String),
}

/// Starts containerd on `config` and reports how its CRI plugin fared.
fn start(dir: &Path, config: &str) -> Outcome {
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let log_path = dir.join("containerd.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut containerd = Containerd(
        Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let sock = dir.join("c.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if containerd.0.try_wait().unwrap().is_some() {
            return Outcome::Exited(log().lines().last().unwrap_or("").to_owned());
        }
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&sock)
            .args(["plugins", "ls"])
            .output()
            .unwrap();
        if out.status.success() {
            let text = String::from_utf8(out.stdout).unwrap();
            // TYPE ID PLATFORMS STATUS
            let line = text
                .lines()
                .find(|l| {
                    l.split_whitespace()
                        .take(2)
                        .eq(["io.containerd.grpc.v1", "cri"])
                })
                .unwrap_or_else(|| panic!("no CRI plugin listed:\n{text}"));
            return Outcome::Cri(line.split_whitespace().last().unwrap().to_owned());
        }
        assert!(
            Instant::now() < deadline,
            "containerd did not answer on {} within 20s; log:\n{}",
            sock.display(),
            log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs root and containerd"]
fn containerd_loads_the_cri_plugin_with_the_patched_config() {
    // Short path: the socket path must stay under 108 bytes.
    let dir = tempfile::Builder::new()
        .prefix("bxi")
        .tempdir_in("/tmp")
        .unwrap();
    let base = default_config(dir.path());
    let patched = register(&base, &dir.path().join("config.toml"))
        .unwrap()
        .expect("the default config has no boxlite runtime");
    assert_eq!(
        start(dir.path(), &patched),
        Outcome::Cri("ok".to_owned()),
        "config:\n{patched}"
    );

    // Control: the same file with a registration containerd cannot decode
    // is refused (containerd 1.6 exits naming the bad value), so the check
    // above means something.
    let broken = patched.replace(
        "runtime_type = \"io.containerd.boxlite.v2\"",
        "runtime_type = 2",
    );
    assert_ne!(broken, patched);
    let dir = tempfile::Builder::new()
        .prefix("bxi")
        .tempdir_in("/tmp")
        .unwrap();
    let broken = broken.replace(&patched_root(&patched), &dir.path().display().to_string());
    match start(dir.path(), &broken) {
        Outcome::Exited(last) => {
            assert!(last.contains("Can't convert 2(int64) to string"), "{last}")
        }
        other => assert_ne!(
            other,
            Outcome::Cri("ok".to_owned()),
            "a broken config loaded"
        ),
    }
}

/// The temp dir the first config points at (its `root` without `/root`).
fn patched_root(config: &str) -> String {
    let doc: DocumentMut = config.parse().unwrap();
    let root = doc["root"].as_str().unwrap();
    root.strip_suffix("/root").unwrap().to_owned()
}
