//! The cgroup hierarchies mounted on this host, read from
//! `/proc/self/mountinfo` as bytes (mount points may hold any byte).
//!
//! cgroup v2 ("unified") is one hierarchy; cgroup v1 has one per group of
//! controllers (`cpu,cpuacct`, `memory`, `name=systemd`, …); a hybrid host
//! has both. A sandbox's cgroup is made in each, as runc does, so that every
//! controller the node uses accounts for the VM.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// One mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Where it is mounted (`/sys/fs/cgroup`, `/sys/fs/cgroup/memory`, …).
    pub mount: PathBuf,
    /// cgroup v1's `cpuset` needs `cpuset.cpus`/`cpuset.mems` copied into a
    /// new child before a process may join it.
    pub v1_cpuset: bool,
    pub v2: bool,
}

/// Every cgroup hierarchy `mountinfo` lists, each once (a hierarchy
/// mounted twice is the same tree), in the order they appear.
pub fn parse_mountinfo(mountinfo: &[u8]) -> Vec<Hierarchy> {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut out = Vec::new();
    for line in mountinfo.split(|b| *b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        // `<id> <parent> <maj:min> <root> <mount point> <options> [optional…] - <fstype> <source> <super options>`
        let Some(dash) = fields.iter().position(|f| *f == b"-") else {
            continue;
        };
        let (Some(mount), Some(fstype), Some(super_opts)) =
            (fields.get(4), fields.get(dash + 1), fields.get(dash + 3))
        else {
            continue;
        };
        let v2 = match *fstype {
            b"cgroup2" => true,
            b"cgroup" => false,
            _ => continue,
        };
        // What identifies a v1 hierarchy is its controller set.
        let key: Vec<u8> = if v2 {
            b"cgroup2".to_vec()
        } else {
            controllers(super_opts).join(&b","[..])
        };
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        out.push(Hierarchy {
            mount: PathBuf::from(OsStr::from_bytes(&unescape(mount))),
            v1_cpuset: !v2 && controllers(super_opts).iter().any(|c| c == b"cpuset"),
            v2,
        });
    }
    out
}

/// The controllers (and `name=…`) among a v1 mount's super options.
fn controllers(super_opts: &[u8]) -> Vec<Vec<u8>> {
    let mut c: Vec<Vec<u8>> = super_opts
        .split(|b| *b == b',')
        .filter(|o| !matches!(*o, b"rw" | b"ro") && !o.starts_with(b"release_agent="))
        .map(<[u8]>::to_vec)
        .collect();
    c.sort();
    c
}

/// mountinfo writes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                let v = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(v).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &[u8] = b"\
25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd
35 30 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid - cgroup cgroup rw,cpu,cpuacct
36 30 0:32 / /sys/fs/cgroup/cpuset rw,nosuid - cgroup cgroup rw,cpuset
37 30 0:33 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory
99 30 0:33 / /mnt/mem\\040copy rw - cgroup cgroup rw,memory
100 30 0:40 / /mnt/odd\\040dir rw - cgroup cgroup rw,pids
";

    #[test]
    fn every_hierarchy_once_with_its_mount_point() {
        let h = parse_mountinfo(HYBRID);
        let mounts: Vec<_> = h.iter().map(|h| h.mount.display().to_string()).collect();
        assert_eq!(
            mounts,
            [
                "/sys/fs/cgroup/unified",
                "/sys/fs/cgroup/systemd",
                "/sys/fs/cgroup/cpu,cpuacct",
                "/sys/fs/cgroup/cpuset",
                "/sys/fs/cgroup/memory",
                "/mnt/odd dir",
            ]
        );
        assert!(h[0].v2 && !h[1].v2);
        let cpusets: Vec<_> = h.iter().map(|h| h.v1_cpuset).collect();
        assert_eq!(cpusets, [false, false, false, true, false, false]);
    }

    #[test]
    fn a_unified_host_has_one_hierarchy() {
        let h =
            parse_mountinfo(b"28 22 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n");
        assert_eq!(
            h,
            [Hierarchy {
                mount: "/sys/fs/cgroup".into(),
                v1_cpuset: false,
                v2: true
            }]
        );
    }

    #[test]
    fn garbage_lines_are_skipped() {
        assert!(parse_mountinfo(b"\xff\xfe - cgroup\n\n1 2 3\n- - -\n").is_empty());
    }
}
