//! `cargo xtask <command>`: build the guest kernel, agent, initramfs and image.
//! Progress goes to stderr; each command's last stdout line(s) name its
//! artefact(s) as `vmlinux: PATH`, `agent: PATH`, `initramfs: PATH`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use xtask::kernel::{KernelArtefact, KernelBuild, DEFAULT_CACHE_ROOT};
use xtask::{agent, guest, testhost};

const USAGE: &str = "\
usage: cargo xtask <command> [options]

commands:
  kernel     [--fragment PATH]... [--cache-dir DIR] [--keep-work]
             build (or find in the cache) the guest kernel; later fragments
             override earlier ones (default: configs/guest-kernel.fragment,
             cache: /var/cache/boxlite/kernel/<key>/vmlinux)
  agent      build the static guest agent and check it is static
  initramfs  [--agent PATH] [--out PATH]
             build the guest initramfs with the agent as /init (default: build
             the agent; out: build/guest/initramfs.cpio.gz)
  guest      [--out-dir DIR] [--cache-dir DIR]
             kernel + agent + initramfs, copied to DIR (default: build/guest)
  testhost   [--out-dir DIR] [--cache-dir DIR] [--guest-initramfs PATH] [--with-qemu]
             the nested test host (docs/testing-nested.md): its kernel
             (Debian's linux-image-cloud-amd64, fetched with apt and cached
             in DIR/debian-kernel/), its initramfs (stage 1 loading KVM, then
             the nested driver, static boxlite-vmm, guest kernel and
             initramfs) and the nested node's stage 1, in DIR (default:
             build/testhost); --guest-initramfs uses that guest initramfs
             instead of building the agent; --with-qemu adds this machine's
             QEMU with its libraries and microvm firmware (for the
             benchmark, docs/benchmarks.md)
  node-image [--cache-dir DIR] [--kernel-cache-dir DIR]
             the nested test node's root disk: Debian 12 with containerd,
             runc, QEMU, the test host kernel's modules, … by mmdebstrap into
             an ext4 image (cached by the hash of its recipe in
             /var/cache/boxlite/images/node-<hash>/; scripts/nested-run.sh
             boots it)
";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The whole chain on one report, without anyhow's backtrace.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = Args(std::env::args().skip(1).collect());
    let Some(command) = args.next() else {
        eprint!("{USAGE}");
        bail!("no command given");
    };
    match command.as_str() {
        "kernel" => {
            let mut fragments = Vec::new();
            let mut cache_dir = None;
            let mut keep_work = false;
            while let Some(flag) = args.next() {
                match flag.as_str() {
                    "--fragment" => fragments.push(args.path(&flag)?),
                    "--cache-dir" => cache_dir = Some(args.path(&flag)?),
                    "--keep-work" => keep_work = true,
                    _ => return unknown(&command, &flag),
                }
            }
            if fragments.is_empty() {
                fragments.push(guest::default_fragment());
            }
            let kernel = build_kernel(fragments, cache_dir, keep_work)?;
            println!("vmlinux: {}", kernel.vmlinux.display());
        }
        "agent" => {
            if let Some(flag) = args.next() {
                return unknown(&command, &flag);
            }
            let agent = build_agent()?;
            println!("agent: {}", agent.display());
        }
        "initramfs" => {
            let mut agent = None;
            let mut out = None;
            while let Some(flag) = args.next() {
                match flag.as_str() {
                    "--agent" => agent = Some(args.path(&flag)?),
                    "--out" => out = Some(args.path(&flag)?),
                    _ => return unknown(&command, &flag),
                }
            }
            let agent = match agent {
                Some(path) => {
                    agent::check_static(&path)?;
                    path
                }
                None => build_agent()?,
            };
            let out = out.unwrap_or_else(|| guest::default_out_dir().join(guest::INITRAMFS_NAME));
            write_initramfs(&agent, &out)?;
            println!("initramfs: {}", out.display());
        }
        "guest" => {
            let mut out_dir = None;
            let mut cache_dir = None;
            while let Some(flag) = args.next() {
                match flag.as_str() {
                    "--out-dir" => out_dir = Some(args.path(&flag)?),
                    "--cache-dir" => cache_dir = Some(args.path(&flag)?),
                    _ => return unknown(&command, &flag),
                }
            }
            let out_dir = out_dir.unwrap_or_else(guest::default_out_dir);
            let kernel = build_kernel(vec![guest::default_fragment()], cache_dir, false)?;
            let agent = build_agent()?;
            let vmlinux = out_dir.join(guest::VMLINUX_NAME);
            let initramfs = out_dir.join(guest::INITRAMFS_NAME);
            write_initramfs(&agent, &initramfs)?;
            xtask::artefact::copy_atomic(&kernel.vmlinux, &vmlinux, 0o644)
                .with_context(|| format!("cannot copy the kernel to {}", out_dir.display()))?;
            println!("vmlinux: {}", vmlinux.display());
            println!("initramfs: {}", initramfs.display());
        }
        "testhost" => {
            let mut out_dir = None;
            let mut cache_dir = None;
            let mut guest_initramfs = None;
            let mut with_qemu = false;
            while let Some(flag) = args.next() {
                match flag.as_str() {
                    "--out-dir" => out_dir = Some(args.path(&flag)?),
                    "--cache-dir" => cache_dir = Some(args.path(&flag)?),
                    "--guest-initramfs" => guest_initramfs = Some(args.path(&flag)?),
                    "--with-qemu" => with_qemu = true,
                    _ => return unknown(&command, &flag),
                }
            }
            let out_dir = out_dir.unwrap_or_else(testhost::default_out_dir);
            let cache_dir = cache_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_ROOT));
            let th = testhost::build(&out_dir, &cache_dir, guest_initramfs.as_deref(), with_qemu)?;
            println!("testhost-kernel: {}", th.kernel.display());
            println!("testhost-initramfs: {}", th.initramfs.display());
            println!("testhost-node-initramfs: {}", th.node_initramfs.display());
            println!("testhost-vmm: {}", th.vmm.display());
            println!("testhost-virtiofsd: {}", th.virtiofsd.display());
        }
        "node-image" => {
            let mut cache_dir = None;
            let mut kernel_cache_dir = None;
            while let Some(flag) = args.next() {
                match flag.as_str() {
                    "--cache-dir" => cache_dir = Some(args.path(&flag)?),
                    "--kernel-cache-dir" => kernel_cache_dir = Some(args.path(&flag)?),
                    _ => return unknown(&command, &flag),
                }
            }
            let cache_dir =
                cache_dir.unwrap_or_else(|| PathBuf::from(xtask::node_image::DEFAULT_CACHE_ROOT));
            let kernel_cache_dir =
                kernel_cache_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_ROOT));
            let kernel = xtask::debian_kernel::fetch(&kernel_cache_dir)?;
            let image = xtask::node_image::build(&cache_dir, &kernel)?;
            println!("node-image: {}", image.path.display());
        }
        "help" | "-h" | "--help" => print!("{USAGE}"),
        other => {
            eprint!("{USAGE}");
            bail!("unknown command {other:?}");
        }
    }
    Ok(())
}

fn build_kernel(
    fragments: Vec<PathBuf>,
    cache_dir: Option<PathBuf>,
    keep_work: bool,
) -> Result<KernelArtefact> {
    let cache_dir = cache_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_ROOT));
    Ok(KernelBuild::new(fragments)
        .cache_root(cache_dir)
        .keep_work(keep_work)
        .build()?)
}

fn build_agent() -> Result<PathBuf> {
    Ok(agent::build(&guest::workspace_root())?)
}

fn write_initramfs(agent: &Path, out: &Path) -> Result<()> {
    guest::initramfs(agent).write_to(out)?;
    Ok(())
}

fn unknown(command: &str, flag: &str) -> Result<()> {
    eprint!("{USAGE}");
    bail!("unknown option {flag:?} for `{command}`")
}

/// The command line, consumed front to back.
struct Args(Vec<String>);

impl Args {
    fn next(&mut self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.remove(0))
    }

    fn path(&mut self, flag: &str) -> Result<PathBuf> {
        match self.next() {
            Some(v) if !v.starts_with("--") => Ok(PathBuf::from(v)),
            _ => bail!("{flag} needs a path"),
        }
    }
}
