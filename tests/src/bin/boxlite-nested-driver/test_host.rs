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
