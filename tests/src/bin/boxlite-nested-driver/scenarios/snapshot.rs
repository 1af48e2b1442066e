//! `snapshot`: a booted guest saved once, two VMs restored from it at
//! once, both with a working agent.
//!
//! The source VM (rng, vsock, the runtime's balloon, control socket)
//! boots until its agent
//! announces itself, the point a pod template is taken at: it is paused
//! and saved, then ended. Two VMMs start from the two files together,
//! copy-on-write on the one memory file; each comes up `restored`, runs
//! on the `restore` op and must answer Health over a fresh vsock
//! connection (the transport reset dropped the frozen ones) and
//! GuestInfo. Reported: cold boot to agent ready against restore to agent
//! answering, the save, and each clone's PSS against its RSS (pages of
//! the memory file both map count half in each PSS).
//!
//! Then each clone gets its CreateSandbox with its own host entropy and
//! the host's wall clock: a clone's clock resumes from when the template
//! was saved (the scenario waits [`HOLD`] before restoring, so it is
//! behind by that), and must be within 2 s of the host's after it; the
//! clones' random UUIDs after it must differ.

use std::time::{Duration, Instant};

use boxlite_protocol::agent::CreateSandboxRequest;
use boxlite_runtime::AgentConnection;
use boxlite_vmm_api::config::{BalloonConfig, JailUser, MemoryMode, RestoreConfig};
use boxlite_vmm_api::control::{Reply, Request, VmState};

use crate::settings::Settings;
use crate::verdict::{Failure, ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm, VmOptions, RPC_TIMEOUT};

const DEVICES: [Device; 2] = [Device::Rng, Device::Vsock];
/// The runtime's balloon, free page reporting on.
const BALLOON: BalloonConfig = boxlite_runtime::hypervisor::builtin::balloon(true, 0);
/// How long a control op may take: saving 256 MiB of guest RAM in the
/// nested host takes seconds.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);
/// Between the save and the restores: how far behind a clone's clock is
/// before CreateSandbox.
const HOLD: Duration = Duration::from_secs(5);

pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (the agent answers over vsock)"
        )));
    }
    let (template, cold) = Template::take(s, "snapshot", &DEVICES, &VmOptions::default()).await?;
    let saved = template.saved.clone();
    tokio::time::sleep(HOLD).await;

    // Two clones at once.
    let opts = template.restore_options(MemoryMode::Auto, &VmOptions::default());
    let mut clones = Vec::new();
    for name in ["snapshot-a", "snapshot-b"] {
        clones.push(Vm::start_with(s, name, 1, &DEVICES, &opts)?);
    }
    let mut report = Vec::new();
    for vm in &mut clones {
        match vm.control(Request::Status, CONTROL_TIMEOUT).await? {
            Reply::Status {
                state: VmState::Restored,
                ..
            } => {}
            other => return Err(vm.fail(format!("status before restore: {other:?}"))),
        }
    }
    for vm in &mut clones {
        let t = Instant::now();
        let info = restore(vm, &saved).await?;
        if info.memory_mode != "private" {
            return Err(vm.fail(format!(
                "memory_mode {} for a VM without virtio-fs, want private",
                info.memory_mode
            )));
        }
        let conn = vm.connect(s.timeout).await?;
        let (answering, restore_to_health) = (vm.started.elapsed(), t.elapsed());
        let guest = vm.guest_info(&conn).await?;
        if guest.online_cpus != 1 {
            return Err(vm.fail(format!(
                "GuestInfo online_cpus = {}, want 1",
                guest.online_cpus
            )));
        }
        let behind = host_minus_guest_clock(vm, &conn).await?;
        let req = CreateSandboxRequest {
            sandbox_id: format!("clone-{}", report.len()),
            entropy_seed: random_seed(),
            wall_clock_unix_ns: unix_now_ns(),
            ..Default::default()
        };
        conn.agent()
            .create_sandbox(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
            .await
            .map_err(|e| vm.fail(format!("CreateSandbox failed: {e}")))?;
        let behind_after = host_minus_guest_clock(vm, &conn).await?;
        if behind_after.abs() > 2 {
            return Err(vm.fail(format!(
                "the guest's wall clock is {behind_after} s off the host's after CreateSandbox \
                 ({behind} s before)"
            )));
        }
        let uuid = vm
            .read_guest_file(&conn, "/proc/sys/kernel/random/uuid")
            .await?;
        report.push(Clone {
            setup_us: info.setup_us,
            restore_us: info.took_us,
            restore_to_health,
            answering,
            uuid: uuid.trim().to_owned(),
            clock_behind_s: behind,
            rss_kib: 0,
            pss_kib: 0,
        });
    }
    // Memory once both run: the pages both have read from the file are
    // shared from then on.
    for (vm, c) in clones.iter().zip(&mut report) {
        c.rss_kib = vm.rss_kib()?;
        c.pss_kib = vm.pss_kib()?;
    }
    for vm in &mut clones {
        vm.kill();
    }
    let [a, b] = [&report[0], &report[1]];
    let mut detail = format!(
        "cold boot to agent ready {:.2}s, answering {:.2}s; snapshot {} ms ({} MiB of {} MiB \
         written); ",
        cold.announced.as_secs_f64(),
        cold.answering.as_secs_f64(),
        saved.took_ms,
        saved.memory_data_bytes >> 20,
        saved.memory_bytes >> 20
    );
    for (name, c) in [("a", a), ("b", b)] {
        detail.push_str(&format!(
            "clone {name}: built in {} ms, restore op {} us, agent answering {:.2}s after start \
             ({:.2}s after restore), clock {} s behind until CreateSandbox, RSS {} MiB, PSS {} \
             MiB; ",
            c.setup_us / 1000,
            c.restore_us,
            c.answering.as_secs_f64(),
            c.restore_to_health.as_secs_f64(),
            c.clock_behind_s,
            c.rss_kib >> 10,
            c.pss_kib >> 10
        ));
    }
    if a.uuid == b.uuid {
        return Err(Failure::from(format!(
            "both clones drew the random UUID {} after CreateSandbox brought each its own \
             entropy; {detail}",
            a.uuid
        )));
    }
    detail.push_str("random UUIDs after CreateSandbox differ");
    // Both clones map the one memory file: the pages they share count
    // half in each PSS. A clone whose PSS is its whole RSS shares nothing,
    // which means its RAM is not the file's page cache.
    for (name, c) in [("a", a), ("b", b)] {
        if c.pss_kib >= c.rss_kib {
            return Err(Failure::from(format!(
                "clone {name} shares no memory with the other (PSS {} KiB, RSS {} KiB); {detail}",
                c.pss_kib, c.rss_kib
            )));
        }
    }
    Ok(Verdict::Pass(detail))
}

/// One clone's figures.
struct Clone {
    setup_us: u64,
    restore_us: u64,
    restore_to_health: Duration,
    answering: Duration,
    uuid: String,
    /// Host clock minus guest clock before CreateSandbox, in s.
    clock_behind_s: i64,
    rss_kib: u64,
    pss_kib: u64,
}

/// 64 bytes from the test host's CSPRNG.
fn random_seed() -> Vec<u8> {
    let mut seed = vec![0u8; 64];
    boxlite_protocol::random::fill(&mut seed).expect("getrandom");
    seed
}

fn unix_now_ns() -> i64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("the test host's clock is after 1970");
    i64::try_from(now.as_nanos()).expect("before 2262")
}

/// The host's wall clock minus the guest's, in whole seconds: the guest's
/// is its boot time (`btime` of /proc/stat, which moves when the clock is
/// stepped) plus its uptime.
async fn host_minus_guest_clock(vm: &Vm, conn: &AgentConnection) -> Result<i64, Failure> {
    let stat = vm.read_guest_file(conn, "/proc/stat").await?;
    let uptime = vm.read_guest_file(conn, "/proc/uptime").await?;
    let btime: i64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| vm.fail("/proc/stat has no btime line".into()))?;
    let up: f64 = uptime
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| vm.fail(format!("/proc/uptime is {uptime:?}")))?;
    let guest = btime as f64 + up;
    let host = unix_now_ns() as f64 / 1e9;
    Ok((host - guest).round() as i64)
}

/// How long the template's cold boot took from the VMM's start.
pub struct ColdBoot {
    /// To the agent's announcement (it listens from then on).
    pub announced: Duration,
    /// To the agent answering Health on a fresh connection.
    pub answering: Duration,
}

/// A template: a VM booted to its agent's announcement, paused, saved
/// into `dir` and ended.
pub struct Template {
    pub dir: std::path::PathBuf,
    pub saved: boxlite_vmm_api::control::SnapshotInfo,
}

impl Template {
    /// Boots VM `<name>-src` with `devices`, the runtime's balloon and
    /// `opts`, and saves it into `<work>/<name>-files`. Returns the
    /// template and the cold boot's times ([`ColdBoot`]). The source's
    /// one host connection (the Health check) is closed before the save;
    /// a restored guest drops whatever is left of it at the transport
    /// reset.
    pub async fn take(
        s: &Settings,
        name: &str,
        devices: &[Device],
        opts: &VmOptions,
    ) -> Result<(Template, ColdBoot), Failure> {
        let dir = s.work.join(format!("{name}-files"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let JailUser { uid, gid } = JailUser::NOBODY;
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        let mut src = Vm::start_with(
            s,
            &format!("{name}-src"),
            1,
            devices,
            &VmOptions {
                control_socket: true,
                snapshot_dir: Some(dir.clone()),
                balloon: Some(BALLOON),
                ..opts.clone()
            },
        )?;
        src.announcement(s.timeout).await?;
        let announced = src.started.elapsed();
        drop(src.connect(s.timeout).await?);
        let cold = ColdBoot {
            announced,
            answering: src.started.elapsed(),
        };
        expect_state(&mut src, Request::Pause, VmState::Paused).await?;
        let saved = match src
            .control(
                Request::Snapshot {
                    state_file: "vm.state".into(),
                    memory_file: "vm.mem".into(),
                },
                CONTROL_TIMEOUT,
            )
            .await?
        {
            Reply::Snapshot { snapshot, .. } => snapshot,
            other => return Err(src.fail(format!("snapshot answered {other:?}"))),
        };
        src.kill();
        Ok((Template { dir, saved }, cold))
    }

    /// Options for a VM restored from this template (`mode` memory, the
    /// runtime's balloon) on top of `opts`.
    pub fn restore_options(&self, mode: MemoryMode, opts: &VmOptions) -> VmOptions {
        VmOptions {
            control_socket: true,
            restore: Some(RestoreConfig {
                state: self.dir.join("vm.state"),
                memory: self.dir.join("vm.mem"),
                memory_mode: mode,
            }),
            balloon: Some(BALLOON),
            ..opts.clone()
        }
    }
}

/// Sends `restore` (for the template's snapshot) and returns what the VMM
/// reported.
pub async fn restore(
    vm: &mut Vm,
    saved: &boxlite_vmm_api::control::SnapshotInfo,
) -> Result<boxlite_vmm_api::control::RestoreInfo, Failure> {
    match vm
        .control(
            Request::Restore {
                snapshot_id: Some(saved.id.clone()),
            },
            CONTROL_TIMEOUT,
        )
        .await?
    {
        Reply::Restored { restore, .. } => Ok(restore),
        other => Err(vm.fail(format!("restore answered {other:?}"))),
    }
}

/// Sends `request` (pause or resume) and expects the VM in `want`.
async fn expect_state(vm: &mut Vm, request: Request, want: VmState) -> Result<(), Failure> {
    match vm.control(request.clone(), CONTROL_TIMEOUT).await? {
        Reply::State { state } if state == want => Ok(()),
        other => Err(vm.fail(format!("{request} answered {other:?}, want {want}"))),
    }
}
