//! The backends' test rig: a sandbox in a temp dir with fake binaries
//! (shell scripts, from boxlite-test-support), shared by the qemu and
//! builtin backend tests.

use std::ops::Deref;
use std::path::PathBuf;
use std::time::Duration;

use boxlite_test_support::fake_bin::{self, BinDir};

use super::VmSpec;
use crate::config::{Config, ResolvedAccel, ResolvedBackend, ResolvedHypervisor};

/// A sandbox `sb1` under `<tmp>/state` with a fake kernel and initramfs;
/// derefs to the [`BinDir`] its fake binaries go in.
pub(crate) struct Rig {
    dir: BinDir,
}

impl Rig {
    pub(crate) fn new() -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = BinDir::new();
        // The qemu backend starts QEMU as the sandbox's jail uid: a fake
        // QEMU must be able to run its script and write its markers here.
        std::fs::set_permissions(dir.root(), std::fs::Permissions::from_mode(0o1777))
            .expect("chmod the rig's directory");
        Self { dir }
    }

    /// The VM spec: 2 s agent-ready and 1 s shutdown timeouts.
    pub(crate) fn spec(&self) -> VmSpec {
        let mut config = Config::default();
        config.runtime.state_dir = self.path("state");
        config.guest.kernel = self.file("vmlinux");
        config.guest.initramfs = self.file("initramfs");
        config.guest.kernel_cmdline_extra = "quiet".into();
        config.timeouts.agent_ready_secs = 2;
        config.timeouts.shutdown_secs = 1;
        let mut spec = VmSpec::from_config(&config, "sb1").unwrap();
        // Every rig's sandbox is "sb1", and the tests run in parallel: in
        // a shared cgroup one test's teardown would remove another's. The
        // cgroup has its own tests (crate::cgroup, and the e2e suites).
        spec.cgroup = None;
        spec
    }

    pub(crate) fn sandbox(&self) -> PathBuf {
        self.path("state/sb1")
    }

    /// Waits (5 s at most) until the fake VMM has made `name` in the
    /// sandbox directory; the panic shows the VMM's log.
    pub(crate) async fn wait_for_sandbox_file(&self, name: &str, vmm_log: &str) {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !self.sandbox().join(name).exists() {
            assert!(
                std::time::Instant::now() < end,
                "no {name}; {vmm_log}: {}",
                std::fs::read_to_string(self.sandbox().join(vmm_log)).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The sockets and pid files left in the sandbox directory.
    pub(crate) fn leftovers(&self) -> Vec<String> {
        fake_bin::leftovers(&self.sandbox())
    }

    /// Nothing of the sandbox is left: no socket or pid file in its
    /// directory, no jail uid leased.
    pub(crate) fn assert_clean(&self) {
        assert_eq!(self.leftovers(), Vec::<String>::new());
        assert_eq!(self.jail_leases(), Vec::<u32>::new());
    }

    /// The uids leased under the rig's state directory (`.jail-ids/`),
    /// sorted.
    pub(crate) fn jail_leases(&self) -> Vec<u32> {
        let dir = self.path("state").join(super::jail_ids::LEASE_DIR);
        let mut uids: Vec<u32> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.unwrap().file_name().into_string().unwrap().parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        uids.sort();
        uids
    }
}

/// The binaries a backend runs: the real names where the backend does not
/// run them, fake ones (or missing paths) where it does.
pub(crate) struct Bins {
    pub qemu: PathBuf,
    pub virtiofsd: PathBuf,
    pub vhost_vsock: PathBuf,
    pub vmm: PathBuf,
}

impl Bins {
    /// For `backend` on `accel`.
    pub(crate) fn resolve(
        self,
        backend: ResolvedBackend,
        accel: ResolvedAccel,
    ) -> ResolvedHypervisor {
        ResolvedHypervisor {
            backend,
            accel,
            accel_reason: "test".into(),
            qemu_binary: self.qemu,
            virtiofsd_binary: self.virtiofsd,
            vhost_vsock_binary: self.vhost_vsock,
            vmm_binary: self.vmm,
        }
    }
}

/// Stops `hv` and checks it took under 4 s: the rig's 1 s shutdown
/// timeout, then the kill, with room to spare.
pub(crate) async fn assert_stops_in_time(hv: &dyn super::Hypervisor) {
    let started = std::time::Instant::now();
    hv.stop().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
}

impl Deref for Rig {
    type Target = BinDir;

    fn deref(&self) -> &BinDir {
        &self.dir
    }
}
