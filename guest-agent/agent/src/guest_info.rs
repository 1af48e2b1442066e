//! GuestInfo: facts about the running guest (kernel, boot, CPUs, memory,
//! virtio devices) and the agent's own start time. In host mode the values
//! are the host's.

use std::path::Path;
use std::time::Instant;

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
const CPU_ONLINE: &str = "/sys/devices/system/cpu/online";
const MEMINFO: &str = "/proc/meminfo";
const VIRTIO_DEVICES: &str = "/sys/bus/virtio/devices";

#[derive(Debug, thiserror::Error)]
pub enum GuestInfoError {
    #[error("uname failed")]
    Uname(#[source] std::io::Error),
    #[error("Failed to read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {what}")]
    Parse { path: String, what: &'static str },
}

/// When the agent started, taken once at startup.
#[derive(Debug, Clone, Copy)]
pub struct StartTime {
    pub instant: Instant,
    /// Monotonic clock in ms at that moment (≈ time since boot in the guest).
    pub monotonic_ms: u64,
}

impl StartTime {
    pub fn now() -> Self {
        StartTime {
            instant: Instant::now(),
            monotonic_ms: crate::logging::monotonic_ms(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    pub kernel_release: String,
    pub boot_id: String,
    pub online_cpus: u32,
    pub mem_total_kib: u64,
    /// sysfs name and virtio device id.
    pub virtio_devices: Vec<(String, u32)>,
    pub agent_uptime_ms: u64,
    pub agent_started_at_ms: u64,
}

pub fn collect(start: &StartTime) -> Result<GuestInfo, GuestInfoError> {
    let uname = nix::sys::utsname::uname().map_err(|e| GuestInfoError::Uname(e.into()))?;
    let cpus = match std::fs::read_to_string(CPU_ONLINE) {
        Ok(text) => count_cpu_list(&text),
        Err(_) => None,
    };
    let online_cpus = match cpus {
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .map_err(|_| GuestInfoError::Parse {
                path: CPU_ONLINE.into(),
                what: "CPU list",
            })?,
    };
    Ok(GuestInfo {
        kernel_release: uname.release().to_string_lossy().into_owned(),
        boot_id: read(BOOT_ID)?.trim().to_string(),
        online_cpus,
        mem_total_kib: parse_mem_total(&read(MEMINFO)?).ok_or(GuestInfoError::Parse {
            path: MEMINFO.into(),
            what: "MemTotal line",
        })?,
        virtio_devices: virtio_devices(Path::new(VIRTIO_DEVICES)),
        agent_uptime_ms: u64::try_from(start.instant.elapsed().as_millis()).unwrap_or(u64::MAX),
        agent_started_at_ms: start.monotonic_ms,
    })
}

fn read(path: &str) -> Result<String, GuestInfoError> {
    std::fs::read_to_string(path).map_err(|source| GuestInfoError::Read {
        path: path.to_string(),
        source,
    })
}

/// Counts the CPUs in a sysfs CPU list such as `0-3,5,7-8`.
pub fn count_cpu_list(text: &str) -> Option<u32> {
    let mut total: u32 = 0;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let n = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                b.checked_sub(a)?.checked_add(1)?
            }
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
        total = total.checked_add(n)?;
    }
    (total > 0).then_some(total)
}

/// `MemTotal:  1234 kB` from /proc/meminfo, in KiB.
pub fn parse_mem_total(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// Devices on the virtio bus with their device ids, sorted by name. A guest
/// without virtio (or a host without the bus) has none.
pub fn virtio_devices(dir: &Path) -> Vec<(String, u32)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u32)> = entries
        .flatten()
        .filter_map(|e| {
            let id = std::fs::read_to_string(e.path().join("device")).ok()?;
            let id = u32::from_str_radix(id.trim().trim_start_matches("0x"), 16).ok()?;
            Some((e.file_name().to_string_lossy().into_owned(), id))
        })
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cpu_lists() {
        assert_eq!(count_cpu_list("0\n"), Some(1));
        assert_eq!(count_cpu_list("0-3\n"), Some(4));
        assert_eq!(count_cpu_list("0-1,4,6-7"), Some(5));
        assert_eq!(count_cpu_list(""), None);
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn parses_mem_total() {
        assert_eq!(
            parse_mem_total("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn lists_virtio_devices_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        for (name, id) in [("virtio1", "0x0013\n"), ("virtio0", "0x001a\n")] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("device"), id).unwrap();
        }
        std::fs::create_dir(dir.path().join("broken")).unwrap();
        assert_eq!(
            virtio_devices(dir.path()),
            vec![("virtio0".to_string(), 26), ("virtio1".to_string(), 19)]
        );
        assert!(virtio_devices(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn collects_on_this_machine() {
        let info = collect(&StartTime::now()).unwrap();
        assert!(!info.kernel_release.is_empty());
        assert_eq!(info.boot_id.len(), 36);
        assert!(info.online_cpus >= 1);
        assert!(info.mem_total_kib > 0);
    }
}
