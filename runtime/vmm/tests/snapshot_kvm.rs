//! KVM state saved from one VM and restored into another: a vCPU's
//! continues the guest exactly where it stopped (vstate::vcpu_state), also
//! when it was paused and read on its own thread right after an `in`
//! (vstate::vcpu), and the irqchip, PIT and clock come back as they were
//! (vstate::vm_state).
//! Needs root (or /dev/kvm access): `cargo test -p boxlite-vmm --test
//! snapshot_kvm -- --ignored`. Port I/O only, so it runs on the
//! development machines' KVM.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use boxlite_vmm::device_manager::bus::{Bus, BusDevice};
use boxlite_vmm::vstate::vcpu::{ExitSignal, SaveRequest, Vcpu, VcpuHandle};
use boxlite_vmm::vstate::vcpu_state::{complete_pending_io, saveable_msrs, VcpuState};
use boxlite_vmm::vstate::vm_state::VmState;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_regs, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM_SIZE: usize = 0x10000;
const CODE_AT: u64 = 0x1000;
const PORT: u16 = 0x80;

/// Real mode: `xor ax, ax` then forever `inc ax; out 0x80, ax`. Each exit
/// carries the counter: the state of the registers made visible.
const COUNTER: [u8; 7] = [0x31, 0xc0, 0x40, 0xe7, PORT as u8, 0xeb, 0xfb];

struct Machine {
    _kvm: Kvm,
    _vm: VmFd,
    mem: GuestMemoryMmap,
    vcpu: VcpuFd,
}

/// A VM with 64 KiB of RAM (a copy of `image`) and one vCPU.
fn machine(kvm: Kvm, image: &[u8]) -> Machine {
    let vm = kvm.create_vm().expect("create VM");
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    mem.write_slice(image, GuestAddress(0)).unwrap();
    let host = mem.get_host_address(GuestAddress(0)).unwrap() as u64;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host,
        flags: 0,
    };
    // SAFETY: the region is `mem`'s mapping, which lives as long as the
    // Machine and so as long as the VM using it.
    unsafe { vm.set_user_memory_region(region) }.expect("memory slot");
    let vcpu = vm.create_vcpu(0).expect("create vCPU");
    Machine {
        _kvm: kvm,
        _vm: vm,
        mem,
        vcpu,
    }
}

/// Runs until the next `out 0x80`; returns the counter it wrote.
fn next_count(vcpu: &mut VcpuFd) -> u16 {
    loop {
        match vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(PORT, data) => {
                return u16::from_le_bytes([data[0], data[1]]);
            }
            VcpuExit::IoOut(..) | VcpuExit::IoIn(..) => continue,
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

fn image() -> Vec<u8> {
    let mut image = vec![0u8; MEM_SIZE];
    image[CODE_AT as usize..CODE_AT as usize + COUNTER.len()].copy_from_slice(&COUNTER);
    image
}

fn start(vcpu: &VcpuFd) {
    let cpuid = Kvm::new()
        .unwrap()
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    vcpu.set_regs(&kvm_regs {
        rip: CODE_AT,
        rflags: 2,
        ..Default::default()
    })
    .unwrap();
}

#[test]
#[ignore = "needs /dev/kvm (root)"]
fn a_restored_vcpu_continues_where_the_saved_one_stopped() {
    let mut a = machine(Kvm::new().expect("/dev/kvm"), &image());
    start(&a.vcpu);
    for want in 1..=5 {
        assert_eq!(next_count(&mut a.vcpu), want);
    }
    complete_pending_io(0, &mut a.vcpu).unwrap();
    let msrs = saveable_msrs(&Kvm::new().unwrap(), 0, &a.vcpu, false).unwrap();
    assert!(!msrs.is_empty(), "KVM reports no MSRs to save");
    let saved = VcpuState::save(0, &a.vcpu, &msrs, false).unwrap();

    // Through the snapshot body's encoding and back.
    let json = serde_json::to_vec(&saved).unwrap();
    let loaded: VcpuState = serde_json::from_slice(&json).unwrap();
    assert_eq!(serde_json::to_vec(&loaded).unwrap(), json);

    // A second VM with a copy of the first one's memory.
    let mut image = vec![0u8; MEM_SIZE];
    a.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
    let mut b = machine(Kvm::new().unwrap(), &image);
    loaded.restore(&b.vcpu).unwrap();
    let again = VcpuState::save(0, &b.vcpu, &msrs, false).unwrap();
    assert_eq!(again.regs, saved.regs, "registers");
    assert_eq!(again.sregs, saved.sregs, "segment and control registers");
    assert_eq!(again.xcrs, saved.xcrs, "XCRs");
    assert_eq!(again.debugregs, saved.debugregs, "debug registers");
    assert_eq!(again.mp_state, saved.mp_state, "MP state");
    assert_eq!(again.cpuid, saved.cpuid, "CPUID");

    // Both go on from 6: the restored one is the same machine.
    assert_eq!(next_count(&mut b.vcpu), 6, "restored vCPU");
    assert_eq!(next_count(&mut b.vcpu), 7, "restored vCPU");
    assert_eq!(next_count(&mut a.vcpu), 6, "original vCPU");
}

#[test]
#[ignore = "needs /dev/kvm (root)"]
fn an_msr_kvm_refuses_is_named() {
    let mut a = machine(Kvm::new().expect("/dev/kvm"), &image());
    start(&a.vcpu);
    assert_eq!(next_count(&mut a.vcpu), 1);
    complete_pending_io(0, &mut a.vcpu).unwrap();
    let msrs = saveable_msrs(&Kvm::new().unwrap(), 0, &a.vcpu, false).unwrap();
    let mut state = VcpuState::save(0, &a.vcpu, &msrs, false).unwrap();
    // No MSR lives at this index (KVM refuses it unless the host runs
    // with kvm.ignore_msrs=1, which no host of ours does).
    assert_ne!(state.msrs[0].index, 0x6e0);
    state.msrs[0].index = 0xdead_beef;
    let b = machine(Kvm::new().unwrap(), &image());
    let err = state.restore(&b.vcpu).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "vCPU 0: KVM_SET_MSRS handled 0 of {} MSRs (first refused: 0xdeadbeef)",
            msrs.len() - usize::from(msrs.contains(&0x6e0))
        )
    );
    let err = VcpuState::save(0, &a.vcpu, &[0x10, 0xdead_beef], false)
        .err()
        .expect("reading an MSR that does not exist fails")
        .to_string();
    assert_eq!(
        err,
        "vCPU 0: KVM_GET_MSRS handled 1 of 2 MSRs (first refused: 0xdeadbeef)"
    );
}

/// A VM with the in-kernel irqchip and PIT, as boxlite-vmm makes them.
fn vm_with_irqchip(kvm: &Kvm) -> VmFd {
    let vm = kvm.create_vm().expect("create VM");
    vm.set_tss_address(0xfffb_d000).expect("TSS address");
    vm.create_irq_chip().expect("in-kernel irqchip");
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .expect("in-kernel PIT");
    vm
}

/// The state as the snapshot body holds it, to compare.
fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap()
}

#[test]
#[ignore = "needs /dev/kvm (root)"]
fn the_irqchip_pit_and_clock_come_back_in_a_second_vm() {
    let kvm = Kvm::new().expect("/dev/kvm");
    let a = vm_with_irqchip(&kvm);
    // Something of our own in each: an IOAPIC route (masked, vector 0x35),
    // a PIT reload count, a clock far from the default.
    let mut ioapic = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    a.get_irqchip(&mut ioapic).unwrap();
    // SAFETY: chip_id says the union holds the IOAPIC's state.
    unsafe { ioapic.chip.ioapic.redirtbl[5].bits = (1 << 16) | 0x35 };
    a.set_irqchip(&ioapic).unwrap();
    let mut pit = a.get_pit2().unwrap();
    pit.channels[0].count = 0x1234;
    a.set_pit2(&pit).unwrap();
    let clock_ns = 123_456_789_000;
    a.set_clock(&kvm_clock_data {
        clock: clock_ns,
        ..Default::default()
    })
    .unwrap();

    let saved = VmState::save(&a).unwrap();
    let loaded: VmState = serde_json::from_str(&json(&saved)).unwrap();
    let b = vm_with_irqchip(&kvm);
    loaded.restore(&b).unwrap();
    let again = VmState::save(&b).unwrap();

    // SAFETY: both unions were read with chip_id IOAPIC.
    let route = unsafe { again.ioapic.chip.ioapic.redirtbl[5].bits };
    assert_eq!(route, (1 << 16) | 0x35, "IOAPIC route 5");
    assert_eq!(json(&again.ioapic), json(&saved.ioapic), "IOAPIC");
    assert_eq!(
        json(&again.pic_master),
        json(&saved.pic_master),
        "PIC master"
    );
    assert_eq!(json(&again.pic_slave), json(&saved.pic_slave), "PIC slave");
    assert_eq!(again.pit.channels[0].count, 0x1234, "PIT channel 0");
    let (was, now) = (saved.clock.clock, again.clock.clock);
    assert!(
        (clock_ns..clock_ns + 1_000_000_000).contains(&was)
            && (was..was + 1_000_000_000).contains(&now),
        "kvmclock: set {clock_ns}, saved {was}, restored {now}"
    );
}

/// Real mode: forever `in ax, 0x82; out 0x80, ax`. The vCPU's AX after the
/// `in` is what the port device answered only once the `in` completed.
const ECHO: [u8; 6] = [0xe5, SOURCE_PORT as u8, 0xe7, PORT as u8, 0xeb, 0xfa];
const SOURCE_PORT: u64 = 0x82;
/// The answer at which the source stops and lets the test pause the vCPU.
const PAUSE_AT: u16 = 50;

/// Port 0x82: answers 1, 2, 3, …; on answering [`PAUSE_AT`] it tells the
/// test and waits until the test has asked the vCPU to pause, so the pause
/// lands right after that `in` exit, with the `in` not yet completed.
struct Source {
    next: u16,
    reached: Sender<()>,
    go: Receiver<()>,
}

impl BusDevice for Source {
    fn read(&mut self, _: u64, data: &mut [u8]) {
        self.next += 1;
        data.copy_from_slice(&self.next.to_le_bytes()[..data.len()]);
        if self.next == PAUSE_AT {
            self.reached.send(()).unwrap();
            self.go.recv_timeout(Duration::from_secs(10)).unwrap();
        }
    }
    fn write(&mut self, _: u64, _: &[u8]) {}
}

/// Port 0x80: keeps the last value written.
struct Sink(Arc<AtomicU16>);

impl BusDevice for Sink {
    fn read(&mut self, _: u64, _: &mut [u8]) {}
    fn write(&mut self, _: u64, data: &[u8]) {
        self.0
            .store(u16::from_le_bytes([data[0], data[1]]), Ordering::SeqCst);
    }
}

#[test]
#[ignore = "needs /dev/kvm (root)"]
fn a_vcpu_paused_after_an_in_is_read_on_its_thread_with_the_in_complete() {
    let mut image = vec![0u8; MEM_SIZE];
    image[CODE_AT as usize..CODE_AT as usize + ECHO.len()].copy_from_slice(&ECHO);
    let Machine {
        _kvm,
        _vm,
        mem,
        vcpu,
    } = machine(Kvm::new().expect("/dev/kvm"), &image);
    start(&vcpu);
    let msrs: Arc<[u32]> = saveable_msrs(&Kvm::new().unwrap(), 0, &vcpu, false)
        .unwrap()
        .into();

    let (reached_tx, reached) = channel();
    let (go, go_rx) = channel();
    let last_out = Arc::new(AtomicU16::new(0));
    let mut pio = Bus::new();
    let source = Source {
        next: 0,
        reached: reached_tx,
        go: go_rx,
    };
    pio.insert(Arc::new(Mutex::new(source)), SOURCE_PORT, 2)
        .unwrap();
    pio.insert(
        Arc::new(Mutex::new(Sink(last_out.clone()))),
        u64::from(PORT),
        2,
    )
    .unwrap();
    let exit = Arc::new(ExitSignal::new().unwrap());
    let vcpu = Vcpu::new(0, vcpu, Arc::new(pio), Arc::new(Bus::new()), exit.clone());
    let handle = VcpuHandle::spawn(vcpu).unwrap();
    assert!(handle.resume(), "the vCPU thread did not start");

    reached
        .recv_timeout(Duration::from_secs(10))
        .expect("the guest never read the source port");
    handle.request_pause();
    go.send(()).unwrap();
    assert!(handle.wait_paused(Duration::from_secs(5)), "no pause");
    assert_eq!(exit.get(), None, "the VM ended: {:?}", exit.get());
    assert_eq!(last_out.load(Ordering::SeqCst), PAUSE_AT - 1);

    let req = SaveRequest {
        msr_indices: msrs.clone(),
        irqchip: false,
    };
    let saved = handle.save_state(req.clone()).unwrap();
    assert_eq!(
        saved.regs.rax & 0xffff,
        u64::from(PAUSE_AT),
        "AX holds the answer of the paused `in`"
    );

    // A running vCPU's state is not read.
    assert!(handle.resume());
    let err = handle.save_state(req).err().expect("read while running");
    assert_eq!(
        err.to_string(),
        "vCPU 0: cannot read its state: it is running (pause the VM first)"
    );
    assert!(handle.pause());
    handle.finish();

    // The saved vCPU goes on in a second VM from the `out` after that `in`.
    let mut copy = vec![0u8; MEM_SIZE];
    mem.read_slice(&mut copy, GuestAddress(0)).unwrap();
    let mut b = machine(Kvm::new().unwrap(), &copy);
    saved.restore(&b.vcpu).unwrap();
    assert_eq!(
        next_count(&mut b.vcpu),
        PAUSE_AT,
        "restored vCPU's first out"
    );
}
