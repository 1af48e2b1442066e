//! vCPUs: boot configuration, the KVM_RUN loop with exit dispatch to the
//! buses, and one named thread per vCPU running a Running/Paused/Finished
//! state machine driven over channels.
//!
//! A paused vCPU is one a snapshot can be taken of: the thread completes
//! an I/O instruction the last exit left half done before it acknowledges
//! the pause, and reads the vCPU's whole KVM state on request, on the
//! thread that owns the `VcpuFd` (docs/snapshot-design.md §2).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::vcpu_state::{complete_pending_io, VcpuState as SavedVcpu, VcpuStateError};
use crate::arch::x86_64::regs::BootEntry;
use crate::arch::x86_64::{apic, cpuid, msr, regs};
use crate::device_manager::bus::Bus;
use crate::threads::{spawn_thread, ThreadKind};

/// Why the VM stopped. The first reason recorded wins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote the reset command (0xfe) to the i8042 (port 0x64).
    GuestReset,
    /// KVM_EXIT_SHUTDOWN: a triple fault (Linux `reboot=t`, or a crash).
    TripleFault { vcpu: u8 },
    /// KVM_EXIT_SYSTEM_EVENT (shutdown or reset request), with its type.
    SystemEvent { vcpu: u8, kind: u32 },
    /// The host asked the VM to stop.
    Stopped,
    /// `hlt` with no interrupt controller to wake the vCPU.
    Halted { vcpu: u8 },
    /// An unexpected or failed KVM exit; `regs` is the register dump.
    VcpuError {
        vcpu: u8,
        reason: String,
        regs: String,
    },
}

impl ExitReason {
    /// The process exit code for this reason (see `crate::exit_code`).
    pub fn exit_code(&self) -> i32 {
        use crate::exit_code::*;
        match self {
            ExitReason::GuestReset
            | ExitReason::TripleFault { .. }
            | ExitReason::SystemEvent { .. }
            | ExitReason::Stopped => GUEST_EXIT,
            ExitReason::Halted { .. } => GUEST_HALTED,
            ExitReason::VcpuError { .. } => VCPU_ERROR,
        }
    }
}

/// Where the VM's end is recorded: first writer wins, and an eventfd wakes
/// the event loop.
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    evt: EventFd,
}

impl ExitSignal {
    /// A fresh, unset signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            reason: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already recorded, and wakes the loop.
    pub fn set(&self, reason: ExitReason) {
        let mut r = self.reason.lock().expect("exit signal lock poisoned");
        if r.is_none() {
            *r = Some(reason);
        }
        drop(r);
        if let Err(e) = self.evt.write(1) {
            tracing::error!(error = %e, "failed to signal the VM exit");
        }
    }

    /// The recorded reason, if any.
    pub fn get(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .expect("exit signal lock poisoned")
            .clone()
    }

    /// The eventfd written on every `set`.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// vCPU errors during configuration.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("Failed to set CPUID on vCPU {0}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to read back the CPUID of vCPU {0}")]
    GetCpuid(u8, #[source] kvm_ioctls::Error),
    #[error("Failed to normalise CPUID")]
    Cpuid(#[from] cpuid::CpuidError),
    #[error("Failed to set MSRs")]
    Msr(#[from] msr::MsrError),
    #[error("Failed to set registers")]
    Regs(#[from] regs::RegsError),
    #[error("Failed to set LAPIC LINT0/LINT1")]
    Apic(#[from] apic::ApicError),
    #[error("Failed to spawn the vCPU thread")]
    Spawn(#[source] std::io::Error),
    #[error("Failed to install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Commands to a vCPU thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEvent {
    /// Start or continue running guest code.
    Resume,
    /// Stop running guest code until `Resume`, at an instruction boundary.
    Pause,
    /// Read the vCPU's KVM state (only while paused); the answer comes on
    /// the handle's second channel.
    SaveState(SaveRequest),
    /// Leave the thread.
    Finish,
}

/// What reading a vCPU's state needs besides the vCPU.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveRequest {
    /// The MSRs to read (`vcpu_state::saveable_msrs`, the same for every
    /// vCPU of a VM).
    pub msr_indices: Arc<[u32]>,
    /// Whether the VM has an in-kernel irqchip (then the LAPIC is read).
    pub irqchip: bool,
}

/// Acknowledgements from a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuResponse {
    Resumed,
    Paused,
}

/// State of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Finished,
}

/// What a vCPU thread answers a [`VcpuEvent::SaveState`] with.
type SaveResult = Result<Box<SavedVcpu>, VcpuStateError>;

fn count(counters: &[&AtomicU64]) {
    for c in counters {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

static UNHANDLED_ACCESSES: AtomicU64 = AtomicU64::new(0);

/// Guest-triggerable log lines: the first 10, then one in 1000.
fn rate_limited() -> bool {
    let n = UNHANDLED_ACCESSES.fetch_add(1, Ordering::Relaxed);
    n < 10 || n % 1000 == 0
}

/// KVM exit counters of one vCPU (read by the control socket's `metrics`).
#[derive(Debug, Default)]
pub struct VcpuMetrics {
    /// Every return from KVM_RUN with an exit (not EINTR).
    pub exits: AtomicU64,
    /// Port I/O exits.
    pub pio_exits: AtomicU64,
    /// MMIO exits.
    pub mmio_exits: AtomicU64,
    /// Returns from KVM_RUN on a signal (pause/finish kicks).
    pub kicks: AtomicU64,
}

/// One vCPU and what it needs to handle exits.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    metrics: Arc<VcpuMetrics>,
}

impl Vcpu {
    /// Wraps a created vCPU.
    pub fn new(id: u8, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>, exit: Arc<ExitSignal>) -> Self {
        Vcpu {
            id,
            fd,
            pio,
            mmio,
            exit,
            metrics: Arc::new(VcpuMetrics::default()),
        }
    }

    /// This vCPU's exit counters.
    pub fn metrics(&self) -> Arc<VcpuMetrics> {
        self.metrics.clone()
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// CPUID, MSRs, LAPIC (with irqchip), FPU, and — on the boot vCPU, or on
    /// every vCPU for raw images — registers for `entry`.
    pub fn configure(
        &self,
        mem: &GuestMemoryMmap,
        base_cpuid: &CpuId,
        nvcpus: u8,
        irqchip: bool,
        entry: Option<BootEntry>,
    ) -> Result<(), VcpuError> {
        let c = self.boot_cpuid(base_cpuid, nvcpus)?;
        self.fd
            .set_cpuid2(&c)
            .map_err(|e| VcpuError::SetCpuid(self.id, e))?;
        msr::setup_msrs(&self.fd)?;
        if irqchip {
            apic::set_lint(&self.fd)?;
        }
        if let Some(entry) = entry {
            regs::setup_fpu(&self.fd)?;
            regs::setup_sregs(mem, &self.fd, entry)?;
            regs::setup_regs(&self.fd, entry)?;
        }
        Ok(())
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The CPUID a boot gives this vCPU, one of `nvcpus`: the VM's
    /// `base_cpuid` with this vCPU's topology and APIC id.
    pub fn boot_cpuid(&self, base_cpuid: &CpuId, nvcpus: u8) -> Result<CpuId, VcpuError> {
        let mut c = base_cpuid.clone();
        cpuid::normalize(&mut c, self.id, nvcpus)?;
        Ok(c)
    }

    /// Configures registers only (for hosts/guests that skip CPUID and MSRs).
    pub fn configure_regs(&self, mem: &GuestMemoryMmap, entry: BootEntry) -> Result<(), VcpuError> {
        regs::setup_fpu(&self.fd)?;
        regs::setup_sregs(mem, &self.fd, entry)?;
        regs::setup_regs(&self.fd, entry)?;
        Ok(())
    }

    /// A one-line dump of the registers that matter for a post-mortem.
    pub fn dump_regs(&self) -> String {
        let r = match self.fd.get_regs() {
            Ok(r) => format!(
                "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rbx={:#x} rcx={:#x} rdx={:#x} rsi={:#x} rdi={:#x}",
                r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi
            ),
            Err(e) => format!("regs unavailable ({e})"),
        };
        let s = match self.fd.get_sregs() {
            Ok(s) => format!(
                "cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}/base={:#x}/l={}",
                s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector, s.cs.base, s.cs.l
            ),
            Err(e) => format!("sregs unavailable ({e})"),
        };
        format!("{r} {s}")
    }

    fn error(&self, reason: String) -> ExitReason {
        let regs = self.dump_regs();
        tracing::error!(vcpu = self.id, %reason, %regs, "vCPU stopped on an error");
        ExitReason::VcpuError {
            vcpu: self.id,
            reason,
            regs,
        }
    }

    /// Runs guest code until the next exit; `Some` when the VM must end.
    pub fn run_once(&mut self) -> Option<ExitReason> {
        let id = self.id;
        let m = &self.metrics;
        let result = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    count(&[&m.exits, &m.pio_exits]);
                    if !self.pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        if rate_limited() {
                            tracing::debug!(vcpu = id, port, "read from unhandled port");
                        }
                    }
                    Ok(None)
                }
                VcpuExit::IoOut(port, data) => {
                    count(&[&m.exits, &m.pio_exits]);
                    if !self.pio.write(u64::from(port), data) && rate_limited() {
                        tracing::debug!(vcpu = id, port, "write to unhandled port");
                    }
                    Ok(None)
                }
                VcpuExit::MmioRead(addr, data) => {
                    count(&[&m.exits, &m.mmio_exits]);
                    if !self.mmio.read(addr, data) {
                        data.fill(0);
                        if rate_limited() {
                            tracing::warn!(
                                vcpu = id,
                                addr,
                                len = data.len(),
                                "read from unhandled MMIO address"
                            );
                        }
                    }
                    Ok(None)
                }
                VcpuExit::MmioWrite(addr, data) => {
                    count(&[&m.exits, &m.mmio_exits]);
                    if !self.mmio.write(addr, data) && rate_limited() {
                        tracing::warn!(
                            vcpu = id,
                            addr,
                            len = data.len(),
                            "write to unhandled MMIO address"
                        );
                    }
                    Ok(None)
                }
                VcpuExit::Hlt => Ok(Some(ExitReason::Halted { vcpu: id })),
                VcpuExit::Shutdown => Ok(Some(ExitReason::TripleFault { vcpu: id })),
                VcpuExit::SystemEvent(kind, _) => {
                    Ok(Some(ExitReason::SystemEvent { vcpu: id, kind }))
                }
                VcpuExit::FailEntry(reason, cpu) => Err(format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
                )),
                VcpuExit::InternalError => {
                    Err("KVM_EXIT_INTERNAL_ERROR (emulation failure?)".to_string())
                }
                other => Err(format!("unexpected KVM exit {other:?}")),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                count(&[&m.kicks]);
                Ok(None)
            }
            Err(e) => Err(format!("KVM_RUN failed: {e}")),
        };
        match result {
            Ok(None) => None,
            Ok(Some(reason)) => {
                match &reason {
                    ExitReason::TripleFault { .. } => {
                        tracing::info!(vcpu = id, regs = %self.dump_regs(), "guest triple fault (KVM_EXIT_SHUTDOWN)")
                    }
                    ExitReason::Halted { .. } => {
                        tracing::warn!(vcpu = id, regs = %self.dump_regs(), "guest halted with no interrupt controller to wake it")
                    }
                    r => tracing::info!(vcpu = id, reason = ?r, "VM exit requested"),
                }
                Some(reason)
            }
            Err(reason) => Some(self.error(reason)),
        }
    }

    fn thread_main(
        mut self,
        rx: Receiver<VcpuEvent>,
        tx: Sender<VcpuResponse>,
        saved: Sender<SaveResult>,
    ) {
        let mut state = RunState::Paused;
        loop {
            match state {
                RunState::Paused => match rx.recv() {
                    Ok(VcpuEvent::Resume) => {
                        state = RunState::Running;
                        let _ = tx.send(VcpuResponse::Resumed);
                    }
                    Ok(VcpuEvent::Pause) => {
                        let _ = tx.send(VcpuResponse::Paused);
                    }
                    Ok(VcpuEvent::SaveState(req)) => {
                        let result =
                            SavedVcpu::save(self.id, &self.fd, &req.msr_indices, req.irqchip);
                        let _ = saved.send(result.map(Box::new));
                    }
                    Ok(VcpuEvent::Finish) | Err(_) => return,
                },
                RunState::Running => {
                    match rx.try_recv() {
                        Ok(VcpuEvent::Pause) => {
                            state = self.pause_here();
                            if state == RunState::Paused {
                                let _ = tx.send(VcpuResponse::Paused);
                            }
                            continue;
                        }
                        Ok(VcpuEvent::Resume) => {
                            let _ = tx.send(VcpuResponse::Resumed);
                        }
                        Ok(VcpuEvent::SaveState(_)) => {
                            let _ = saved.send(Err(self.not_paused("it is running")));
                        }
                        Ok(VcpuEvent::Finish) | Err(TryRecvError::Disconnected) => return,
                        Err(TryRecvError::Empty) => {}
                    }
                    if let Some(reason) = self.run_once() {
                        self.exit.set(reason);
                        state = RunState::Finished;
                    }
                }
                RunState::Finished => match rx.recv() {
                    Ok(VcpuEvent::Finish) | Err(_) => return,
                    Ok(VcpuEvent::SaveState(_)) => {
                        let _ = saved.send(Err(self.not_paused("it has stopped")));
                    }
                    Ok(_) => {}
                },
            }
        }
    }

    /// Leaves the guest at an instruction boundary: an `in`, `out` or MMIO
    /// access the last exit handed to the buses completes only on the next
    /// `KVM_RUN`, so one run with `immediate_exit` finishes it without
    /// starting another instruction. Without it, state read while paused
    /// would have the instruction half done (an `in` without its data). A
    /// vCPU that cannot be brought there ends the VM.
    fn pause_here(&mut self) -> RunState {
        match complete_pending_io(self.id, &mut self.fd) {
            Ok(()) => RunState::Paused,
            Err(e) => {
                tracing::error!(vcpu = self.id, error = %e, "cannot pause the vCPU");
                self.exit.set(ExitReason::VcpuError {
                    vcpu: self.id,
                    reason: format!("pausing: {e}"),
                    regs: String::new(),
                });
                RunState::Finished
            }
        }
    }

    fn not_paused(&self, why: &str) -> VcpuStateError {
        VcpuStateError::Invalid {
            id: self.id,
            what: format!("cannot read its state: {why} (pause the VM first)"),
        }
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), VcpuError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(SIGRTMIN(), kick_handler).map_err(VcpuError::Signal);
    });
    result
}

/// How long a paused vCPU thread may take to read its state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The host's handle on a vCPU thread.
pub struct VcpuHandle {
    id: u8,
    tx: Sender<VcpuEvent>,
    rx: Receiver<VcpuResponse>,
    saved: Receiver<SaveResult>,
    join: JoinHandle<()>,
}

impl VcpuHandle {
    /// Spawns the vCPU's thread (`vcpu<N>`), which starts paused.
    pub fn spawn(vcpu: Vcpu) -> Result<Self, VcpuError> {
        install_kick_handler()?;
        let id = vcpu.id;
        let (tx, thread_rx) = channel();
        let (thread_tx, rx) = channel();
        let (saved_tx, saved) = channel();
        let join = spawn_thread(ThreadKind::Vcpu, &format!("vcpu{id}"), move || {
            vcpu.thread_main(thread_rx, thread_tx, saved_tx)
        })
        .map_err(VcpuError::Spawn)?;
        Ok(VcpuHandle {
            id,
            tx,
            rx,
            saved,
            join,
        })
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    fn send(&self, ev: VcpuEvent) {
        if self.tx.send(ev).is_err() {
            return;
        }
        // Interrupt KVM_RUN so the thread sees the command.
        let _ = self.join.kill(SIGRTMIN());
    }

    /// Sends `ev` and waits up to `timeout` for `want`.
    fn request(&self, ev: VcpuEvent, want: VcpuResponse, timeout: Duration) -> bool {
        self.send(ev);
        self.wait_for(want, timeout)
    }

    /// Waits up to `timeout` for `want`, re-kicking the thread (a kick that
    /// lands outside KVM_RUN is lost).
    fn wait_for(&self, want: VcpuResponse, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.rx.recv_timeout(Duration::from_millis(10)) {
                Ok(r) if r == want => return true,
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return false,
                Err(RecvTimeoutError::Timeout) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    let _ = self.join.kill(SIGRTMIN());
                }
            }
        }
    }

    /// Starts or continues running guest code; true once acknowledged.
    pub fn resume(&self) -> bool {
        self.request(
            VcpuEvent::Resume,
            VcpuResponse::Resumed,
            Duration::from_secs(1),
        )
    }

    /// Stops running guest code; true once acknowledged.
    pub fn pause(&self) -> bool {
        self.request_pause();
        self.wait_paused(Duration::from_secs(1))
    }

    /// Asks the thread to pause without waiting, so that every vCPU of a VM
    /// can be asked before any is waited for.
    pub fn request_pause(&self) {
        self.send(VcpuEvent::Pause);
    }

    /// Waits up to `timeout` for the acknowledgement of a pause; true once
    /// the vCPU is paused at an instruction boundary.
    pub fn wait_paused(&self, timeout: Duration) -> bool {
        self.wait_for(VcpuResponse::Paused, timeout)
    }

    /// Reads the paused vCPU's whole KVM state on its own thread. Refused
    /// unless the vCPU is paused.
    pub fn save_state(&self, req: SaveRequest) -> Result<SavedVcpu, VcpuStateError> {
        let stale = || VcpuStateError::Invalid {
            id: self.id,
            what: format!(
                "its thread did not answer a state read within {}s",
                SAVE_TIMEOUT.as_secs()
            ),
        };
        // An answer to an earlier read that timed out is not this one's.
        while self.saved.try_recv().is_ok() {}
        self.send(VcpuEvent::SaveState(req));
        match self.saved.recv_timeout(SAVE_TIMEOUT) {
            Ok(result) => result.map(|b| *b),
            Err(_) => Err(stale()),
        }
    }

    /// Ends the thread and joins it (kicking it until it leaves KVM_RUN).
    pub fn finish(self) {
        self.send(VcpuEvent::Finish);
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !self.join.is_finished() {
            if std::time::Instant::now() >= deadline {
                tracing::error!(vcpu = self.id, "vCPU thread did not finish; leaving it");
                return;
            }
            let _ = self.join.kill(SIGRTMIN());
            std::thread::sleep(Duration::from_millis(5));
        }
        if self.join.join().is_err() {
            tracing::error!(vcpu = self.id, "vCPU thread panicked");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_and_first_reason_wins() {
        assert_eq!(ExitReason::GuestReset.exit_code(), 0);
        assert_eq!(ExitReason::TripleFault { vcpu: 0 }.exit_code(), 0);
        assert_eq!(ExitReason::Halted { vcpu: 0 }.exit_code(), 3);
        let e = ExitReason::VcpuError {
            vcpu: 1,
            reason: "x".into(),
            regs: String::new(),
        };
        assert_eq!(e.exit_code(), 2);
        let s = ExitSignal::new().expect("signal");
        assert_eq!(s.get(), None);
        s.set(ExitReason::GuestReset);
        s.set(ExitReason::Halted { vcpu: 0 });
        assert_eq!(s.get(), Some(ExitReason::GuestReset));
        assert_eq!(s.eventfd().read().expect("evt"), 2);
    }
}
