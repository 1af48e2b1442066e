//! `balloon`: memory the guest frees goes back to the host.
//!
//! The guest needs no program of ours to use and free memory: its own
//! initramfs unpacking does it. The scenario boots the guest with its
//! initramfs plus two more archive members, one writing [`BALLAST_MIB`] of
//! zeros to `/ballast` (tmpfs: every page is guest RAM the host must back)
//! and one a 0-byte `/ballast` again, which the kernel opens with `O_TRUNC`
//! — the ballast is freed before the agent starts. Three VMs, one after
//! the other, and what the host holds for each once the agent answers —
//! the VM process's resident memory (`VmRSS`, guest RAM included) and the
//! blocks of its guest RAM memfd (RSS alone would be fooled by a VMM that
//! only unmaps shared pages: they would leave its RSS and stay in the
//! memfd):
//!
//! 1. balloon on, no ballast: the baseline;
//! 2. ballast, no balloon: the control — the freed memory stays with the
//!    VMM (at least 80 % of the ballast above the baseline, by both
//!    measures), which proves the ballast really was touched;
//! 3. ballast, balloon on (as the runtime configures it): free page
//!    reporting must bring both back within a quarter of the ballast of the
//!    baseline, and the balloon's counters must show the reports.

use std::time::{Duration, Instant};

use boxlite_vmm_api::config::BalloonConfig;
use boxlite_vmm_api::control::DeviceCounters;
use xtask::initramfs::Initramfs;

use crate::settings::Settings;
use crate::verdict::{Failure, ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm, VmOptions};

/// What the guest touches and frees.
const BALLAST_MIB: u64 = 200;
/// Guest RAM: the initramfs's tmpfs may hold half of it, so twice the
/// ballast and more.
const GUEST_MIB: u32 = 512;
/// The runtime's balloon with free page reporting on (the default).
const BALLOON: BalloonConfig = boxlite_runtime::hypervisor::builtin::balloon(true, 0);
/// How long the freed memory may take to go back: Linux reports free
/// blocks 2 s after enough were freed, in batches; the nested host is slow.
const GIVE_BACK_TIMEOUT: Duration = Duration::from_secs(90);

pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (the agent answers over vsock)"
        )));
    }
    let ballast = write_ballast_initramfs(s)?;
    let ballast_kib = BALLAST_MIB << 10;

    // Quiet for three of Linux's 2 s reporting delays: the balloon has
    // given back what the boot freed.
    let base = settled(
        s,
        "balloon-base",
        None,
        Some(BALLOON),
        Duration::from_secs(6),
    )
    .await?;
    let without = settled(
        s,
        "balloon-off",
        Some(ballast.clone()),
        None,
        Duration::from_secs(3),
    )
    .await?;
    let premise = base.plus(ballast_kib * 8 / 10);
    if without.ram_kib < premise.ram_kib || without.rss_kib < premise.rss_kib {
        return Err(Failure::from(format!(
            "the control VM (ballast, no balloon) holds {without}, the baseline {base}: the \
             {BALLAST_MIB} MiB ballast did not reach host memory, so this scenario proves nothing"
        )));
    }

    let mut vm = start(s, "balloon", Some(ballast), Some(BALLOON))?;
    let conn = vm.connect(s.timeout).await?;
    let limit = base.plus(ballast_kib / 4);
    let t = Instant::now();
    let mut now = Held::of(&vm)?;
    while now.ram_kib > limit.ram_kib || now.rss_kib > limit.rss_kib {
        if t.elapsed() > GIVE_BACK_TIMEOUT {
            return Err(vm.fail(format!(
                "with the balloon the VMM still holds {now} {}s after the agent answered; \
                 baseline {base}, without the balloon {without}, want at most {limit}",
                GIVE_BACK_TIMEOUT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = Held::of(&vm)?;
    }
    let gave_back = t.elapsed();
    let metrics = vm.metrics()?;
    let balloon = metrics.devices.values().find_map(|d| match d {
        DeviceCounters::Balloon(b) => Some(b.clone()),
        _ => None,
    });
    let Some(b) = balloon else {
        return Err(vm.fail(format!("the VMM's metrics list no balloon: {metrics:?}")));
    };
    if b.reported_bytes < ballast_kib * 1024 / 2 || b.bad_ranges != 0 || b.discard_errors != 0 {
        return Err(vm.fail(format!(
            "balloon counters: {b:?}; want at least half the ballast reported, no bad range, \
             no discard error"
        )));
    }
    vm.destroy(&conn).await?;
    Ok(Verdict::Pass(format!(
        "the VM's host memory: baseline {base}; {BALLAST_MIB} MiB touched and freed by the \
         guest: without the balloon {without}, with it {now} ({:.1}s after the agent \
         answered); {} reports, {} MiB reported",
        gave_back.as_secs_f64(),
        b.reports,
        b.reported_bytes >> 20
    )))
}

/// A VM of this scenario: rng, vsock, 512 MiB, the control socket.
fn start(
    s: &Settings,
    name: &str,
    initramfs: Option<std::path::PathBuf>,
    balloon: Option<BalloonConfig>,
) -> Result<Vm, Failure> {
    let opts = VmOptions {
        memory_mib: Some(GUEST_MIB),
        initramfs,
        balloon,
        control_socket: true,
        ..VmOptions::default()
    };
    Vm::start_with(s, name, 1, &[Device::Rng, Device::Vsock], &opts)
}

/// What the host holds for a VM: the VMM's resident memory (`VmRSS`,
/// guest RAM it has mapped included) and the guest RAM memfd's allocated
/// size (what the host really keeps; see [`Vm::guest_ram_kib`]).
#[derive(Clone, Copy)]
struct Held {
    rss_kib: u64,
    ram_kib: u64,
}

impl Held {
    fn of(vm: &Vm) -> Result<Held, Failure> {
        Ok(Held {
            rss_kib: vm.rss_kib()?,
            ram_kib: vm.guest_ram_kib()?,
        })
    }

    fn plus(self, kib: u64) -> Held {
        Held {
            rss_kib: self.rss_kib + kib,
            ram_kib: self.ram_kib + kib,
        }
    }
}

impl std::fmt::Display for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RSS {} MiB, guest RAM memfd {} MiB",
            self.rss_kib >> 10,
            self.ram_kib >> 10
        )
    }
}

/// Boots a VM, waits for its agent, then for what the host holds to
/// settle (the memfd within 1 MiB of one reading for `quiet`; at most
/// [`GIVE_BACK_TIMEOUT`]), and ends it. Returns the last reading.
async fn settled(
    s: &Settings,
    name: &str,
    initramfs: Option<std::path::PathBuf>,
    balloon: Option<BalloonConfig>,
    quiet: Duration,
) -> Result<Held, Failure> {
    let mut vm = start(s, name, initramfs, balloon)?;
    let conn = vm.connect(s.timeout).await?;
    let mut now = Held::of(&vm)?;
    let (mut anchor, mut since) = (now.ram_kib, Instant::now());
    let deadline = Instant::now() + GIVE_BACK_TIMEOUT;
    while since.elapsed() < quiet && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        now = Held::of(&vm)?;
        if now.ram_kib.abs_diff(anchor) > 1024 {
            (anchor, since) = (now.ram_kib, Instant::now());
        }
    }
    vm.destroy(&conn).await?;
    Ok(now)
}

/// The guest initramfs with the ballast members appended (Linux unpacks
/// concatenated archives in order); written once to the work directory.
fn write_ballast_initramfs(s: &Settings) -> Result<std::path::PathBuf, Failure> {
    let out = s.work.join("balloon-initramfs.cpio.gz");
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(&s.work)?;
    let mut bytes = std::fs::read(s.guest_initramfs())
        .map_err(|e| format!("cannot read {}: {e}", s.guest_initramfs().display()))?;
    let zeros = vec![0u8; (BALLAST_MIB << 20) as usize];
    for member in [
        Initramfs::new().file_bytes("ballast", zeros, 0o600),
        Initramfs::new().file_bytes("ballast", Vec::new(), 0o600),
    ] {
        bytes.extend(
            member
                .to_bytes()
                .map_err(|e| format!("cannot build the ballast archive: {e}"))?,
        );
    }
    std::fs::write(&out, bytes).map_err(|e| format!("cannot write {}: {e}", out.display()))?;
    Ok(out)
}
