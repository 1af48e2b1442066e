//! Starting the same guest under QEMU microvm, for the benchmark's QEMU
//! row (`boot-qemu`): not a test of BoxLite, a point of comparison.

use std::fs;
use std::process::{Command, Stdio};
use std::time::Instant;

use super::{Vm, VmFiles, GUEST_MEMORY_MIB};
use crate::settings::Settings;
use crate::verdict::Failure;

impl Vm {
    /// QEMU microvm instead of boxlite-vmm: the runtime's qemu backend
    /// command line (runtime/src/hypervisor/qemu.rs: microvm without ACPI,
    /// memfd RAM, KVM with `-cpu host`, console to a file, `-no-reboot`)
    /// with only a virtio-rng device. QEMU's stderr goes to the `vmm.log`.
    pub fn start_qemu(s: &Settings, name: &str) -> Result<Vm, Failure> {
        let dir = s.work.join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let files = VmFiles::in_dir(&dir);
        let mem = format!("{GUEST_MEMORY_MIB}M");
        let mut cmdline = boxlite_runtime::hypervisor::qemu::BASE_CMDLINE.to_owned();
        if !s.guest_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&s.guest_cmdline);
        }
        let log = fs::File::create(&files.vmm_log)?;
        let started = Instant::now();
        let child = Command::new(s.qemu())
            .args(["-M", "microvm,acpi=off,memory-backend=mem"])
            .args(["-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", &mem])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-chardev")
            .arg(format!("file,id=console,path={}", files.console.display()))
            .args(["-serial", "chardev:console"])
            .arg("-kernel")
            .arg(s.guest_kernel())
            .arg("-initrd")
            .arg(s.guest_initramfs())
            .arg("-append")
            .arg(&cmdline)
            .args(["-device", "virtio-rng-device"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", s.qemu().display()))?;
        Ok(Vm {
            files,
            child,
            started,
            vsock: None,
            ready: None,
            jailed: false,
        })
    }
}
