//! A container's cgroup through `libcgroups` (v2 in the guest; v1 too, so
//! host-mode tests run on v1 or hybrid hosts): freeze, pids, resources,
//! stats, removal; the counters the OOM watcher ([`super::oom`]) reads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use libcgroups::common::{
    create_cgroup_manager, AnyCgroupManager, CgroupConfig, CgroupManager, ControllerOpt,
    FreezerState,
};
use oci_spec::runtime::LinuxResources;

use super::error::ContainerError;

/// Where cgroupfs is mounted (guest and host).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The figures StatsContainer returns, named after the cgroup v2 files.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub cpu_nr_periods: u64,
    pub cpu_nr_throttled: u64,
    pub cpu_throttled_usec: u64,
    pub memory_usage: u64,
    pub memory_limit: u64,
    pub swap_usage: u64,
    pub swap_limit: u64,
    pub memory_stat: HashMap<String, u64>,
    pub memory_events: HashMap<String, u64>,
    pub pids_current: u64,
    pub pids_limit: u64,
    /// (major, minor, rbytes, wbytes, rios, wios)
    pub io: Vec<(u64, u64, u64, u64, u64, u64)>,
}

pub struct Cgroup {
    manager: AnyCgroupManager,
    path: PathBuf,
}

fn err(what: &'static str) -> impl Fn(String) -> ContainerError {
    move |message| ContainerError::Cgroup { what, message }
}

pub fn is_v2() -> bool {
    Path::new(CGROUP_ROOT).join("cgroup.controllers").exists()
}

impl Cgroup {
    pub fn open(id: &str, path: &Path) -> Result<Self, ContainerError> {
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: path.to_path_buf(),
            systemd_cgroup: false,
            container_name: id.to_string(),
        })
        .map_err(|e| err("open")(boxlite_protocol::error_chain::chain(&e)))?;
        Ok(Cgroup {
            manager,
            path: path.to_path_buf(),
        })
    }

    pub fn pids(&self) -> Result<Vec<i32>, ContainerError> {
        self.manager
            .get_all_pids()
            .map(|v| v.into_iter().map(|p| p.as_raw()).collect())
            .map_err(|e| err("pids")(boxlite_protocol::error_chain::chain(&e)))
    }

    pub fn freeze(&self, frozen: bool) -> Result<(), ContainerError> {
        let state = if frozen {
            FreezerState::Frozen
        } else {
            FreezerState::Thawed
        };
        self.manager.freeze(state).map_err(|e| {
            err(if frozen { "freeze" } else { "thaw" })(boxlite_protocol::error_chain::chain(&e))
        })
    }

    pub fn update(&self, resources: &LinuxResources) -> Result<(), ContainerError> {
        self.manager
            .apply(&ControllerOpt {
                resources,
                disable_oom_killer: false,
                oom_score_adj: None,
                freezer_state: None,
            })
            .map_err(|e| err("update")(boxlite_protocol::error_chain::chain(&e)))
    }

    pub fn remove(&self) {
        if let Err(e) = self.manager.remove() {
            tracing::warn!(path = %self.path.display(), error = %boxlite_protocol::error_chain::chain(&e), "cgroup removal");
        }
    }

    pub fn stats(&self) -> Result<Stats, ContainerError> {
        let s = self
            .manager
            .stats()
            .map_err(|e| err("stats")(boxlite_protocol::error_chain::chain(&e)))?;
        // v2 reports microseconds; v1's cpuacct reports nanoseconds.
        let cpu_div = if is_v2() { 1 } else { 1000 };
        let mut io: HashMap<(u64, u64), (u64, u64, u64, u64)> = HashMap::new();
        for (list, is_bytes) in [(&s.blkio.service_bytes, true), (&s.blkio.serviced, false)] {
            for d in list {
                let e = io.entry((d.major, d.minor)).or_default();
                match (
                    d.op_type.as_deref().map(str::to_ascii_lowercase).as_deref(),
                    is_bytes,
                ) {
                    (Some("read"), true) => e.0 = d.value,
                    (Some("write"), true) => e.1 = d.value,
                    (Some("read"), false) => e.2 = d.value,
                    (Some("write"), false) => e.3 = d.value,
                    _ => {}
                }
            }
        }
        let mut io: Vec<_> = io
            .into_iter()
            .map(|((ma, mi), (rb, wb, ri, wi))| (ma, mi, rb, wb, ri, wi))
            .collect();
        io.sort_unstable();
        Ok(Stats {
            cpu_usage_usec: s.cpu.usage.usage_total / cpu_div,
            cpu_user_usec: s.cpu.usage.usage_user / cpu_div,
            cpu_system_usec: s.cpu.usage.usage_kernel / cpu_div,
            cpu_nr_periods: s.cpu.throttling.periods,
            cpu_nr_throttled: s.cpu.throttling.throttled_periods,
            cpu_throttled_usec: s.cpu.throttling.throttled_time / cpu_div,
            memory_usage: s.memory.memory.usage,
            memory_limit: s.memory.memory.limit,
            swap_usage: s.memory.memswap.usage,
            swap_limit: s.memory.memswap.limit,
            memory_stat: s.memory.stats.clone(),
            memory_events: read_memory_events(&self.path),
            pids_current: s.pids.current,
            pids_limit: s.pids.limit,
            io,
        })
    }
}

/// The file that counts a cgroup's memory events: memory.events on v2; on
/// v1 memory.oom_control, which has only `oom_kill` of them.
pub fn memory_events_file(cgroup_path: &Path) -> PathBuf {
    let rel = cgroup_path.strip_prefix("/").unwrap_or(cgroup_path);
    if is_v2() {
        Path::new(CGROUP_ROOT).join(rel).join("memory.events")
    } else {
        Path::new(CGROUP_ROOT)
            .join("memory")
            .join(rel)
            .join("memory.oom_control")
    }
}

/// [`memory_events_file`] as key → count (empty if it cannot be read).
pub fn read_memory_events(cgroup_path: &Path) -> HashMap<String, u64> {
    let file = memory_events_file(cgroup_path);
    parse_flat_keyed(&std::fs::read_to_string(file).unwrap_or_default())
}

/// Parses cgroup "key value" lines; lines that do not parse are skipped.
pub fn parse_flat_keyed(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_memory_events() {
        let m = parse_flat_keyed("low 0\nhigh 2\nmax 3\noom 1\noom_kill 1\nbad\nx y\n");
        assert_eq!(m.get("oom_kill"), Some(&1));
        assert_eq!(m.get("high"), Some(&2));
        assert_eq!(m.len(), 5);
    }
}
