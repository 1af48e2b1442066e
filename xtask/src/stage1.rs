//! Stage 1 of the nested test host and node: a few lines of busybox shell
//! as `/init` (`stage1/init.sh`) that load the Debian kernel modules a boot
//! needs ([`crate::debian_kernel`]) and then hand over — to the nested
//! driver as PID 1, or to the node's Debian root disk by `switch_root`.

use std::path::Path;

use crate::debian_kernel::Module;
use crate::initramfs::Initramfs;

/// The script, `/init` of every stage-1 initramfs.
pub const INIT_SCRIPT: &str = include_str!("stage1/init.sh");
/// Where the host's static busybox goes (the script's interpreter).
pub const BUSYBOX_PATH: &str = "/bin/busybox";
/// Where the modules go in the archive, each by its module name.
const MODULES_DIR: &str = "/lib/modules/stage1";

/// What stage 1 does once the modules are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover<'a> {
    /// `exec` this program as PID 1.
    Exec(&'a str),
    /// Mount the command line's `root=` and `switch_root` to its `init=`.
    SwitchRoot,
}

/// The `/etc/stage1/modules` list: `name path` lines in load order.
pub fn modules_list(modules: &[Module]) -> String {
    modules
        .iter()
        .map(|m| format!("{} {MODULES_DIR}/{}.ko\n", m.name, m.name))
        .collect()
}

/// Adds stage 1 to `initramfs`: `/init`, busybox, the modules (in load
/// order, dependencies first) and what to hand over to.
pub fn add(
    initramfs: Initramfs,
    busybox: &Path,
    modules: &[Module],
    handover: Handover<'_>,
) -> Initramfs {
    let next = match handover {
        Handover::Exec(path) => path.to_owned(),
        Handover::SwitchRoot => "switch-root".to_owned(),
    };
    let mut initramfs = initramfs
        .file_bytes("/init", INIT_SCRIPT, 0o755)
        .file(BUSYBOX_PATH, busybox, 0o755)
        .file_bytes("/etc/stage1/modules", modules_list(modules), 0o644)
        .file_bytes("/etc/stage1/next", format!("{next}\n"), 0o644)
        .dir("/dev", 0o755)
        .char_device("/dev/console", 0o600, 5, 1)
        .dir("/proc", 0o555)
        .dir("/sys", 0o555);
    for m in modules {
        initramfs = initramfs.file(&format!("{MODULES_DIR}/{}.ko", m.name), &m.path, 0o644);
    }
    initramfs
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn the_list_keeps_the_load_order_and_names_the_archive_paths() {
        let m = |name: &str| Module {
            name: name.into(),
            path: PathBuf::from(format!("/x/{name}.ko")),
        };
        assert_eq!(
            modules_list(&[m("irqbypass"), m("kvm"), m("kvm_amd")]),
            "irqbypass /lib/modules/stage1/irqbypass.ko\n\
             kvm /lib/modules/stage1/kvm.ko\n\
             kvm_amd /lib/modules/stage1/kvm_amd.ko\n"
        );
    }

    #[test]
    fn the_script_reads_what_add_writes() {
        for file in ["/etc/stage1/modules", "/etc/stage1/next", "switch-root"] {
            assert!(INIT_SCRIPT.contains(file), "{file}");
        }
        assert!(INIT_SCRIPT.starts_with(&format!("#!{BUSYBOX_PATH} sh\n")));
    }
}
