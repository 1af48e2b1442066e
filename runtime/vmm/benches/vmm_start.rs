//! Start-up benchmark (not a test): `boxlite-vmm` vs `qemu-system-x86_64 -M
//! microvm -accel kvm` on the same tiny real-mode guest.
//!
//! ```sh
//! CARGO_TARGET_DIR=/work/target-vmm cargo bench -p boxlite-vmm --bench vmm_start -- --runs 20
//! ```
//!
//! Needs root (or access to /dev/kvm) and QEMU (`--qemu PATH`, default
//! `qemu-system-x86_64`). The guest is nine bytes of 16-bit code,
//! `mov dx, 0x3f8; mov al, 'X'; out dx, al; hlt; jmp $-3`: its first act is
//! a byte to COM1. boxlite-vmm loads it as a raw real-mode image at 0x1000
//! (CS = 0); QEMU runs it as the firmware (`-bios`, a 64 KiB ROM whose reset
//! vector at 0xffff0 holds the same nine bytes). Both write COM1 into a FIFO
//! the benchmark reads, so "start" is: spawn → the byte `X` arrives.
//!
//! Memory: once the byte has arrived (the VMM is fully set up and the vCPU
//! halted) the benchmark waits `--settle-ms`, reads `/proc/<pid>/status`
//! (VmHWM, RssAnon, RssFile, RssShmem) and sums the `Rss` of the guest-RAM
//! mappings in `/proc/<pid>/smaps` (both VMMs back guest RAM with a memfd:
//! `/memfd:boxlite-guest-ram`, QEMU's `memory-backend-memfd`), then kills
//! the process. "peak RSS excl. guest RAM" = VmHWM − guest-RAM Rss.
//! Runs alternate between the two VMMs so they share the machine's load.

use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use boxlite_vmm::config::{CpuMode, RawImageConfig, VmConfig};

/// `mov dx, 0x3f8; mov al, 'X'; out dx, al; hlt; jmp $-3`.
const GUEST: [u8; 9] = [0xba, 0xf8, 0x03, 0xb0, b'X', 0xee, 0xf4, 0xeb, 0xfd];
const ROM_SIZE: usize = 64 * 1024;
const RESET_VECTOR_OFFSET: usize = ROM_SIZE - 16;

struct Opts {
    runs: usize,
    qemu: String,
    memory_mib: u32,
    settle_ms: u64,
    vmm: PathBuf,
}

fn parse_opts() -> Opts {
    let mut o = Opts {
        runs: 20,
        qemu: "qemu-system-x86_64".into(),
        memory_mib: 128,
        settle_ms: 50,
        vmm: std::env::var_os("BOXLITE_VMM")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_boxlite-vmm"))),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--runs" => o.runs = val().parse().expect("--runs N"),
            "--qemu" => o.qemu = val(),
            "--memory-mib" => o.memory_mib = val().parse().expect("--memory-mib M"),
            "--settle-ms" => o.settle_ms = val().parse().expect("--settle-ms MS"),
            "--vmm" => o.vmm = PathBuf::from(val()),
            // `cargo bench` passes `--bench`; ignore harness flags.
            _ => {}
        }
    }
    o
}

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Boxlite,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Boxlite => "boxlite-vmm",
            Vmm::Qemu => "qemu microvm",
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Sample {
    start_ms: f64,
    hwm_kib: u64,
    guest_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    shmem_kib: u64,
}

impl Sample {
    fn excl_guest_kib(&self) -> u64 {
        self.hwm_kib.saturating_sub(self.guest_kib)
    }
}

struct Bench {
    dir: tempfile::TempDir,
    opts: Opts,
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn prepare(&self) {
        fs::write(self.path("guest.bin"), GUEST).expect("write guest.bin");
        let mut rom = vec![0xf4u8; ROM_SIZE]; // hlt everywhere else
        rom[RESET_VECTOR_OFFSET..RESET_VECTOR_OFFSET + GUEST.len()].copy_from_slice(&GUEST);
        fs::write(self.path("guest.rom"), rom).expect("write guest.rom");
        let sandbox = self.path("sandbox");
        fs::create_dir_all(&sandbox).expect("sandbox dir");
        let cfg = VmConfig {
            vcpus: 1,
            memory_mib: self.opts.memory_mib,
            console_log: Some(self.path("console.fifo")),
            irqchip: true,
            sandbox_dir: Some(sandbox),
            raw_image: Some(RawImageConfig {
                path: self.path("guest.bin"),
                load_addr: 0x1000,
                mode: CpuMode::Real,
            }),
            ..VmConfig::default()
        };
        fs::write(self.path("vm.json"), cfg.to_json_pretty()).expect("write vm.json");
    }

    fn command(&self, vmm: Vmm) -> Command {
        match vmm {
            Vmm::Boxlite => {
                let mut c = Command::new(&self.opts.vmm);
                c.arg("--config").arg(self.path("vm.json"));
                c.env_remove("RUST_LOG"); // default `info`, as in production
                c
            }
            Vmm::Qemu => {
                let mem = format!("{}M", self.opts.memory_mib);
                let mut c = Command::new(&self.opts.qemu);
                c.args([
                    "-M",
                    "microvm,acpi=off,memory-backend=mem,x-option-roms=off,rtc=off",
                ])
                .args(["-accel", "kvm", "-cpu", "host,-arch-capabilities"])
                .args(["-smp", "1", "-m", &mem])
                .args([
                    "-object",
                    &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
                ])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                ])
                .arg("-chardev")
                .arg(format!(
                    "file,id=console,path={}",
                    self.path("console.fifo").display()
                ))
                .args(["-serial", "chardev:console", "-bios"])
                .arg(self.path("guest.rom"));
                c
            }
        }
    }

    fn command_line(&self, vmm: Vmm) -> String {
        let c = self.command(vmm);
        let mut s = c.get_program().to_string_lossy().into_owned();
        for a in c.get_args() {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }

    /// One run: returns the sample and the VMM's stderr.
    fn run(&self, vmm: Vmm) -> (Sample, String) {
        let fifo = self.path("console.fifo");
        let _ = fs::remove_file(&fifo);
        let c = CString::new(fifo.as_os_str().as_bytes()).expect("fifo path");
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        // SAFETY: as above; the returned fd is owned below.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK) };
        assert!(fd >= 0, "open fifo");
        // SAFETY: `fd` was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut reader = fs::File::from(fd);

        let errpath = self.path("stderr.log");
        let err = fs::File::create(&errpath).expect("stderr log");
        let mut cmd = self.command(vmm);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(err));

        let t0 = Instant::now();
        let mut child = cmd.spawn().expect("spawn VMM");
        let start = wait_for_byte(&mut reader, &mut child, t0, &errpath);
        sleep(Duration::from_millis(self.opts.settle_ms));
        let mut s = read_memory(child.id());
        s.start_ms = start.as_secs_f64() * 1e3;
        let _ = child.kill();
        let _ = child.wait();
        (s, fs::read_to_string(&errpath).unwrap_or_default())
    }
}

fn wait_for_byte(reader: &mut fs::File, child: &mut Child, t0: Instant, err: &Path) -> Duration {
    let mut buf = [0u8; 64];
    loop {
        let mut pfd = libc::pollfd {
            fd: reader.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        unsafe { libc::poll(&mut pfd, 1, 5) };
        match reader.read(&mut buf) {
            Ok(n) if n > 0 && buf[..n].contains(&b'X') => return t0.elapsed(),
            _ => {}
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!(
                "VMM exited ({st}) before the guest's byte:\n{}",
                fs::read_to_string(err).unwrap_or_default()
            );
        }
        if t0.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("no byte from the guest within 20 s");
        }
    }
}

/// The VMM's log is coloured (tracing's default); drop `ESC [ … m`.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (false, c) => out.push(c),
            (true, 'm') => esc = false,
            (true, _) => {}
        }
    }
    out
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn read_memory(pid: u32) -> Sample {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    // Sum `Rss:` of every mapping whose header names a memfd (guest RAM).
    let mut guest_kib = 0;
    let mut in_guest = false;
    for l in smaps.lines() {
        if l.split_whitespace().nth(1).is_some_and(|f| f.contains('-'))
            && l.split_whitespace().next().is_some_and(|a| a.contains('-'))
        {
            in_guest = l.contains("/memfd:");
        } else if let Some(v) = l.strip_prefix("Rss:") {
            if in_guest {
                guest_kib += v
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .unwrap_or(0);
            }
        }
    }
    Sample {
        start_ms: 0.0,
        hwm_kib: status_kib(&status, "VmHWM:"),
        guest_kib,
        anon_kib: status_kib(&status, "RssAnon:"),
        file_kib: status_kib(&status, "RssFile:"),
        shmem_kib: status_kib(&status, "RssShmem:"),
    }
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let opts = parse_opts();
    assert!(opts.runs > 0, "--runs must be > 0");
    let b = Bench {
        dir: tempfile::tempdir().expect("tempdir"),
        opts,
    };
    b.prepare();
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    println!("# boxlite-vmm vs QEMU microvm: spawn -> first guest byte, RSS");
    println!(
        "machine: {} CPUs, {cpu}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("load average before: {}", loadavg());
    for v in [Vmm::Boxlite, Vmm::Qemu] {
        println!("{}: {}", v.name(), b.command_line(v));
    }

    // One warm-up run each (page cache, binary), not counted; the jail check.
    let (_, err) = b.run(Vmm::Boxlite);
    assert!(
        err.contains("seccomp filters loaded on every thread"),
        "boxlite-vmm ran without its jail:\n{err}"
    );
    let _ = b.run(Vmm::Qemu);

    let mut res: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let mut setup_ms = Vec::new();
    let mut true_ms = Vec::new();
    for i in 0..b.opts.runs {
        // Alternate which one goes first so both see the same load.
        let order = if i % 2 == 0 {
            [Vmm::Boxlite, Vmm::Qemu]
        } else {
            [Vmm::Qemu, Vmm::Boxlite]
        };
        for v in order {
            let (s, err) = b.run(v);
            if let Some(us) = strip_ansi(&err)
                .split("setup_us=")
                .nth(1)
                .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|d| d.parse::<f64>().ok())
            {
                setup_ms.push(us / 1e3);
            }
            println!(
                "run {i:>2} {:<12} start {:>7.2} ms  VmHWM {:>6} KiB  guest RAM {:>5} KiB  \
                 RssAnon {:>6} RssFile {:>6} RssShmem {:>6} KiB",
                v.name(),
                s.start_ms,
                s.hwm_kib,
                s.guest_kib,
                s.anon_kib,
                s.file_kib,
                s.shmem_kib
            );
            res[(v == Vmm::Qemu) as usize].push(s);
        }
        // Baseline: what spawning any process costs here.
        let t0 = Instant::now();
        let st = Command::new("true").status().expect("spawn true");
        assert!(st.success());
        true_ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    println!("load average after: {}", loadavg());
    println!();
    println!("| {} runs each | median | p25–p75 | min–max |", b.opts.runs);
    println!("|---|---|---|---|");
    type Metric = (&'static str, fn(&Sample) -> f64);
    let metrics: [Metric; 5] = [
        ("start → first guest byte (ms)", |s| s.start_ms),
        ("peak RSS excl. guest RAM (MiB)", |s| {
            s.excl_guest_kib() as f64 / 1024.0
        }),
        ("RssAnon (MiB)", |s| s.anon_kib as f64 / 1024.0),
        ("RssFile (MiB)", |s| s.file_kib as f64 / 1024.0),
        ("guest RAM resident (KiB)", |s| s.guest_kib as f64),
    ];
    let row = |name: &str, xs: &[f64]| {
        if xs.is_empty() {
            return;
        }
        println!(
            "| {name} | {:.2} | {:.2}–{:.2} | {:.2}–{:.2} |",
            quantile(xs, 0.5),
            quantile(xs, 0.25),
            quantile(xs, 0.75),
            quantile(xs, 0.0),
            quantile(xs, 1.0)
        );
    };
    row(
        "boxlite-vmm own setup, `run_vm()` → vCPU resumed (`setup_us` in its log, ms)",
        &setup_ms,
    );
    row("baseline: spawn → exit of `true` (ms)", &true_ms);
    for (name, f) in metrics {
        for v in [Vmm::Boxlite, Vmm::Qemu] {
            let xs: Vec<f64> = res[(v == Vmm::Qemu) as usize].iter().map(f).collect();
            row(&format!("{} {name}", v.name()), &xs);
        }
    }
}
