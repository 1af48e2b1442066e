//! KVM state saved from one VM and restored into another: a vCPU's
//! continues the guest exactly where it stopped (vstate::vcpu_state), also
//! when it was paused and read on its own thread right after an `in`
//! (vstate::vcpu), the irqchip, PIT and clock come back as they were
//! (vstate::vm_state), and so do COM1 and a virtio device with its ring
//! positions (device_manager's save_states/restore_virtio_states); and a
//! whole paused VM saved into its two files (snapshot::save) goes on
//! counting in a second VM built from those files alone.
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

/// A VM with an irqchip, 16 MiB of RAM, COM1 and one rng device in slot 0,
/// attached as a device of `kind`.
struct DeviceVm {
    vm: boxlite_vmm::vstate::vm::Vm,
    ram: boxlite_vmm::vstate::memory::GuestRam,
    devices: boxlite_vmm::device_manager::DeviceManager,
    rng: Arc<Mutex<boxlite_vmm::devices::virtio::rng::Rng>>,
}

fn device_vm(
    kind: &str,
    serial: Option<&boxlite_vmm::devices::legacy::serial::SerialSnap>,
) -> Result<DeviceVm, boxlite_vmm::device_manager::DeviceManagerError> {
    use boxlite_vmm::devices::virtio::rng::Rng;
    let vm = boxlite_vmm::vstate::vm::Vm::new(true).expect("VM with irqchip");
    let ram = boxlite_vmm::vstate::memory::create_guest_memory(16 << 20).expect("RAM");
    vm.register_memory(&ram.mem).expect("memory slots");
    let mut devices = boxlite_vmm::device_manager::DeviceManager::new();
    let exit = Arc::new(ExitSignal::new().expect("exit eventfd"));
    devices.attach_legacy(&vm, Box::new(std::io::sink()), exit, serial)?;
    let rng = Arc::new(Mutex::new(Rng::new(None).expect("urandom")));
    devices.attach_virtio(&vm, &ram.mem, kind, rng.clone(), None)?;
    Ok(DeviceVm {
        vm,
        ram,
        devices,
        rng,
    })
}

const RNG_AT: u64 = boxlite_vmm::arch::x86_64::layout::VIRTIO_MMIO_BASE;
const COM1: u64 = boxlite_vmm::arch::x86_64::layout::SERIAL_PORT_BASE as u64;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;

fn mmio_w(dm: &boxlite_vmm::device_manager::DeviceManager, reg: u64, v: u32) {
    assert!(
        dm.mmio.write(RNG_AT + reg, &v.to_le_bytes()),
        "MMIO {reg:#x}"
    );
}

/// The driver's side of the rng, as Linux's virtio-mmio driver does it:
/// features, a 16-entry queue at DESC/AVAIL/USED, DRIVER_OK.
fn drive_rng(dm: &boxlite_vmm::device_manager::DeviceManager) {
    use boxlite_vmm::devices::virtio::mmio::reg;
    for status in [1, 3] {
        mmio_w(dm, reg::STATUS, status);
    }
    mmio_w(dm, reg::DRIVER_FEATURES_SEL, 1);
    mmio_w(dm, reg::DRIVER_FEATURES, 1); // VERSION_1
    mmio_w(dm, reg::STATUS, 0xb);
    mmio_w(dm, reg::QUEUE_SEL, 0);
    mmio_w(dm, reg::QUEUE_NUM, 16);
    mmio_w(dm, reg::QUEUE_DESC_LOW, DESC as u32);
    mmio_w(dm, reg::QUEUE_AVAIL_LOW, AVAIL as u32);
    mmio_w(dm, reg::QUEUE_USED_LOW, USED as u32);
    mmio_w(dm, reg::QUEUE_READY, 1);
    mmio_w(dm, reg::STATUS, 0xf);
}

/// Makes request `n` (a 32-byte buffer in descriptor `n`) available and
/// has the rng serve it; returns the used ring's index after.
fn rng_request(v: &DeviceVm, n: u16) -> u16 {
    use boxlite_vmm::devices::virtio::VirtioDevice as _;
    let mem = &v.ram.mem;
    let d = GuestAddress(DESC + 16 * u64::from(n));
    mem.write_obj(0x2_0000u64 + 0x100 * u64::from(n), d)
        .unwrap();
    mem.write_obj(32u32, GuestAddress(d.0 + 8)).unwrap();
    mem.write_obj(2u16, GuestAddress(d.0 + 12)).unwrap(); // WRITE
    mem.write_obj(n, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 16)))
        .unwrap();
    mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
    v.rng.lock().unwrap().process_queue(0).expect("rng request");
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

#[test]
#[ignore = "needs /dev/kvm (root)"]
fn the_serial_and_a_virtio_device_come_back_in_a_second_vm() {
    let a = device_vm("rng", None).expect("first VM");
    drive_rng(&a.devices);
    assert_eq!(rng_request(&a, 0), 1);
    assert_eq!(rng_request(&a, 1), 2);
    // COM1: 8N1 and a scratch byte of our own.
    assert!(a.devices.pio.write(COM1 + 3, &[0x03]));
    assert!(a.devices.pio.write(COM1 + 7, &[0x5a]));

    let (serial, entries) = a.devices.save_states().expect("save");
    let json_before = json(&(&serial, &entries));
    let (serial, entries): (
        Option<boxlite_vmm::devices::legacy::serial::SerialSnap>,
        Vec<boxlite_vmm::snapshot::body::DeviceEntry>,
    ) = serde_json::from_str(&json_before).unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].kind, "rng");
    assert_eq!(entries[0].device.queues[0].next_used, 2);

    // The second VM gets a copy of the guest's memory, as a restore does.
    let b = device_vm("rng", serial.as_ref()).expect("second VM");
    let mut image = vec![0u8; 16 << 20];
    a.ram.mem.read_slice(&mut image, GuestAddress(0)).unwrap();
    b.ram.mem.write_slice(&image, GuestAddress(0)).unwrap();
    b.devices.restore_virtio_states(&entries).expect("restore");
    let (serial_b, entries_b) = b.devices.save_states().expect("save again");
    assert_eq!(
        json(&(&serial_b, &entries_b)),
        json_before,
        "saved again unchanged"
    );

    let mut scratch = [0u8];
    assert!(b.devices.pio.read(COM1 + 7, &mut scratch));
    assert_eq!(scratch[0], 0x5a, "COM1's scratch register");
    let mut status = [0u8; 4];
    assert!(b.devices.mmio.read(RNG_AT + 0x70, &mut status));
    assert_eq!(u32::from_le_bytes(status), 0xf, "rng transport status");
    // The restored rng serves the next request into used slot 2.
    assert_eq!(rng_request(&b, 2), 3, "restored rng");
}

#[test]
#[ignore = "needs /dev/kvm (root)"]
fn device_states_for_other_devices_are_refused_by_slot() {
    let a = device_vm("rng", None).expect("first VM");
    drive_rng(&a.devices);
    let (_, entries) = a.devices.save_states().expect("save");
    let other = device_vm("block", None).expect("second VM");
    let err = other
        .devices
        .restore_virtio_states(&entries)
        .expect_err("an rng's state into a block slot");
    assert_eq!(
        err.to_string(),
        "virtio device slot 0: the snapshot's is a rng device, this VM's a block"
    );
    let err = other
        .devices
        .restore_virtio_states(&[])
        .expect_err("no devices saved");
    assert_eq!(
        err.to_string(),
        "the snapshot has 0 virtio devices, this VM 1"
    );
    // A saved UART with more unread input than its FIFO holds.
    let mut serial = a.devices.save_states().expect("save").0.expect("COM1");
    serial.in_buffer = vec![b'x'; 65];
    let err = device_vm("rng", Some(&serial))
        .err()
        .expect("oversized FIFO");
    assert!(
        err.to_string()
            .starts_with("serial: the saved state cannot be restored (65 bytes"),
        "{err}"
    );
}

#[test]
#[ignore = "needs /dev/kvm (root)"]
fn a_saved_vm_goes_on_from_its_two_files_in_a_second_vm() {
    use std::os::fd::AsFd as _;

    use boxlite_vmm::device_manager::DeviceManager;
    use boxlite_vmm::devices::virtio::rng::Rng;
    use boxlite_vmm::snapshot::save::{save_vm, SaveParts, SaveTarget};
    use boxlite_vmm::snapshot::{body, memory_file, ram, state_file};
    use boxlite_vmm::vstate::vm::Vm;

    // VM A: 16 MiB of memfd RAM with the counter at CODE_AT, COM1, an rng,
    // one vCPU on its thread.
    let DeviceVm {
        vm,
        ram,
        mut devices,
        ..
    } = device_vm("rng", None).expect("first VM");
    ram.mem
        .write_slice(&COUNTER, GuestAddress(CODE_AT))
        .unwrap();
    let count = Arc::new(AtomicU16::new(0));
    devices
        .pio
        .insert(
            Arc::new(Mutex::new(Sink(count.clone()))),
            u64::from(PORT),
            2,
        )
        .unwrap();
    let fd = vm.create_vcpu(0).expect("vCPU");
    start(&fd);
    let msrs: Arc<[u32]> = saveable_msrs(&Kvm::new().unwrap(), 0, &fd, true)
        .unwrap()
        .into();
    let pio = Arc::new(std::mem::take(&mut devices.pio));
    let mmio = Arc::new(std::mem::take(&mut devices.mmio));
    let exit = Arc::new(ExitSignal::new().unwrap());
    let handle = VcpuHandle::spawn(Vcpu::new(0, fd, pio, mmio, exit.clone())).unwrap();
    assert!(handle.resume(), "the vCPU thread did not start");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::SeqCst) < 1000 {
        assert!(std::time::Instant::now() < end, "the guest did not count");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(handle.pause(), "no pause");
    let paused_at = count.load(Ordering::SeqCst);

    let dir = tempfile::tempdir().unwrap();
    let dir_fd = std::fs::File::open(dir.path()).unwrap();
    let parts = SaveParts {
        vm: vm.fd(),
        irqchip: true,
        vcpus: std::slice::from_ref(&handle),
        msr_indices: msrs,
        devices: &devices,
        ram: &ram,
        memory_mib: 16,
    };
    let target = SaveTarget {
        dir: dir_fd.as_fd(),
        dir_path: dir.path(),
        state_file: "vm.state",
        memory_file: "vm.mem",
    };
    let saved = save_vm(&parts, &target).expect("snapshot");
    assert_eq!(saved.memory_bytes, 4096 + (16 << 20));
    assert!(saved.memory_data_bytes < 1 << 20, "{saved:?}");
    assert_eq!(
        count.load(Ordering::SeqCst),
        paused_at,
        "the VM stays paused"
    );

    // Taking it again under the same names is refused, and leaves the
    // first snapshot as it was.
    let before = std::fs::read(dir.path().join("vm.state")).unwrap();
    let err = save_vm(&parts, &target).expect_err("the files exist");
    assert!(err.to_string().contains("cannot create"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("vm.state")).unwrap(), before);
    assert!(dir.path().join("vm.mem").exists());

    // VM B, from the two files alone.
    let state_path = dir.path().join("vm.state");
    let (header, body_bytes) = state_file::decode(&state_path, &before).expect("state file");
    assert_eq!(header.id, saved.id);
    let body = body::decode(&state_path, body_bytes).expect("body");
    let mem = ram::map_private(&dir.path().join("vm.mem"), header.id).expect("memory file");
    assert_eq!(
        body.vm.ram_regions,
        vec![memory_file::Region {
            guest_addr: 0,
            size: 16 << 20,
            file_offset: 0
        }]
    );
    // What VM B will run must be there before it runs (else KVM_RUN would
    // spin in zeros and the test hang rather than fail).
    let mut code = [0u8; COUNTER.len()];
    mem.read_slice(&mut code, GuestAddress(CODE_AT)).unwrap();
    assert_eq!(code, COUNTER, "the guest's code in the memory file");
    let rip = body.vcpus[0].regs.rip;
    assert!(
        (CODE_AT..CODE_AT + COUNTER.len() as u64).contains(&rip),
        "saved RIP {rip:#x} is outside the counter loop"
    );
    let vm_b = Vm::new(true).expect("second VM");
    vm_b.register_memory(&mem).expect("memory slots");
    let mut devices_b = DeviceManager::new();
    devices_b
        .attach_legacy(
            &vm_b,
            Box::new(std::io::sink()),
            Arc::new(ExitSignal::new().unwrap()),
            body.serial.as_ref(),
        )
        .unwrap();
    let rng_b = Arc::new(Mutex::new(Rng::new(None).unwrap()));
    devices_b
        .attach_virtio(&vm_b, &mem, "rng", rng_b, None)
        .unwrap();
    devices_b
        .restore_virtio_states(&body.devices)
        .expect("devices");
    let mut fd_b = vm_b.create_vcpu(0).expect("vCPU");
    body.vcpus[0].restore(&fd_b).expect("vCPU state");
    body.vm.state.restore(vm_b.fd()).expect("VM state");
    assert_eq!(
        next_count(&mut fd_b),
        paused_at.wrapping_add(1),
        "restored VM"
    );
    assert_eq!(
        next_count(&mut fd_b),
        paused_at.wrapping_add(2),
        "restored VM"
    );

    // And A resumes where it stopped too.
    assert!(handle.resume());
    let end = std::time::Instant::now() + Duration::from_secs(10);
    while count.load(Ordering::SeqCst) == paused_at {
        assert!(std::time::Instant::now() < end, "A did not resume");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(handle.pause());
    handle.finish();
}
