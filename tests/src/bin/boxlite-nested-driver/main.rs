//! `boxlite-nested-driver`: PID 1 of the nested test host
//! (docs/testing-nested.md; layer 2 of the test layers in docs/architecture.md).
//!
//! The test host is a Linux kernel with KVM_AMD running under QEMU TCG with
//! an emulated SVM CPU, so `/dev/kvm` works here the way it does on a real
//! host. This program mounts the pseudo filesystems, reads the scenarios to
//! run from the kernel command line (`boxlite.scenarios=boot,health,smp,reboot,guest-connect,fs,blk,net,balloon`),
//! runs `boxlite-vmm` on the guest kernel and initramfs for each of them,
//! prints one verdict line per scenario on the console
//!
//! ```text
//! BOXLITE-NESTED <scenario> PASS|FAIL|SKIP <detail>
//! ```
//!
//! then `BOXLITE-NESTED-DONE`, and reboots (with `reboot=t` on the test
//! host's command line the reboot is a triple fault, and QEMU's `-no-reboot`
//! exits). On FAIL the guest console tail and the VMM log tail are printed
//! first, each line prefixed with `  | `.
//!
//! One more scenario is not a test but the benchmark's QEMU row
//! (scripts/bench-nested.sh): `boot-qemu`, the `boot` scenario under QEMU
//! microvm, in a test host built with `cargo xtask testhost --with-qemu`.
//!
//! Other command-line parameters: `boxlite.timeout=<secs>` (per scenario,
//! default 120), `boxlite.vmm_log=<filter>` (RUST_LOG for boxlite-vmm,
//! default `info`), `boxlite.guest_cmdline=<extra>` (appended to the
//! guest's command line; `+` stands for a space), `boxlite.verbose=1` (print
//! the console and VMM log tails of passing and skipped scenarios too),
//! `boxlite.jail=0` (run boxlite-vmm with `--no-jail`, debugging only).
//!
//! Outside PID 1 (on a host whose KVM boots Linux: tests/nested_vmm.rs's
//! `direct_on_this_host_or_skip`, or by hand) it mounts nothing and exits
//! instead of rebooting; `BOXLITE_NESTED_ROOT` then replaces `/` as the place
//! of `usr/bin/boxlite-vmm`, `usr/bin/virtiofsd` and `guest/`,
//! `BOXLITE_NESTED_WORK` replaces `/tmp/boxlite-nested`, and the parameters
//! come from `BOXLITE_NESTED_CMDLINE` (same `boxlite.x=y` words) instead of
//! `/proc/cmdline`.
//!
//! Layout: [`init`] (PID 1 duties), [`settings`] (the command line),
//! [`test_host`] (can KVM run a guest here at all), [`vm`] (the inner VMs
//! under boxlite-vmm or QEMU, their files and the agent calls the
//! scenarios make), [`scenarios`] (one file per scenario), [`verdict`]
//! (what a scenario returns and how it is printed).

mod disk;
mod host_net;
mod init;
mod scenarios;
mod settings;
mod test_host;
mod verdict;
mod vm;

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use verdict::{one_line, Verdict};
use vm::VmFiles;

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        init::mount_pseudo_filesystems();
    }
    let result = std::panic::catch_unwind(run);
    if let Err(p) = result {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        println!("BOXLITE-NESTED driver FAIL the driver panicked: {msg}");
        println!("BOXLITE-NESTED-DONE");
    }
    let _ = std::io::stdout().flush();
    if pid1 {
        init::end_test_host();
    }
}

/// Runs the scenarios one by one and prints a verdict line for each.
fn run() {
    let host_up = test_host::uptime();
    let (scenarios, settings) = settings::from_cmdline();
    let cpu_mhz = test_host::cpu_mhz();
    println!(
        "BOXLITE-NESTED-START test-host-uptime={host_up:.2}s scenarios={scenarios} kvm={} cpu-mhz={cpu_mhz:.3}",
        Path::new("/dev/kvm").exists()
    );
    let _idle_vm = test_host::hold_idle_vm()
        .map_err(|e| println!("BOXLITE-NESTED-WARNING cannot hold an idle KVM VM: {e}"))
        .ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut counts = [0u32; 3];
    for name in scenarios.split(',').filter(|s| !s.is_empty()) {
        let started = Instant::now();
        let verdict = match test_host::kvm_unusable(cpu_mhz) {
            Some(failure) => Err(failure),
            None => rt.block_on(scenarios::run(name, &settings)),
        };
        let secs = started.elapsed().as_secs_f64();
        let (word, detail) = match verdict {
            Ok(Verdict::Pass(d)) => {
                counts[0] += 1;
                ("PASS", d)
            }
            Ok(Verdict::Skip(d)) => {
                counts[2] += 1;
                ("SKIP", d)
            }
            Ok(Verdict::Fail(d)) => {
                counts[1] += 1;
                ("FAIL", d)
            }
            Err(f) => {
                counts[1] += 1;
                if let Some(vm) = &f.vm {
                    vm.print_tails(name);
                }
                ("FAIL", f.reason)
            }
        };
        if settings.verbose && word != "FAIL" {
            VmFiles::in_dir(&settings.work.join(name)).print_tails(name);
        }
        println!(
            "BOXLITE-NESTED {name} {word} {} [{secs:.1}s]",
            one_line(&detail)
        );
        let _ = std::io::stdout().flush();
    }
    println!(
        "BOXLITE-NESTED-DONE pass={} fail={} skip={} test-host-uptime={:.2}s",
        counts[0],
        counts[1],
        counts[2],
        test_host::uptime()
    );
}
