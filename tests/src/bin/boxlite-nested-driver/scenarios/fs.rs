//! `fs`: a virtio-fs share served by virtiofsd, mounted and read by the
//! agent; and the virtiofsd that serves it (the `health` scenario's too).

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::MountShareRequest;
use virtio_bindings::virtio_ids::VIRTIO_ID_FS;

use crate::settings::Settings;
use crate::verdict::{one_line, Failure, ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm, RPC_TIMEOUT};

/// The share's tag, and a file the guest reads back.
pub const FS_TAG: &str = "nested";
pub const FS_FILE: &str = "hello.txt";
const FS_CONTENT: &str = "hello from the nested test host through virtio-fs\n";

/// A virtio-fs share: virtiofsd (static, in the test host) serves a
/// directory, boxlite-vmm is its vhost-user frontend, the agent mounts the
/// share by tag and reads a file from it.
pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (MountShare goes over vsock)"
        )));
    }
    let mut fsd = Virtiofsd::start(s)?;
    let mut vm = Vm::start(
        s,
        "fs",
        1,
        &[Device::Rng, Device::Vsock, Device::Fs { tag: FS_TAG }],
    )?;
    let conn = vm.connect(s.timeout).await?;
    let ctx = || ttrpc::context::with_duration(RPC_TIMEOUT);
    let mounted = conn
        .agent()
        .mount_share(
            ctx(),
            &MountShareRequest {
                tag: FS_TAG.into(),
                read_only: true,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| vm.fail(format!("MountShare {FS_TAG:?} failed: {e}{}", fsd.exited())))?;
    let path = format!("{}/{FS_FILE}", mounted.mount_point);
    let read = vm
        .read_guest_file(&conn, &path)
        .await
        .map_err(|f| Failure {
            reason: format!("{}{}", f.reason, fsd.exited()),
            vm: f.vm,
        })?;
    if read != FS_CONTENT {
        return Err(vm.fail(format!(
            "ReadFile {path} returned {read:?}, want {FS_CONTENT:?}"
        )));
    }
    vm.expect_virtio_device(&conn, VIRTIO_ID_FS, "virtio-fs")
        .await?;
    vm.destroy(&conn).await?;
    let fsd_end = fsd.wait_exit(Duration::from_secs(10));
    Ok(Verdict::Pass(format!(
        "share {FS_TAG:?} mounted at {} and {FS_FILE} read back ({} bytes) through \
         boxlite-vmm's vhost-user frontend and virtiofsd; {fsd_end}",
        mounted.mount_point,
        read.len()
    )))
}

/// virtiofsd serving a share: the `fs` scenario's on
/// [`Settings::fs_socket`], or another one ([`Virtiofsd::serving`]).
pub struct Virtiofsd {
    child: Child,
}

impl Virtiofsd {
    /// Writes the share, starts virtiofsd and waits for its socket.
    /// `--sandbox none --seccomp none`: virtiofsd's own confinement is not
    /// what this tests (boxlite-vmm's jail is).
    pub fn start(s: &Settings) -> Result<Self, Failure> {
        Self::serving(s, &s.work.join("virtiofsd"), &s.fs_socket(), FS_CONTENT)
    }

    /// virtiofsd on `socket` serving `dir`/share, which holds
    /// [`FS_FILE`] with `content`.
    pub fn serving(
        s: &Settings,
        dir: &std::path::Path,
        socket: &std::path::Path,
        content: &str,
    ) -> Result<Self, Failure> {
        let _ = fs::remove_dir_all(dir);
        let share = dir.join("share");
        fs::create_dir_all(&share)?;
        fs::write(share.join(FS_FILE), content)?;
        let socket = socket.to_path_buf();
        let log_path = dir.join("virtiofsd.log");
        let log = fs::File::create(&log_path)?;
        let mut child = Command::new(s.virtiofsd())
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&share)
            .args(["--sandbox", "none", "--seccomp", "none", "--cache", "never"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", s.virtiofsd().display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(Failure::from(format!(
                    "virtiofsd exited ({st}) before it listened: {}",
                    one_line(&fs::read_to_string(&log_path).unwrap_or_default())
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::from(format!(
                    "virtiofsd did not create {} within 20s",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Virtiofsd { child })
    }

    /// "; virtiofsd exited (status)" if it has, for failure messages.
    fn exited(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(st)) => format!("; virtiofsd exited ({st})"),
            _ => String::new(),
        }
    }

    /// Waits for virtiofsd to end on its own (it does when its frontend
    /// disconnects); kills it after `timeout`. Says which happened.
    fn wait_exit(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return format!("virtiofsd exited {st} after the VM"),
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return format!(
                        "virtiofsd still ran {}s after the VM; killed",
                        timeout.as_secs()
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return format!("cannot wait for virtiofsd: {e}"),
            }
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
