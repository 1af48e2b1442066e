//! The shape of a running `boxlite-vmm`: with the jail on, the process the
//! runtime spawns forks once and stays behind only to wait; the VM runs in
//! its child, pid 1 of a pid namespace of its own. The child dies with the
//! parent (SIGKILL), but not in the same instant, so whoever kills the
//! parent and needs the VM gone (its taps, its cgroup) waits for the child
//! too: [`vm_pids`] names it.

use std::path::Path;

/// The pids (in the caller's pid namespace) of the direct children of
/// `parent`: for a jailed `boxlite-vmm`, the VM process. Read from
/// `/proc/<pid>/stat` (field 4 is the parent pid); empty once none is left.
pub fn vm_pids(parent: u32) -> Vec<u32> {
    vm_pids_in(Path::new("/proc"), parent)
}

fn vm_pids_in(proc_root: &Path, parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir(proc_root) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(proc_root.join(pid.to_string()).join("stat"))
                .ok()
                .and_then(|stat| parent_of(&stat))
                == Some(parent)
        })
        .collect()
}

/// Field 4 of a `/proc/<pid>/stat` line; the command name (field 2) is in
/// parentheses and may itself contain spaces and parentheses, so parsing
/// starts after the last `)`.
fn parent_of(stat: &[u8]) -> Option<u32> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    rest.split_ascii_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parent_field_survives_odd_command_names() {
        assert_eq!(parent_of(b"42 (boxlite-vmm) S 7 42 42 0 -1"), Some(7));
        assert_eq!(parent_of(b"42 (a) b (c) S 9 1"), Some(9));
        assert_eq!(parent_of(b"42 (x"), None);
        assert_eq!(parent_of(b""), None);
    }

    #[test]
    fn finds_a_child_of_this_process() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let found = vm_pids(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?}");
    }
}
