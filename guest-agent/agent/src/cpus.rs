//! The guest's vCPUs: the VM boots with more present than online (the host
//! passes `maxcpus=`), and OnlineCpus brings more online when the pod's
//! CPU grows (`echo 1 > /sys/devices/system/cpu/cpuN/online`).

use std::path::{Path, PathBuf};

/// Where the kernel lists and switches CPUs.
pub const SYS_CPU: &str = "/sys/devices/system/cpu";

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("{asked} vCPUs asked, but this VM has {present} (the host sized it at boot)")]
    TooMany { asked: u32, present: u32 },
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{} is not a CPU list: {text:?}", path.display())]
    Parse { path: PathBuf, text: String },
    #[error("cannot bring cpu{cpu} online")]
    Online {
        cpu: u32,
        #[source]
        error: std::io::Error,
    },
}

/// (online, present) after bringing CPUs online, lowest numbers first,
/// until `count` are online. Never takes a CPU offline.
pub fn online_cpus(sys: &Path, count: u32) -> Result<(u32, u32), CpuError> {
    let present = read_list(&sys.join("present"))?;
    let present_n = u32::try_from(present.len()).unwrap_or(u32::MAX);
    if count > present_n {
        return Err(CpuError::TooMany {
            asked: count,
            present: present_n,
        });
    }
    let mut online = read_list(&sys.join("online"))?;
    for cpu in present {
        if online.len() >= count as usize {
            break;
        }
        if online.contains(&cpu) {
            continue;
        }
        std::fs::write(sys.join(format!("cpu{cpu}/online")), "1")
            .map_err(|error| CpuError::Online { cpu, error })?;
        online.push(cpu);
    }
    let online_n = u32::try_from(read_list(&sys.join("online"))?.len()).unwrap_or(u32::MAX);
    Ok((online_n, present_n))
}

/// A kernel CPU list (`0-3,6,8-9`).
fn read_list(path: &Path) -> Result<Vec<u32>, CpuError> {
    let text = std::fs::read_to_string(path).map_err(|error| CpuError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_list(text.trim()).ok_or_else(|| CpuError::Parse {
        path: path.to_owned(),
        text: text.trim().to_owned(),
    })
}

fn parse_list(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    if text.is_empty() {
        return Some(out);
    }
    for part in text.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake sysfs: `present`, `online`, and `cpuN/online` files the test
    /// keeps in step with `online` (the kernel does that itself).
    fn fake(present: &str, online: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("present"), format!("{present}\n")).unwrap();
        std::fs::write(d.path().join("online"), format!("{online}\n")).unwrap();
        for cpu in parse_list(present).unwrap() {
            std::fs::create_dir(d.path().join(format!("cpu{cpu}"))).unwrap();
            std::fs::write(d.path().join(format!("cpu{cpu}/online")), "0").unwrap();
        }
        d
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_list("0-3,6,8-9"), Some(vec![0, 1, 2, 3, 6, 8, 9]));
        assert_eq!(parse_list("0"), Some(vec![0]));
        assert_eq!(parse_list(""), Some(vec![]));
        assert_eq!(parse_list("3-1"), None);
        assert_eq!(parse_list("x"), None);
        assert_eq!(parse_list("0-4294967295"), None);
    }

    #[test]
    fn offline_cpus_are_brought_online_lowest_first_up_to_the_count() {
        let d = fake("0-3", "0");
        // The fake kernel does not update `online`: the count read back is
        // still 1, and exactly cpu1 and cpu2 were switched on.
        online_cpus(d.path(), 3).unwrap();
        let on = |c: u32| std::fs::read_to_string(d.path().join(format!("cpu{c}/online"))).unwrap();
        assert_eq!((on(1), on(2), on(3)), ("1".into(), "1".into(), "0".into()));
    }

    #[test]
    fn enough_online_changes_nothing_and_more_than_present_is_refused() {
        let d = fake("0-1", "0-1");
        assert_eq!(online_cpus(d.path(), 1).unwrap(), (2, 2));
        assert_eq!(
            std::fs::read_to_string(d.path().join("cpu1/online")).unwrap(),
            "0",
            "cpu1 was written"
        );
        let err = online_cpus(d.path(), 3).unwrap_err();
        assert_eq!(
            err.to_string(),
            "3 vCPUs asked, but this VM has 2 (the host sized it at boot)"
        );
    }
}
