//! Builds a VM from a [`VmConfig`] and runs it until it ends.
//!
//! Threads: the calling thread becomes the `vmm` thread (event loop: device
//! queues and the exit signal); each vCPU runs on its own `vcpu<N>` thread.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use linux_loader::cmdline::Cmdline;

use crate::arch::x86_64::boot::{self, BootError};
use crate::arch::x86_64::cpuid;
use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::arch::x86_64::mptable::{self, MptableError};
use crate::arch::x86_64::regs::BootEntry;
use crate::config::{
    mac_bytes, ConfigError, CpuMode, DeviceConfig, EscapeProbe, Validate, VmConfig,
};
use crate::control::{ControlError, ControlServer, RestoreCtx, SnapshotCtx, VmControl};
use crate::device_manager::{DeviceManager, DeviceManagerError};
use crate::devices::virtio::balloon::{Balloon, PAGES_PER_MIB};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::fs::{Fs, FsError, FsEventHandler};
use crate::devices::virtio::net::{Net, NetError, NetEventHandler, Tap};
use crate::devices::virtio::rng::{Rng, RngError};
use crate::devices::virtio::vsock::{Vsock, VsockError, VsockEventHandler};
use crate::devices::virtio::VirtioDevice;
use crate::jail::{JailError, JailPolicy};
use crate::metrics::{DeviceMetrics, VmMetrics};
use crate::snapshot::restore::{self, Loaded, RestoreError};
use crate::threads::{spawn_thread, ThreadKind};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{ExitSignal, Vcpu, VcpuError, VcpuHandle};
use crate::vstate::vcpu_state::saveable_msrs;
use crate::vstate::vm::{Vm, VmError};

pub use crate::vstate::vcpu::ExitReason;

/// The kernel command line the VMM always passes, before the config's extras.
/// `no_timer_check`: skip the kernel's check that the timer interrupt
/// arrives within a few ticks, which a busy host (or nested virtualization)
/// can fail, panicking the guest at boot.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux \
     i8042.nomux i8042.dumbkbd no_timer_check";

/// Top-level VMM error: one variant per module.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("Invalid configuration")]
    Config(#[from] ConfigError),
    #[error("Guest memory setup failed")]
    Memory(#[from] MemoryError),
    #[error("KVM VM setup failed")]
    Vm(#[from] VmError),
    #[error("vCPU setup failed")]
    Vcpu(#[from] VcpuError),
    #[error("Loading the guest failed")]
    Boot(#[from] BootError),
    #[error("MP table setup failed")]
    Mptable(#[from] MptableError),
    #[error("Device setup failed")]
    Devices(#[from] DeviceManagerError),
    #[error("virtio-rng setup failed")]
    Rng(#[from] RngError),
    #[error("virtio-vsock setup failed")]
    Vsock(#[from] VsockError),
    #[error("virtio-fs setup failed")]
    Fs(#[from] FsError),
    #[error("virtio-blk setup failed")]
    Block(#[from] BlockError),
    #[error("virtio-net setup failed")]
    Net(#[from] NetError),
    #[error("Kernel command line error")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    #[error("Failed to open the console log {0}")]
    Console(std::path::PathBuf, #[source] std::io::Error),
    #[error("console_fd = {0} is not an open file descriptor")]
    ConsoleFd(RawFd),
    #[error("Failed to read the raw image {0}")]
    RawImage(std::path::PathBuf, #[source] std::io::Error),
    #[error("Failed to open snapshot_dir {0}")]
    SnapshotDir(std::path::PathBuf, #[source] std::io::Error),
    #[error("Failed to list the MSRs a snapshot saves")]
    SnapshotMsrs(#[source] crate::vstate::vcpu_state::VcpuStateError),
    #[error("Restoring the snapshot failed")]
    Restore(#[from] RestoreError),
    #[error("restore: KVM refused the snapshot's state")]
    RestoreState(#[source] crate::vstate::vcpu_state::VcpuStateError),
    #[error("restore: KVM refused the snapshot's VM state")]
    RestoreVmState(#[source] crate::vstate::vm_state::VmStateError),
    #[error("Event loop failed")]
    EventLoop(#[source] event_manager::Error),
    #[error("Failed to create the exit eventfd")]
    ExitEvent(#[source] std::io::Error),
    #[error("vCPU {0} did not start")]
    VcpuStart(u8),
    #[error("Control socket setup failed")]
    Control(#[from] ControlError),
    #[error("Jail setup failed")]
    Jail(#[from] JailError),
    #[error("Test hook: a forbidden syscall in a {0} thread was allowed")]
    ForbiddenSyscallAllowed(String),
}

impl VmmError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmmError::Config(_) => crate::exit_code::CONFIG_ERROR,
            VmmError::Restore(e) if e.is_input_error() => crate::exit_code::CONFIG_ERROR,
            VmmError::Jail(_) => crate::exit_code::JAIL_ERROR,
            VmmError::Vcpu(VcpuError::Spawn(_)) if crate::threads::seccomp_enabled() => {
                crate::exit_code::JAIL_ERROR
            }
            _ => crate::exit_code::VMM_ERROR,
        }
    }
}

/// Wakes the event loop when the exit signal is set.
struct ExitWatcher {
    exit: Arc<ExitSignal>,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.exit.eventfd(), EventSet::IN)) {
            tracing::error!(error = ?e, "failed to watch the exit eventfd");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.exit.eventfd().read();
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn build_cmdline() -> Result<Cmdline, VmmError> {
    let mut c = Cmdline::new(CMDLINE_MAX_SIZE).map_err(VmmError::Cmdline)?;
    c.insert_str(DEFAULT_CMDLINE).map_err(VmmError::Cmdline)?;
    Ok(c)
}

/// Test hooks (`test_hooks.forbidden_syscall`, `test_hooks.forbidden_ioctl`):
/// a jailed thread of the named kind calls `getppid`, which no profile
/// allows, or `ioctl(TCGETS)`, a request no profile lists; the kernel must
/// kill the whole process with SIGSYS before this returns.
fn run_forbidden_syscall_hook(cfg: &VmConfig) -> Result<(), VmmError> {
    let Some(hooks) = cfg.test_hooks.as_ref() else {
        return Ok(());
    };
    if let Some(kind) = hooks.forbidden_syscall.as_deref() {
        // SAFETY: getppid has no arguments and no memory effects.
        forbidden_call(kind, "getppid", || unsafe {
            libc::syscall(libc::SYS_getppid);
        })?;
    }
    if let (Some(probe), Some(kind)) = (&hooks.escape, hooks.escape_thread.as_deref()) {
        if kind != UNFILTERED {
            escape_hook(kind, probe)?;
        }
    }
    if let Some(kind) = hooks.forbidden_ioctl.as_deref() {
        forbidden_call(kind, "ioctl(TCGETS)", || {
            // SAFETY: termios is plain old data; all zeroes is valid.
            let mut t: libc::termios = unsafe { std::mem::zeroed() };
            // SAFETY: TCGETS writes one termios into the live local.
            unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TCGETS, &mut t) };
        })?;
    }
    Ok(())
}

/// `escape_thread` value that runs the escape probe on the main thread
/// after the jail but before any seccomp filter is loaded.
const UNFILTERED: &str = "unfiltered";

/// The `escape` hook ([`crate::jail::escape_probe`]) on a thread of `kind`
/// (`"vmm"`: the event loop, `"vcpu"`: a vCPU-kind thread, [`UNFILTERED`]:
/// the main thread before seccomp). Denied: logged, and the VM runs on.
fn escape_hook(kind: &str, probe: &EscapeProbe) -> Result<(), VmmError> {
    tracing::warn!(kind, ?probe, "test hook: trying an escape");
    let p = probe.clone();
    let outcome = if kind == "vcpu" {
        let h = spawn_thread(ThreadKind::Vcpu, "escape", move || {
            crate::jail::escape_probe::attempt(&p)
        })
        .map_err(JailError::Thread)?;
        h.join()
            .unwrap_or_else(|_| Err(std::io::Error::other("probe thread panicked")))
    } else {
        crate::jail::escape_probe::attempt(&p)
    };
    match outcome {
        Err(e) => {
            tracing::warn!(kind, ?probe, "test hook: escape denied: {e}");
            Ok(())
        }
        Ok(()) => {
            tracing::error!(kind, ?probe, "test hook: the escape was allowed");
            Err(VmmError::ForbiddenSyscallAllowed(kind.to_string()))
        }
    }
}

/// Runs `call` on a thread of `kind` (the event loop itself for `"vmm"`);
/// returning at all means the filter let it through.
fn forbidden_call(
    kind: &str,
    what: &str,
    call: impl FnOnce() + Send + 'static,
) -> Result<(), VmmError> {
    tracing::warn!(kind, "test hook: making a forbidden syscall ({what})");
    if kind == "vcpu" {
        let h = spawn_thread(ThreadKind::Vcpu, "forbidden", call).map_err(JailError::Thread)?;
        let _ = h.join();
    } else {
        call();
    }
    tracing::error!(
        kind,
        "test hook: the forbidden syscall was allowed ({what})"
    );
    Err(VmmError::ForbiddenSyscallAllowed(kind.to_string()))
}

/// Opens the `snapshot_dir` as a directory handle (`O_PATH`): the
/// `snapshot` op creates its files relative to it once the jail has
/// hidden every path.
fn open_snapshot_dir(dir: &std::path::Path) -> Result<OwnedFd, VmmError> {
    use nix::fcntl::OFlag;
    nix::fcntl::open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| VmmError::SnapshotDir(dir.to_path_buf(), e.into()))
}

/// Takes ownership of the inherited console fd (`console_fd`).
fn inherited_console(fd: RawFd) -> Result<File, VmmError> {
    // SAFETY: F_GETFD only reads the descriptor flags of `fd`.
    if fd < 3 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(VmmError::ConsoleFd(fd));
    }
    // SAFETY: the config hands this fd to the VMM to own; it is open
    // (F_GETFD succeeded), not stdio, and nothing else in the VMM wraps it.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Puts a snapshot's state into `vcpu`, just created: after checking that
/// this host gives it the CPU it was saved with ([`restore::check_cpuid`])
/// and running its TSC at the saved rate.
fn restore_vcpu(
    vm: &Vm,
    vcpu: &Vcpu,
    base_cpuid: &kvm_bindings::CpuId,
    nvcpus: u8,
    body: &crate::snapshot::body::SnapshotBody,
) -> Result<(), VmmError> {
    let id = vcpu.id();
    let saved = &body.vcpus[usize::from(id)];
    // The saved CPUID is what KVM reported for the booted vCPU, which is
    // not always what was set (a nested KVM may mix in its own view), so
    // compare it with what KVM reports here for the same boot CPUID; and
    // give the vCPU that boot CPUID again.
    let boot = vcpu.boot_cpuid(base_cpuid, nvcpus)?;
    let fd = vcpu.fd();
    fd.set_cpuid2(&boot)
        .map_err(|e| VcpuError::SetCpuid(id, e))?;
    let here = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| VcpuError::GetCpuid(id, e))?;
    restore::check_cpuid(id, &saved.cpuid, here.as_slice())?;
    restore::match_tsc_rate(vm.kvm(), id, fd, saved.tsc_khz)?;
    saved
        .restore_with_cpuid(fd, &boot)
        .map_err(VmmError::RestoreState)?;
    // Tell a kvmclock guest it was stopped, so its soft-lockup watchdog
    // does not take the time in the snapshot for a hang. KVM refuses
    // (EINVAL) where the guest has no kvmclock: nothing to tell then.
    if let Err(e) = vcpu.fd().kvmclock_ctrl() {
        tracing::debug!(vcpu = id, error = %e, "KVM_KVMCLOCK_CTRL not applied");
    }
    Ok(())
}

/// Builds the VM described by `cfg` and runs it until it ends. With the
/// jail on, `parent` is what [`crate::jail::isolate_process`] returned (the
/// jail needs its own pid namespace); None is an error then.
pub fn run_vm(
    cfg: &VmConfig,
    parent: Option<&crate::jail::pidns::ParentLink>,
) -> Result<ExitReason, VmmError> {
    cfg.validate()?;
    let start = std::time::Instant::now();
    // A restore reads and checks its files first: a bad snapshot is
    // refused before anything else is built.
    let (ram, snapshot) = match &cfg.restore {
        Some(r) => {
            let Loaded {
                header,
                body,
                ram,
                memory_mode,
            } = restore::load(cfg, r)?;
            (ram, Some((header, body, memory_mode)))
        }
        None => (create_guest_memory(cfg.memory_bytes())?, None),
    };
    let body = snapshot.as_ref().map(|(_, body, _)| body);
    let mem = ram.mem.clone();
    let vm = Vm::new(cfg.irqchip)?;
    vm.register_memory(&mem)?;
    let exit = Arc::new(ExitSignal::new().map_err(VmmError::ExitEvent)?);

    let console: Box<dyn Write + Send> = match (&cfg.console_log, cfg.console_fd) {
        (Some(p), _) => Box::new(File::create(p).map_err(|e| VmmError::Console(p.clone(), e))?),
        (None, Some(fd)) => Box::new(inherited_console(fd)?),
        (None, None) => Box::new(std::io::sink()),
    };
    let mut devices = DeviceManager::new();
    devices.attach_legacy(
        &vm,
        console,
        exit.clone(),
        body.and_then(|b| b.serial.as_ref()),
    )?;

    let mut cmdline = build_cmdline()?;
    // Backend subscribers of devices with host fds of their own (vsock).
    let mut backends: Vec<Subscriber> = Vec::new();
    let mut metrics = VmMetrics::default();
    for (i, d) in cfg.devices.iter().enumerate() {
        let dev: Arc<Mutex<dyn VirtioDevice>> = match d {
            DeviceConfig::Rng(r) => {
                let rng = Rng::new(r.source.as_deref())?;
                metrics
                    .devices
                    .push((format!("rng{i}"), DeviceMetrics::Rng(rng.metrics.clone())));
                Arc::new(Mutex::new(rng))
            }
            DeviceConfig::Vsock(v) => {
                let mut vsock = Vsock::new(v.guest_cid, &v.uds_path)?;
                // Jailed, the VMM connects nowhere once the guest runs.
                if cfg.jail || !v.host_ports.is_empty() {
                    vsock.preconnect(&v.host_ports)?;
                }
                metrics.devices.push((
                    format!("vsock{i}"),
                    DeviceMetrics::Vsock(vsock.metrics.clone()),
                ));
                let vsock = Arc::new(Mutex::new(vsock));
                backends.push(Arc::new(Mutex::new(VsockEventHandler::new(vsock.clone()))));
                vsock
            }
            DeviceConfig::Fs(f) => {
                let mut fs = Fs::new(&f.tag, &f.socket_path)?;
                if cfg.jail {
                    fs.connect_now()?;
                }
                metrics
                    .devices
                    .push((format!("fs{i}"), DeviceMetrics::Fs(fs.metrics.clone())));
                let fs = Arc::new(Mutex::new(fs));
                backends.push(Arc::new(Mutex::new(FsEventHandler::new(fs.clone()))));
                fs
            }
            DeviceConfig::Block(b) => {
                let blk = Block::new(&b.path, b.read_only, &b.id)?;
                metrics.devices.push((
                    format!("block{i}"),
                    DeviceMetrics::Block(blk.metrics.clone()),
                ));
                Arc::new(Mutex::new(blk))
            }
            DeviceConfig::Net(n) => {
                let tap = match (n.tap_fd, &n.tap_name) {
                    (Some(fd), _) => Tap::from_fd(fd)?,
                    (None, name) => Tap::open(name.as_deref().unwrap_or_default())?,
                };
                let mac = mac_bytes(n).map_err(ConfigError::from)?;
                let net = Net::new(Box::new(tap), mac)?;
                metrics
                    .devices
                    .push((format!("net{i}"), DeviceMetrics::Net(net.metrics.clone())));
                let net = Arc::new(Mutex::new(net));
                backends.push(Arc::new(Mutex::new(NetEventHandler::new(net.clone()))));
                net
            }
        };
        // A restored guest found its devices when it booted.
        let announce = body.is_none().then_some(&mut cmdline);
        devices.attach_virtio(&vm, &mem, d.kind(), dev, announce)?;
    }
    let mut balloon_handle = None;
    if let Some(b) = &cfg.balloon {
        // The slot after the devices; its queues run on the event loop
        // through the generic handler (the balloon has no host fd).
        let mut balloon = Balloon::new(b.deflate_on_oom, b.free_page_reporting);
        // Not active yet, so no interrupt: the driver reads the target
        // when it probes the device.
        balloon
            .set_target_pages(b.target_mib * PAGES_PER_MIB)
            .expect("an inactive balloon raises no interrupt");
        let name = format!("balloon{}", cfg.devices.len());
        metrics.devices.push((
            name.clone(),
            DeviceMetrics::Balloon(balloon.metrics.clone()),
        ));
        let balloon = Arc::new(Mutex::new(balloon));
        balloon_handle = Some(balloon.clone());
        let announce = body.is_none().then_some(&mut cmdline);
        devices.attach_virtio(&vm, &mem, "balloon", balloon, announce)?;
    }
    if let Some(body) = body {
        // Before any vCPU exists: nothing can touch a device meanwhile.
        devices.restore_virtio_states(&body.devices)?;
    }
    if !cfg.cmdline.is_empty() {
        cmdline
            .insert_str(&cfg.cmdline)
            .map_err(VmmError::Cmdline)?;
    }

    let entry = match (&cfg.kernel, &cfg.raw_image) {
        (Some(kernel), _) => Some({
            let e = boot::load_linux(
                &mem,
                cfg.memory_bytes(),
                kernel,
                cfg.initramfs.as_deref(),
                &cmdline,
            )?;
            mptable::setup_mptable(&mem, cfg.vcpus)?;
            e
        }),
        (None, Some(raw)) => Some({
            let code =
                std::fs::read(&raw.path).map_err(|e| VmmError::RawImage(raw.path.clone(), e))?;
            boot::load_raw_image(&mem, &code, raw.load_addr)?;
            match raw.mode {
                CpuMode::Real => BootEntry::RawReal {
                    entry: raw.load_addr,
                },
                CpuMode::Long => BootEntry::RawLong {
                    entry: raw.load_addr,
                },
            }
        }),
        // Restored: the vCPUs' registers come from the snapshot.
        (None, None) => None,
    };
    let raw = cfg.raw_image.is_some();

    let pio = Arc::new(std::mem::take(&mut devices.pio));
    let mmio = Arc::new(std::mem::take(&mut devices.mmio));
    let mut base_cpuid = vm.supported_cpuid()?;
    // Before the jail: the clock policy reads the host's clocksource.
    let (clock, host_clocksource) = cpuid::ClockPolicy::from_host();
    cpuid::normalize_vm(&mut base_cpuid, clock);
    tracing::info!(
        host_clocksource = host_clocksource.as_deref().unwrap_or("unknown"),
        invariant_tsc_allowed = clock.invariant_tsc,
        invariant_tsc = cpuid::advertises_invariant_tsc(&base_cpuid),
        "CPUID normalised: no PMU; invariant TSC only if KVM has it and the host keeps time by its TSC"
    );
    // The snapshot directory, opened now: the jail hides every path.
    let snapshot_dir = cfg
        .snapshot_dir
        .as_deref()
        .map(open_snapshot_dir)
        .transpose()?;
    let mut msr_indices: Arc<[u32]> = Arc::from(Vec::new());
    let mut vcpus = Vec::with_capacity(cfg.vcpus as usize);
    for id in 0..cfg.vcpus {
        let fd = vm.create_vcpu(id)?;
        let vcpu = Vcpu::new(id, fd, pio.clone(), mmio.clone(), exit.clone());
        metrics.vcpus.push(vcpu.metrics());
        match body {
            Some(body) => restore_vcpu(&vm, &vcpu, &base_cpuid, cfg.vcpus, body)?,
            None => {
                // Linux: only the boot vCPU gets registers; the others wait
                // for INIT/SIPI in the in-kernel LAPIC. Raw images: every
                // vCPU starts at the entry point (there is no LAPIC to
                // start them).
                let e = entry.filter(|_| id == 0 || raw);
                vcpu.configure(&mem, &base_cpuid, cfg.vcpus, cfg.irqchip, e)?;
            }
        }
        if id == 0 && snapshot_dir.is_some() {
            // The MSRs a snapshot saves, probed once on a configured vCPU
            // (which ones KVM reads depends on the CPUID it runs with).
            msr_indices = saveable_msrs(vm.kvm(), 0, vcpu.fd(), cfg.irqchip)
                .map_err(VmmError::SnapshotMsrs)?
                .into();
        }
        vcpus.push(vcpu);
    }
    if let Some(body) = body {
        // After the vCPUs (the clock is set against their restored TSCs),
        // and before anything can raise an interrupt: restoring the
        // interrupt controllers overwrites what is pending in them.
        body.vm
            .state
            .restore(vm.fd())
            .map_err(VmmError::RestoreVmState)?;
    }

    let mut em: EventManager<Subscriber> = EventManager::new().map_err(VmmError::EventLoop)?;
    em.add_subscriber(Arc::new(Mutex::new(ExitWatcher { exit: exit.clone() })));
    for h in devices.handlers.drain(..) {
        em.add_subscriber(Arc::new(Mutex::new(h)));
    }
    for b in backends {
        em.add_subscriber(b);
    }

    let control = match &cfg.control_socket {
        Some(path) => {
            let server = Arc::new(Mutex::new(ControlServer::bind(path)?));
            em.add_subscriber(server.clone());
            Some(server)
        }
        None => None,
    };

    // The jail: everything is open now and no other thread exists yet.
    if cfg.jail {
        crate::jail::apply(&JailPolicy::from_config(cfg), parent)?;
        if let Some(path) = cfg
            .test_hooks
            .as_ref()
            .and_then(|h| h.open_after_landlock.as_ref())
        {
            let r = File::open(path).map(|_| ());
            tracing::warn!(path = %path.display(), result = ?r, "test hook: open after landlock");
        }
        if let Some(hooks) = &cfg.test_hooks {
            if let (Some(probe), Some(UNFILTERED)) = (&hooks.escape, hooks.escape_thread.as_deref())
            {
                escape_hook(UNFILTERED, probe)?;
            }
        }
    } else {
        tracing::warn!("!!! JAIL DISABLED: no cgroup, rlimits, no_new_privs, landlock or seccomp; debugging only, never in production !!!");
    }

    let mut handles = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        handles.push(VcpuHandle::spawn(v)?);
    }
    if cfg.jail {
        // Invariant: the event loop's filter is on before any guest code runs.
        crate::seccomp::apply_event_loop(cfg.snapshot_dir.is_some()).map_err(JailError::from)?;
        tracing::info!(
            vmm_syscalls = crate::seccomp::allowed_syscalls(ThreadKind::Vmm).len(),
            vcpu_syscalls = crate::seccomp::allowed_syscalls(ThreadKind::Vcpu).len(),
            "seccomp filters loaded on every thread"
        );
        run_forbidden_syscall_hook(cfg)?;
    }
    // A restored VM stays paused until the `restore` op.
    if snapshot.is_none() {
        for h in &handles {
            if !h.resume() {
                let id = h.id();
                for h in handles {
                    h.finish();
                }
                return Err(VmmError::VcpuStart(id));
            }
        }
    }
    let vm = Arc::new(vm);
    let ram = Arc::new(ram);
    let devices = Arc::new(devices);
    let snapshots = snapshot_dir.map(|dir| SnapshotCtx {
        vm: vm.clone(),
        ram: ram.clone(),
        devices: devices.clone(),
        dir,
        dir_path: cfg.snapshot_dir.clone().unwrap_or_default(),
        msr_indices,
    });
    let restored = snapshot.map(|(header, _, memory_mode)| RestoreCtx {
        id: header.id,
        memory_mode,
        devices: devices.clone(),
        setup_us: u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX),
    });
    let vm_control = Arc::new(
        VmControl::new(handles, exit.clone(), metrics)
            .with_balloon(balloon_handle, cfg.memory_mib)
            .with_snapshots(snapshots)
            .restored_from(restored),
    );
    if let Some(c) = &control {
        c.lock().expect("control lock").attach(vm_control.clone());
    }
    tracing::info!(
        vcpus = cfg.vcpus,
        memory_mib = cfg.memory_mib,
        setup_us = start.elapsed().as_micros() as u64,
        state = vm_control.state().as_str(),
        "VM built"
    );

    let reason = loop {
        if let Some(r) = exit.get() {
            break r;
        }
        if let Err(e) = em.run_with_timeout(100) {
            tracing::error!(error = ?e, "event loop failed");
            exit.set(ExitReason::Stopped);
        }
    };
    for h in vm_control.take_vcpus() {
        h.finish();
    }
    // Keep the VM and memory alive until every vCPU is gone (the control
    // socket's snapshot context holds them too, until it goes).
    drop(vm_control);
    drop(vm);
    drop(ram);
    tracing::info!(?reason, code = reason.exit_code(), "VM ended");
    Ok(reason)
}
