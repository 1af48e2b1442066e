//! Facts about the test host that decide whether a scenario can run at
//! all: its TSC frequency, `/dev/kvm`, and KVM's kernel messages.

use std::fs;
use std::path::Path;

use crate::verdict::Failure;

/// Why KVM cannot run a guest in this test host, if it cannot; checked
/// before each scenario so a broken host fails fast with the reason.
pub fn kvm_unusable(cpu_mhz: f64) -> Option<Failure> {
    if cpu_mhz <= 0.0 {
        // KVM's kvm_guest_time_update() re-requests a clock update
        // forever while the host's tsc_khz is 0: the vCPU never enters
        // the guest and the scenario would only time out.
        Some(Failure {
            reason: "the test-host kernel does not know its TSC frequency (cpu MHz = 0: TSC \
                     calibration failed under TCG), so KVM would never enter a guest; boot the \
                     test host with tsc_early_khz=<the outer host's TSC kHz>"
                .to_owned(),
            vm: None,
        })
    } else if !Path::new("/dev/kvm").exists() {
        Some(Failure {
            reason: format!(
                "no /dev/kvm in the test host (KVM_AMD did not initialise: {})",
                kvm_dmesg_hint()
            ),
            vm: None,
        })
    } else {
        None
    }
}

/// An idle KVM VM for the driver's whole run: an in-kernel irqchip and one
/// vCPU that never runs, no memory. Kernel text the test host would
/// otherwise patch at every scenario stays as it is, because the outer
/// QEMU can miss such a patch and loop on its int3 forever
/// (docs/testing-nested.md, "The int3 loop"): the count of VMs never falls
/// back to 0 (each 0 <-> 1 change flips KVM's preempt-notifier key, which
/// patches `__schedule`), and this vCPU's LAPIC stays software-disabled
/// (each scenario's vCPUs would flip KVM's `apic_sw_disabled` key on when
/// created and off a second after their guest enables its APIC).
/// Returns the VM's and the vCPU's file descriptors, to keep.
pub fn hold_idle_vm() -> std::io::Result<[std::os::fd::OwnedFd; 2]> {
    use std::os::fd::{FromRawFd as _, OwnedFd};
    const KVM_CREATE_VM: libc::c_ulong = 0xAE01; // _IO(KVMIO, 0x01)
    const KVM_CREATE_IRQCHIP: libc::c_ulong = 0xAE60; // _IO(KVMIO, 0x60)
    const KVM_CREATE_VCPU: libc::c_ulong = 0xAE41; // _IO(KVMIO, 0x41)
    /// One KVM ioctl that takes its argument by value and returns a
    /// number (a new file descriptor or 0).
    fn kvm_ioctl(fd: &impl std::os::fd::AsRawFd, req: libc::c_ulong) -> std::io::Result<i32> {
        // SAFETY: these three ioctls take an integer argument (0) by value
        // and write no memory of ours.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, 0 as libc::c_ulong) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }
    let kvm = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")?;
    // SAFETY: a file descriptor KVM has just returned, owned by nothing
    // else.
    let vm = unsafe { OwnedFd::from_raw_fd(kvm_ioctl(&kvm, KVM_CREATE_VM)?) };
    kvm_ioctl(&vm, KVM_CREATE_IRQCHIP)?;
    // SAFETY: as above.
    let vcpu = unsafe { OwnedFd::from_raw_fd(kvm_ioctl(&vm, KVM_CREATE_VCPU)?) };
    Ok([vm, vcpu])
}

/// The test host's CPU frequency from /proc/cpuinfo (its `cpu_khz`, which
/// is 0 when TSC calibration failed), or 0.
pub fn cpu_mhz() -> f64 {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Seconds since the test host booted.
pub fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// Kernel messages about KVM/SVM, for the "no /dev/kvm" failure.
fn kvm_dmesg_hint() -> String {
    // /dev/kmsg gives the ring buffer without the syslog syscall.
    let Ok(f) = fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open("/dev/kmsg")
    else {
        return "cannot read /dev/kmsg".to_owned();
    };
    use std::io::BufRead;
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("kvm") || l.contains("svm")
        })
        .map(|l| l.split_once(';').map(|(_, m)| m.to_owned()).unwrap_or(l))
        .collect();
    if lines.is_empty() {
        "no kvm/svm kernel messages".to_owned()
    } else {
        lines.join(" / ")
    }
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}
