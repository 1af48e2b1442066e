//! OCI hooks run on the host, the way runc runs them, with the container
//! state on stdin — in the pod's network namespace when the spec names one
//! (that is how nerdctl wires CNI).
//!
//! The guest never sees the hooks: their paths are host paths, so the spec
//! the agent gets has none. The state's `pid` is the VM process's pid, the
//! process that embodies the sandbox on the host (as Kata does).
//!
//! | hook | when | on failure |
//! |---|---|---|
//! | `prestart` (deprecated), `createRuntime`, `createContainer` | Create, before the guest creates the container (see [`CreateHookPlan`] for when) | Create fails |
//! | `poststart` | after Start | logged |
//! | `poststop` | after Delete | logged |

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use oci_spec::runtime::{Hook, Hooks, LinuxNamespaceType, Spec};
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::error::{Result, ShimError};

/// A hook without a timeout still gets at most this long.
pub const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Prestart,
    CreateRuntime,
    CreateContainer,
    Poststart,
    Poststop,
}

impl HookKind {
    pub fn name(self) -> &'static str {
        match self {
            HookKind::Prestart => "prestart",
            HookKind::CreateRuntime => "createRuntime",
            HookKind::CreateContainer => "createContainer",
            HookKind::Poststart => "poststart",
            HookKind::Poststop => "poststop",
        }
    }

    fn select(self, hooks: &Hooks) -> Vec<Hook> {
        let list = match self {
            #[allow(deprecated)]
            HookKind::Prestart => hooks.prestart(),
            HookKind::CreateRuntime => hooks.create_runtime(),
            HookKind::CreateContainer => hooks.create_container(),
            HookKind::Poststart => hooks.poststart(),
            HookKind::Poststop => hooks.poststop(),
        };
        list.clone().unwrap_or_default()
    }
}

/// The hooks Create runs, in runc's order.
const CREATE_HOOKS: [HookKind; 3] = [
    HookKind::Prestart,
    HookKind::CreateRuntime,
    HookKind::CreateContainer,
];

/// When Create runs its hooks, decided in one place
/// ([`ContainerHooks::plan_create`]): every create-time hook runs exactly
/// once, in runc's order, in one of two phases.
///
/// The container that boots the VM into a pod network namespace runs
/// `prestart` and `createRuntime` before the boot, in that namespace, so
/// that what they set up there (nerdctl's CNI) is wired to the VM. All
/// other hooks run once the rootfs is mounted and the VM is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateHookPlan {
    pub before_boot: &'static [HookKind],
    pub after_mounts: &'static [HookKind],
}

/// The OCI state document hooks read on stdin.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct HookState {
    #[serde(rename = "ociVersion")]
    pub oci_version: String,
    pub id: String,
    pub status: String,
    pub pid: u32,
    pub bundle: String,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// The hooks of a container and where they run.
#[derive(Debug, Clone, Default)]
pub struct ContainerHooks {
    pub hooks: Option<Hooks>,
    /// The pod's network namespace (the spec's network namespace path).
    pub netns: Option<PathBuf>,
    pub annotations: HashMap<String, String>,
    pub oci_version: String,
}

impl ContainerHooks {
    /// Takes the hooks out of `spec` (the guest must not see them).
    pub fn take_from(spec: &mut Spec) -> Self {
        let netns = spec
            .linux()
            .as_ref()
            .and_then(|l| l.namespaces().clone())
            .unwrap_or_default()
            .into_iter()
            .find(|n| n.typ() == LinuxNamespaceType::Network)
            .and_then(|n| n.path().clone());
        let hooks = spec.hooks().clone();
        spec.set_hooks(None);
        Self {
            hooks,
            netns,
            annotations: spec.annotations().clone().unwrap_or_default(),
            oci_version: spec.version().clone(),
        }
    }

    /// Whether any hook of these kinds is set.
    pub fn has_any(&self, kinds: &[HookKind]) -> bool {
        self.hooks
            .as_ref()
            .is_some_and(|h| kinds.iter().any(|k| !k.select(h).is_empty()))
    }

    /// The create-time hooks' phases (see [`CreateHookPlan`]);
    /// `boots_into_netns`: this container boots the VM and names a network
    /// namespace other than the host's.
    pub fn plan_create(&self, boots_into_netns: bool) -> CreateHookPlan {
        let (early, late) = CREATE_HOOKS.split_at(2);
        if boots_into_netns && self.has_any(early) {
            CreateHookPlan {
                before_boot: early,
                after_mounts: late,
            }
        } else {
            CreateHookPlan {
                before_boot: &[],
                after_mounts: &CREATE_HOOKS,
            }
        }
    }

    /// Runs the hooks of each of `kinds` in turn; stops at the first failure.
    pub async fn run_each(&self, kinds: &[HookKind], state: &HookState) -> Result<()> {
        for kind in kinds {
            self.run(*kind, state).await?;
        }
        Ok(())
    }

    pub fn state(&self, id: &str, status: &str, pid: u32, bundle: &Path) -> HookState {
        HookState {
            oci_version: self.oci_version.clone(),
            id: id.to_owned(),
            status: status.to_owned(),
            pid,
            bundle: bundle.display().to_string(),
            annotations: self.annotations.clone(),
        }
    }

    /// Runs every hook of `kind` in order; stops at the first failure.
    pub async fn run(&self, kind: HookKind, state: &HookState) -> Result<()> {
        let Some(hooks) = &self.hooks else {
            return Ok(());
        };
        for (n, hook) in kind.select(hooks).iter().enumerate() {
            run_one(kind, n, hook, state, self.netns.as_deref()).await?;
        }
        Ok(())
    }

    /// Runs the hooks of `kind`, logging a failure instead of returning it.
    pub async fn run_logged(&self, kind: HookKind, state: &HookState) {
        if let Err(e) = self.run(kind, state).await {
            tracing::warn!(hook = kind.name(), error = %boxlite_protocol::error_chain::chain(&e), "hook failed");
        }
    }
}

async fn run_one(
    kind: HookKind,
    n: usize,
    hook: &Hook,
    state: &HookState,
    netns: Option<&Path>,
) -> Result<()> {
    let path = hook.path().clone();
    let fail = |cause: HookFailure| ShimError::Hook {
        kind: kind.name(),
        n,
        path: path.clone(),
        cause,
    };
    let netns_file = match netns {
        Some(p) => Some(std::fs::File::open(p).map_err(|error| {
            fail(HookFailure::Netns {
                path: p.to_owned(),
                error,
            })
        })?),
        None => None,
    };
    let mut cmd = tokio::process::Command::new(&path);
    let args = hook.args().clone().unwrap_or_default();
    if let Some((argv0, rest)) = args.split_first() {
        cmd.as_std_mut().arg0(argv0);
        cmd.args(rest);
    }
    cmd.env_clear();
    for kv in hook.env().clone().unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            cmd.env(k, v);
        }
    }
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(file) = &netns_file {
        let fd = file.as_raw_fd();
        // SAFETY: setns(2) is async-signal-safe; `fd` stays open in the
        // parent until spawn returns.
        unsafe {
            cmd.as_std_mut().pre_exec(move || {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let timeout = hook
        .timeout()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .map(Duration::from_secs)
        .unwrap_or(MAX_HOOK_TIMEOUT)
        .min(MAX_HOOK_TIMEOUT);
    let state_json =
        serde_json::to_vec(state).map_err(|e| ShimError::failed("cannot encode hook state", e))?;
    let mut child = cmd.spawn().map_err(|e| fail(HookFailure::Io(e)))?;
    drop(netns_file);
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin must not fail the write.
        let _ = stdin.write_all(&state_json).await;
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            tracing::debug!(hook = kind.name(), path = %path.display(), "hook ran");
            Ok(())
        }
        Ok(Ok(out)) => Err(fail(HookFailure::Exited {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })),
        Ok(Err(e)) => Err(fail(HookFailure::Io(e))),
        Err(_) => Err(fail(HookFailure::TimedOut(timeout.as_secs()))),
    }
}

/// Why one hook failed (the cause of [`ShimError::Hook`]).
#[derive(Debug, thiserror::Error)]
pub enum HookFailure {
    #[error("cannot open network namespace {}", path.display())]
    Netns {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// It could not be started or waited for.
    #[error(transparent)]
    Io(std::io::Error),
    #[error("{status}{}", stderr_suffix(.stderr))]
    Exited {
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("timed out after {0}s")]
    TimedOut(u64),
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(", stderr: {stderr}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::error_chain::chain;
    use boxlite_test_support::fake_bin::script;
    use oci_spec::runtime::{HookBuilder, HooksBuilder, SpecBuilder};

    #[tokio::test]
    async fn hooks_get_the_state_args_and_env_and_leave_the_guest_spec() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = script(
            dir.path(),
            "h",
            &format!("cat > {0}; echo \" $1 $FOO\" >> {0}", out.display()),
        );
        let mut spec = SpecBuilder::default()
            .hooks(
                HooksBuilder::default()
                    .create_runtime(vec![HookBuilder::default()
                        .path(&hook)
                        .args(vec!["my-hook".to_string(), "arg1".to_string()])
                        .env(vec!["FOO=bar".to_string()])
                        .build()
                        .unwrap()])
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap();
        let hooks = ContainerHooks::take_from(&mut spec);
        assert!(spec.hooks().is_none(), "the guest spec has no hooks");
        let state = hooks.state("c1", "creating", 4242, Path::new("/b"));
        hooks.run(HookKind::CreateRuntime, &state).await.unwrap();
        // Kinds without hooks do nothing.
        hooks.run(HookKind::Poststop, &state).await.unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        let (json, tail) = text.split_once(' ').unwrap();
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["id"], "c1");
        assert_eq!(v["status"], "creating");
        assert_eq!(v["pid"], 4242);
        assert_eq!(v["bundle"], "/b");
        // args[0] is argv[0] (a script sees its path as $0 instead).
        assert_eq!(tail.trim(), "arg1 bar");
    }

    #[test]
    fn create_hooks_run_once_each_in_one_of_two_phases() {
        let with_create_runtime = ContainerHooks {
            hooks: Some(
                HooksBuilder::default()
                    .create_runtime(vec![HookBuilder::default().path("/h").build().unwrap()])
                    .build()
                    .unwrap(),
            ),
            ..Default::default()
        };
        let plan = with_create_runtime.plan_create(true);
        assert_eq!(
            plan.before_boot,
            [HookKind::Prestart, HookKind::CreateRuntime]
        );
        assert_eq!(plan.after_mounts, [HookKind::CreateContainer]);
        // Joining a running VM (or no namespace to prepare), or nothing to
        // run early: everything after the mounts.
        for plan in [
            with_create_runtime.plan_create(false),
            ContainerHooks::default().plan_create(true),
        ] {
            assert!(plan.before_boot.is_empty());
            assert_eq!(plan.after_mounts, CREATE_HOOKS);
        }
    }

    #[tokio::test]
    async fn failing_and_hanging_hooks_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let bad = script(dir.path(), "bad", "echo nope >&2; exit 3");
        let slow = script(dir.path(), "slow", "sleep 30");
        let hooks = ContainerHooks {
            hooks: Some(
                HooksBuilder::default()
                    .create_runtime(vec![HookBuilder::default().path(&bad).build().unwrap()])
                    .poststart(vec![HookBuilder::default()
                        .path(&slow)
                        .timeout(1i64)
                        .build()
                        .unwrap()])
                    .build()
                    .unwrap(),
            ),
            ..Default::default()
        };
        let state = hooks.state("c1", "creating", 1, Path::new("/b"));
        let err = chain(
            &hooks
                .run(HookKind::CreateRuntime, &state)
                .await
                .unwrap_err(),
        );
        assert!(
            err.starts_with("createRuntime hook #0 (")
                && err.contains("exit status: 3, stderr: nope"),
            "{err}"
        );
        let started = std::time::Instant::now();
        let err = chain(&hooks.run(HookKind::Poststart, &state).await.unwrap_err());
        assert!(err.contains("timed out after 1s"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}
