//! A guest VM with a host directory shared into it and its sandbox
//! created: what the tests and the benchmark of the agent's container
//! service start from (tests/guest_containers.rs, boxlite-agent-bench).

use std::path::PathBuf;
use std::time::Duration;

use boxlite_protocol::agent::{CreateSandboxRequest, MountShareRequest};
use boxlite_runtime::hypervisor::{new_hypervisor, AgentConnection, Hypervisor, VmSpec};

/// Prints a file (a guest console, an agent log) if the thread is
/// panicking when this is dropped, so the failure can be explained.
pub struct FileOnPanic(pub PathBuf);

impl Drop for FileOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let text = std::fs::read_to_string(&self.0).unwrap_or_else(|e| format!("({e})"));
            eprintln!("--- {} ---\n{text}--- end ---", self.0.display());
        }
    }
}

/// A booted guest whose agent has created the sandbox with [`Self::share`]
/// mounted.
pub struct SandboxVm {
    pub vm: Box<dyn Hypervisor>,
    pub conn: AgentConnection,
    /// The host directory shared into the guest.
    pub share: tempfile::TempDir,
    /// The sandbox directory (sockets, console log, helper logs).
    pub dir: PathBuf,
    _state: tempfile::TempDir,
    _console: FileOnPanic,
}

impl SandboxVm {
    /// Boots sandbox `id` with the guest assets of [`crate::guest_config`]
    /// (plus `cmdline_extra` on the kernel command line), shares a new
    /// temporary directory as `tag`, waits for the agent and creates the
    /// sandbox with that share mounted. Panics with the cause; a VM that
    /// started is killed first.
    pub async fn boot(id: &str, tag: &str, cmdline_extra: &str) -> Self {
        let state = tempfile::tempdir().expect("state dir");
        let share = tempfile::tempdir().expect("share dir");
        let mut config = crate::guest_config(state.path());
        config.guest.kernel_cmdline_extra = cmdline_extra.into();
        config.validate().expect("guest config");
        let spec = VmSpec::from_config(&config, id).expect("VM spec");
        let dir = spec.dir.clone();
        let console = FileOnPanic(dir.join("console.log"));
        let vm = new_hypervisor(&config, spec).expect("hypervisor");
        vm.add_share(tag, share.path(), false)
            .await
            .unwrap_or_else(|e| panic!("add share {tag}: {e}"));
        vm.start()
            .await
            .unwrap_or_else(|e| panic!("start the VM: {e}"));
        let conn = match vm.wait_ready().await {
            Ok(c) => c,
            Err(e) => {
                vm.kill().await.expect("kill the VM");
                panic!("agent not ready: {e}");
            }
        };
        let create_sandbox = CreateSandboxRequest {
            sandbox_id: id.into(),
            shares: vec![MountShareRequest {
                tag: tag.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        conn.agent()
            .create_sandbox(
                ttrpc::context::with_timeout(Duration::from_secs(30).as_nanos() as i64),
                &create_sandbox,
            )
            .await
            .unwrap_or_else(|e| panic!("CreateSandbox: {e:?}"));
        SandboxVm {
            vm,
            conn,
            share,
            dir,
            _state: state,
            _console: console,
        }
    }

    /// Stops the VM and asserts that nothing of it is left.
    pub async fn stop(self) {
        self.vm
            .stop()
            .await
            .unwrap_or_else(|e| panic!("stop the VM: {e}"));
        crate::assert_nothing_left(&self.dir);
    }
}
