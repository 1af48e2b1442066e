//! PID 1 duties of the test host: the pseudo filesystems at start, and
//! the reboot that ends the test host (PID 1 must never exit).

use std::ffi::CString;
use std::fs;
use std::time::Duration;

/// Mounts /proc, /sys, /dev, /tmp and /run; one already there is fine.
pub fn mount_pseudo_filesystems() {
    for (src, target, fstype, mode) in [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", Some("mode=0755")),
    ] {
        let _ = fs::create_dir_all(target);
        let c = |s: &str| CString::new(s).expect("no NUL");
        let (src_c, target_c, fstype_c) = (c(src), c(target), c(fstype));
        let data = mode.map(c);
        // SAFETY: every pointer is a NUL-terminated string that outlives the
        // call, or null for no data.
        let rc = unsafe {
            libc::mount(
                src_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                0,
                data.as_ref()
                    .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                println!("boxlite-nested-driver: mount {fstype} on {target}: {e}");
            }
        }
    }
}

/// Ends the test host: with `reboot=t` on its command line the reboot is
/// a triple fault, and QEMU's `-no-reboot` exits.
pub fn end_test_host() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // Not reached unless reboot failed; PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
