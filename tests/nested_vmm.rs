//! Linux under `boxlite-vmm`, in the nested test host (docs/testing-nested.md,
//! layer 2 of the test layers in docs/architecture.md).
//!
//! One outer `qemu-system-x86_64 -accel tcg -cpu EPYC,+svm,+npt` boots the
//! test-host kernel (KVM_AMD) with the test-host initramfs from
//! `cargo xtask testhost`; its `/init`, `boxlite-nested-driver`, runs every
//! scenario with `boxlite-vmm` and prints `BOXLITE-NESTED <scenario>
//! PASS|FAIL|SKIP <detail>` on the serial console. All tests share that one
//! boot (a `OnceLock`) and each reads its scenario's verdict.
//!
//! Every test demands PASS: a SKIP verdict (the driver's answer when the
//! VMM lacks what a scenario needs) fails it like a FAIL. Run with
//! `--nocapture` to see each scenario's detail line.
//!
//! Environment: `BOXLITE_TESTHOST_KERNEL`, `BOXLITE_TESTHOST_INITRAMFS`
//! (required: the two paths `cargo xtask testhost` prints);
//! `BOXLITE_NESTED_TIMEOUT` (seconds for the whole outer boot, default 420);
//! `BOXLITE_NESTED_SCENARIOS` (default: all); `BOXLITE_TESTHOST_TSC_KHZ`
//! (default: `cpu MHz` of /proc/cpuinfo; see `host_tsc_khz`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const QEMU: &str = "qemu-system-x86_64";
const ALL_SCENARIOS: &str = boxlite_tests::NESTED_SCENARIOS;
/// The default list took 45–125 s on our 2 cores, depending on their load,
/// before `balloon` (three 512 MiB guests, ~80 s) joined it: 186 s at load 3.
const DEFAULT_TIMEOUT_SECS: u64 = 420;
const MARK: &str = "BOXLITE-NESTED ";
const DONE: &str = "BOXLITE-NESTED-DONE";
const START: &str = "BOXLITE-NESTED-START";
const CONSOLE_TAIL_LINES: usize = 80;

/// What one outer boot produced.
struct OuterRun {
    console: PathBuf,
    console_text: String,
    /// scenario → (PASS|FAIL|SKIP, detail).
    verdicts: BTreeMap<String, (String, String)>,
    /// Wall time from QEMU start to the driver's start line, and to DONE.
    driver_started: Option<Duration>,
    done: Option<Duration>,
    /// Why the run as a whole went wrong (timeout, QEMU failure), if it did.
    problem: Option<String>,
}

impl OuterRun {
    /// The end of the console log (the runtime's one log-tail reader).
    fn tail(&self) -> String {
        boxlite_protocol::log_tail::log_tail(&self.console, CONSOLE_TAIL_LINES).unwrap_or_default()
    }

    /// The lines the driver printed for `scenario`'s failure (`  | …`)
    /// plus its verdict; the console tail if there is nothing specific.
    fn excerpt(&self, scenario: &str) -> String {
        let header = format!("  | --- {scenario}: ");
        let mut out = Vec::new();
        let mut inside = false;
        for l in self.console_text.lines() {
            if l.contains(&header) {
                inside = true;
            } else if !l.starts_with("  | ") {
                inside = false;
            }
            if inside || l.contains(&format!("{MARK}{scenario} ")) {
                out.push(l);
            }
        }
        if out.is_empty() {
            self.tail()
        } else {
            out.join("\n")
        }
    }
}

fn required_path(var: &str) -> PathBuf {
    let Some(p) = std::env::var_os(var).map(PathBuf::from) else {
        panic!(
            "{var} is not set: run `cargo xtask testhost` and export \
             BOXLITE_TESTHOST_KERNEL=<testhost-kernel path> BOXLITE_TESTHOST_INITRAMFS=<testhost-initramfs path> \
             (scripts/test.sh does both)"
        );
    };
    assert!(
        p.is_file(),
        "{var}={} does not exist: run `cargo xtask testhost` (scripts/test.sh does)",
        p.display()
    );
    p
}

fn outer_run() -> &'static OuterRun {
    static RUN: OnceLock<OuterRun> = OnceLock::new();
    RUN.get_or_init(boot_test_host)
}

fn boot_test_host() -> OuterRun {
    let kernel = required_path("BOXLITE_TESTHOST_KERNEL");
    let initramfs = required_path("BOXLITE_TESTHOST_INITRAMFS");
    let scenarios =
        std::env::var("BOXLITE_NESTED_SCENARIOS").unwrap_or_else(|_| ALL_SCENARIOS.to_owned());
    let timeout = Duration::from_secs(
        std::env::var("BOXLITE_NESTED_TIMEOUT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(DEFAULT_TIMEOUT_SECS),
    );
    let dir = std::env::temp_dir().join(format!("boxlite-nested-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the run directory");
    let console = dir.join("testhost-console.log");
    let mut qemu = spawn_qemu(&kernel, &initramfs, &console, &scenarios);
    let started = Instant::now();
    let mut run = OuterRun {
        console: console.clone(),
        console_text: String::new(),
        verdicts: BTreeMap::new(),
        driver_started: None,
        done: None,
        problem: None,
    };
    loop {
        std::thread::sleep(Duration::from_millis(200));
        run.console_text = std::fs::read(&console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if run.driver_started.is_none() && run.console_text.contains(START) {
            run.driver_started = Some(started.elapsed());
        }
        if run.done.is_none() && run.console_text.contains(DONE) {
            run.done = Some(started.elapsed());
        }
        match qemu.try_wait() {
            Ok(Some(status)) => {
                if run.done.is_none() {
                    run.problem = Some(format!(
                        "QEMU exited ({status}) before the driver printed {DONE}"
                    ));
                }
                break;
            }
            Ok(None) => {}
            Err(e) => {
                run.problem = Some(format!("cannot wait for QEMU: {e}"));
                break;
            }
        }
        // After DONE the driver reboots the test host; give it a moment.
        let limit = match run.done {
            Some(d) => (d + Duration::from_secs(20)).min(timeout),
            None => timeout,
        };
        if started.elapsed() > limit {
            if run.done.is_none() {
                run.problem = Some(format!(
                    "no {DONE} within {}s; QEMU killed",
                    timeout.as_secs()
                ));
            }
            let _ = qemu.kill();
            let _ = qemu.wait();
            break;
        }
    }
    let total = started.elapsed();
    run.console_text = std::fs::read(&console)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    run.verdicts = parse_verdicts(&run.console_text);
    let host_up = run
        .console_text
        .lines()
        .find_map(|l| l.split("test-host-uptime=").nth(1))
        .and_then(|v| v.split('s').next())
        .unwrap_or("?")
        .to_owned();
    eprintln!(
        "nested test host: console {}; driver started {} after QEMU start (test-host uptime {host_up}s), done {}, QEMU gone after {:.1}s",
        console.display(),
        fmt_opt(run.driver_started),
        fmt_opt(run.done),
        total.as_secs_f64()
    );
    for (name, (word, detail)) in &run.verdicts {
        eprintln!("  {name}: {word} {detail}");
    }
    run
}

/// scenario → (PASS|FAIL|SKIP, detail) from the driver's verdict lines.
fn parse_verdicts(text: &str) -> BTreeMap<String, (String, String)> {
    let mut verdicts = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.find(MARK).map(|i| &line[i + MARK.len()..]) else {
            continue;
        };
        let mut parts = rest.splitn(3, ' ');
        if let (Some(name), Some(word)) = (parts.next(), parts.next()) {
            if matches!(word, "PASS" | "FAIL" | "SKIP") {
                // The driver ends each verdict with "[<seconds>s]".
                let detail = parts.next().unwrap_or("").trim();
                let detail = match detail.rsplit_once(" [") {
                    Some((d, t)) if t.ends_with("s]") => d,
                    _ => detail,
                }
                .to_owned();
                verdicts.insert(name.to_owned(), (word.to_owned(), detail));
            }
        }
    }
    verdicts
}

fn fmt_opt(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.1}s", d.as_secs_f64()))
        .unwrap_or_else(|| "never".to_owned())
}

/// The outer host's TSC frequency in kHz, for the test host's
/// `tsc_early_khz=`: `BOXLITE_TESTHOST_TSC_KHZ`, else `cpu MHz` of
/// /proc/cpuinfo (the kernel's calibrated TSC rate on x86 hosts).
///
/// QEMU TCG's RDTSC runs at the host's TSC rate, but the test-host kernel
/// often fails to calibrate it under TCG ("Marking TSC unstable due to could
/// not calculate TSC khz"); with tsc_khz = 0, KVM never enters a guest.
///
/// With it goes `tsc=reliable`: TCG's RDTSC on every vCPU reads the one
/// host TSC (constant, nonstop), so it is synchronized and invariant, but
/// the emulated EPYC cannot say so (TCG has no `invtsc`) and the test host
/// would keep time by jiffies, which lose ticks when TCG is starved; the
/// guests' kvm-clock then drifts from their TSC (docs/testing-nested.md,
/// "The test host's clock").
fn host_tsc_khz() -> Option<u64> {
    if let Some(v) = std::env::var("BOXLITE_TESTHOST_TSC_KHZ")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(v);
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 0.0).then(|| (mhz * 1000.0).round() as u64)
}

fn spawn_qemu(kernel: &Path, initramfs: &Path, console: &Path, scenarios: &str) -> Child {
    // kvm_amd.npt=0: the test host's KVM runs guests on shadow paging, as
    // the outer QEMU's nested paging fails now and then right after a
    // #VMEXIT (docs/testing-nested.md, "Shadow paging in the test host").
    let mut append =
        format!("console=ttyS0 reboot=t panic=-1 no_timer_check kvm_amd.npt=0 boxlite.scenarios={scenarios}");
    match host_tsc_khz() {
        // tsc=reliable: see host_tsc_khz.
        Some(khz) => append.push_str(&format!(" tsc_early_khz={khz} tsc=reliable")),
        None => eprintln!(
            "warning: cannot read the host TSC frequency (set BOXLITE_TESTHOST_TSC_KHZ); \
             the test host may not be able to run KVM guests"
        ),
    }
    let mut cmd = Command::new(QEMU);
    cmd.args(["-M", "microvm", "-accel", "tcg"])
        .args(["-cpu", "EPYC,+svm,+npt", "-smp", "2", "-m", "2048"])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    cmd.spawn()
        .unwrap_or_else(|e| panic!("cannot start {QEMU} (install qemu-system-x86): {e}"))
}

/// Asserts `scenario` passed (a SKIP is a failure: every scenario's
/// needs are in boxlite-vmm now).
fn expect_pass(scenario: &str) {
    let run = outer_run();
    match run.verdicts.get(scenario) {
        Some((word, detail)) if word == "PASS" => {
            eprintln!("{scenario}: PASS {detail}");
        }
        Some((word, detail)) if word == "SKIP" => panic!(
            "nested scenario {scenario} was skipped, which this test does not allow: {detail}"
        ),
        Some((_, detail)) => panic!(
            "nested scenario {scenario} FAILED: {detail}\n--- console excerpt ({}) ---\n{}",
            run.console.display(),
            run.excerpt(scenario)
        ),
        None => panic!(
            "no verdict for nested scenario {scenario} ({}); console {}:\n{}",
            run.problem
                .as_deref()
                .unwrap_or("the driver did not run it"),
            run.console.display(),
            run.tail()
        ),
    }
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_boot() {
    expect_pass("boot");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_smp() {
    expect_pass("smp");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_health() {
    expect_pass("health");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_reboot() {
    expect_pass("reboot");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_guest_connect() {
    expect_pass("guest-connect");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_fs_share() {
    expect_pass("fs");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_block_device() {
    expect_pass("blk");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_net_device() {
    expect_pass("net");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_balloon_gives_freed_memory_back() {
    expect_pass("balloon");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_snapshot_two_clones_answer() {
    expect_pass("snapshot");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_snapshot_fs_clone_serves_its_own_share() {
    expect_pass("snapshot-fs");
}

#[test]
#[ignore = "needs qemu-system-x86_64 and the test-host assets (cargo xtask testhost); run by scripts/test.sh"]
fn nested_snapshot_net_clone_takes_the_pods_mac() {
    expect_pass("snapshot-net");
}

/// Why this host cannot run the scenarios directly, if it cannot: the
/// driver outside PID 1 needs root and a KVM that boots Linux (VMX/SVM,
/// `/dev/kvm`, not `kvm_pvm`), as `hypervisor = "auto"` decides.
fn direct_run_impossible() -> Option<String> {
    let probe = boxlite_runtime::config::HostAccelProbe::probe();
    if !probe.dev_kvm {
        return Some("no /dev/kvm on this host".into());
    }
    if probe.kvm_pvm {
        return Some(
            "this host's KVM is kvm_pvm, which cannot boot Linux (docs/architecture.md); \
             the nested test host runs these scenarios instead"
                .into(),
        );
    }
    if !probe.cpu_virt_flags {
        return Some("no VMX/SVM in /proc/cpuinfo".into());
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (taps, virtiofsd, /dev/kvm)".into());
    }
    None
}

/// The first `name` in PATH.
fn in_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found in PATH (scripts/test.sh puts target/debug first)")
        })
}

/// On a host whose KVM boots Linux the same scenarios run directly: the
/// driver as an ordinary process, with boxlite-vmm and virtiofsd from PATH
/// and the guest assets of the other VM tests.
#[test]
#[ignore = "needs root, a KVM that boots Linux (VMX/SVM), virtiofsd and the guest assets; run by scripts/test.sh"]
fn direct_on_this_host_or_skip() {
    if let Some(why) = direct_run_impossible() {
        boxlite_tests::report_skip("nested_vmm direct_on_this_host", &why);
        return;
    }
    let assets = boxlite_tests::guest_assets();
    let root = tempfile::tempdir().expect("tempdir");
    let work = tempfile::tempdir().expect("tempdir");
    for (at, target) in [
        ("usr/bin/boxlite-vmm", in_path("boxlite-vmm")),
        ("usr/bin/virtiofsd", in_path("virtiofsd")),
        ("guest/vmlinux", assets.kernel.clone()),
        ("guest/initramfs.cpio.gz", assets.initramfs.clone()),
    ] {
        let link = root.path().join(at);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, &link).unwrap();
    }
    let scenarios =
        std::env::var("BOXLITE_NESTED_SCENARIOS").unwrap_or_else(|_| ALL_SCENARIOS.to_owned());
    let out = Command::new("timeout")
        .args(["-k", "10", "600"])
        .arg(env!("CARGO_BIN_EXE_boxlite-nested-driver"))
        .env("BOXLITE_NESTED_ROOT", root.path())
        .env("BOXLITE_NESTED_WORK", work.path())
        .env(
            "BOXLITE_NESTED_CMDLINE",
            format!("boxlite.scenarios={scenarios}"),
        )
        .stdin(Stdio::null())
        .output()
        .expect("run boxlite-nested-driver");
    let text = String::from_utf8_lossy(&out.stdout);
    let verdicts = parse_verdicts(&text);
    for scenario in scenarios.split(',') {
        match verdicts.get(scenario) {
            Some((word, detail)) if word == "PASS" => eprintln!("direct {scenario}: PASS {detail}"),
            other => panic!(
                "direct scenario {scenario}: {other:?} (driver {}); its output:\n{text}",
                out.status
            ),
        }
    }
}
