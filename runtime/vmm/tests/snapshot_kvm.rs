//! KVM state saved from one VM and restored into another: a vCPU's
//! continues the guest exactly where it stopped (vstate::vcpu_state), and
//! the irqchip, PIT and clock come back as they were (vstate::vm_state).
//! Needs root (or /dev/kvm access): `cargo test -p boxlite-vmm --test
//! snapshot_kvm -- --ignored`. Port I/O only, so it runs on the
//! development machines' KVM.

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
