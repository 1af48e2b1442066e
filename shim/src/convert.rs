//! Protobuf types stop here: containerd's task API requests become the
//! sandbox's request types, and its answers, events and metrics are built
//! from the sandbox's results.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use boxlite_protocol::agent::StatsContainerResponse;
use containerd_shim_protos::api::{
    CreateTaskRequest, DeleteResponse, ExecProcessRequest, PidsResponse, ProcessInfo,
    StateResponse, Status, UpdateTaskRequest, WaitResponse,
};
use containerd_shim_protos::cgroups_v2::metrics::{
    CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
};
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim_protos::shim::oci::ProcessDetails;

use crate::error::{Result, ShimError};
use crate::events::TaskEvent;
use crate::rootfs::MountSpec;
use crate::sandbox::{
    CreateRequest, Deleted, ExecRequest, ExitInfo, GuestProcess, ProcessStatus, TaskState,
};
use crate::stdio::StdioPaths;

/// Type URL containerd's `ctr task metrics` decodes for cgroup v2.
pub const METRICS_V2_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

pub fn create_request(req: CreateTaskRequest) -> Result<CreateRequest> {
    if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
        return Err(ShimError::Unimplemented(
            "restoring from a checkpoint is not supported: the container runs inside a micro-VM without CRIU".into(),
        ));
    }
    if req.bundle.is_empty() {
        return Err(ShimError::InvalidArgument(format!(
            "container {:?}: the bundle path is empty",
            req.id
        )));
    }
    Ok(CreateRequest {
        id: req.id,
        bundle: PathBuf::from(req.bundle),
        rootfs: req
            .rootfs
            .into_iter()
            .map(|m| MountSpec {
                kind: m.type_,
                source: m.source,
                options: m.options,
            })
            .collect(),
        stdio: StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        },
    })
}

pub fn exec_request(req: ExecProcessRequest) -> Result<ExecRequest> {
    let spec = req.spec.into_option().ok_or_else(|| {
        ShimError::InvalidArgument(format!("exec {:?}: no process spec", req.exec_id))
    })?;
    Ok(ExecRequest {
        container_id: req.id,
        exec_id: req.exec_id,
        stdio: StdioPaths {
            stdin: req.stdin,
            stdout: req.stdout,
            stderr: req.stderr,
            terminal: req.terminal,
        },
        // typeurl encodes the OCI Process (a Go struct) as JSON.
        process_json: spec.value,
    })
}

/// The LinuxResources JSON of an Update.
pub fn update_resources(req: &UpdateTaskRequest) -> Result<Vec<u8>> {
    req.resources
        .as_ref()
        .map(|any| any.value.clone())
        .ok_or_else(|| ShimError::InvalidArgument(format!("update of {:?}: no resources", req.id)))
}

pub fn status(state: TaskState) -> Status {
    match state {
        TaskState::Created => Status::CREATED,
        TaskState::Running => Status::RUNNING,
        TaskState::Paused => Status::PAUSED,
        TaskState::Exited(_) | TaskState::Deleted => Status::STOPPED,
    }
}

pub fn state_response(s: ProcessStatus) -> StateResponse {
    let exit = s.state.exit_info();
    StateResponse {
        id: s.container_id,
        exec_id: s.exec_id,
        bundle: s.bundle,
        pid: s.pid,
        status: status(s.state).into(),
        stdin: s.stdio.stdin,
        stdout: s.stdio.stdout,
        stderr: s.stdio.stderr,
        terminal: s.stdio.terminal,
        exit_status: exit.map_or(0, |e| e.status),
        exited_at: MessageField::from_option(exit.map(|e| timestamp(e.at))),
        ..Default::default()
    }
}

pub fn delete_response(d: Deleted) -> DeleteResponse {
    DeleteResponse {
        pid: d.pid,
        exit_status: d.exit.status,
        exited_at: MessageField::some(timestamp(d.exit.at)),
        ..Default::default()
    }
}

pub fn wait_response(e: ExitInfo) -> WaitResponse {
    WaitResponse {
        exit_status: e.status,
        exited_at: MessageField::some(timestamp(e.at)),
        ..Default::default()
    }
}

pub fn pids_response(processes: Vec<GuestProcess>) -> Result<PidsResponse> {
    let mut out = Vec::with_capacity(processes.len());
    for p in processes {
        let info = if p.exec_id.is_empty() {
            MessageField::none()
        } else {
            let details = ProcessDetails {
                exec_id: p.exec_id,
                ..Default::default()
            };
            MessageField::some(to_any(&details)?)
        };
        out.push(ProcessInfo {
            pid: p.pid,
            info,
            ..Default::default()
        });
    }
    Ok(PidsResponse {
        processes: out,
        ..Default::default()
    })
}

fn to_any(m: &dyn MessageDyn) -> Result<Any> {
    Ok(Any {
        type_url: m.descriptor_dyn().full_name().to_owned(),
        value: m.write_to_bytes_dyn().map_err(|e| {
            ShimError::failed(
                format!("cannot encode {}", m.descriptor_dyn().full_name()),
                e,
            )
        })?,
        ..Default::default()
    })
}

/// The agent's cgroup v2 figures as containerd's `io.containerd.cgroups.v2.Metrics`.
pub fn metrics(s: &StatsContainerResponse) -> Metrics {
    let mut m = Metrics::new();
    if let Some(cpu) = s.cpu.as_ref() {
        m.cpu = MessageField::some(CPUStat {
            usage_usec: cpu.usage_usec,
            user_usec: cpu.user_usec,
            system_usec: cpu.system_usec,
            nr_periods: cpu.nr_periods,
            nr_throttled: cpu.nr_throttled,
            throttled_usec: cpu.throttled_usec,
            ..Default::default()
        });
    }
    if let Some(mem) = s.memory.as_ref() {
        let stat = |k: &str| mem.stat.get(k).copied().unwrap_or(0);
        m.memory = MessageField::some(MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            anon_thp: stat("anon_thp"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            slab_reclaimable: stat("slab_reclaimable"),
            slab_unreclaimable: stat("slab_unreclaimable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            workingset_refault: stat("workingset_refault"),
            workingset_activate: stat("workingset_activate"),
            workingset_nodereclaim: stat("workingset_nodereclaim"),
            pgrefill: stat("pgrefill"),
            pgscan: stat("pgscan"),
            pgsteal: stat("pgsteal"),
            pgactivate: stat("pgactivate"),
            pgdeactivate: stat("pgdeactivate"),
            pglazyfree: stat("pglazyfree"),
            pglazyfreed: stat("pglazyfreed"),
            thp_fault_alloc: stat("thp_fault_alloc"),
            thp_collapse_alloc: stat("thp_collapse_alloc"),
            usage: mem.usage,
            usage_limit: mem.usage_limit,
            swap_usage: mem.swap_usage,
            swap_limit: mem.swap_limit,
            ..Default::default()
        });
        m.memory_events = MessageField::some(MemoryEvents {
            low: mem.low_events,
            high: mem.high_events,
            max: mem.max_events,
            oom: mem.oom_events,
            oom_kill: mem.oom_kill_events,
            ..Default::default()
        });
    }
    if let Some(p) = s.pids.as_ref() {
        m.pids = MessageField::some(PidsStat {
            current: p.current,
            limit: p.limit,
            ..Default::default()
        });
    }
    if !s.io.is_empty() {
        m.io = MessageField::some(IOStat {
            usage: s
                .io
                .iter()
                .map(|e| IOEntry {
                    major: e.major,
                    minor: e.minor,
                    rbytes: e.rbytes,
                    wbytes: e.wbytes,
                    rios: e.rios,
                    wios: e.wios,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
    }
    m
}

pub fn stats_any(s: &StatsContainerResponse) -> Result<Any> {
    let m = metrics(s);
    Ok(Any {
        type_url: METRICS_V2_TYPE_URL.to_owned(),
        value: m
            .write_to_bytes()
            .map_err(|e| ShimError::failed("cannot encode metrics", e))?,
        ..Default::default()
    })
}

/// The protobuf event containerd expects for `event`.
pub fn event(event: TaskEvent) -> Box<dyn MessageDyn> {
    match event {
        TaskEvent::Create {
            container_id,
            bundle,
            stdin,
            stdout,
            stderr,
            terminal,
            pid,
        } => Box::new(TaskCreate {
            container_id,
            bundle,
            io: MessageField::some(TaskIO {
                stdin,
                stdout,
                stderr,
                terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        }),
        TaskEvent::Start { container_id, pid } => Box::new(TaskStart {
            container_id,
            pid,
            ..Default::default()
        }),
        TaskEvent::Exit {
            container_id,
            id,
            pid,
            exit_status,
            exited_at,
        } => Box::new(TaskExit {
            container_id,
            id,
            pid,
            exit_status,
            exited_at: MessageField::some(timestamp(exited_at)),
            ..Default::default()
        }),
        TaskEvent::Oom { container_id } => Box::new(TaskOOM {
            container_id,
            ..Default::default()
        }),
        TaskEvent::ExecAdded {
            container_id,
            exec_id,
        } => Box::new(TaskExecAdded {
            container_id,
            exec_id,
            ..Default::default()
        }),
        TaskEvent::ExecStarted {
            container_id,
            exec_id,
            pid,
        } => Box::new(TaskExecStarted {
            container_id,
            exec_id,
            pid,
            ..Default::default()
        }),
        TaskEvent::Paused { container_id } => Box::new(TaskPaused {
            container_id,
            ..Default::default()
        }),
        TaskEvent::Resumed { container_id } => Box::new(TaskResumed {
            container_id,
            ..Default::default()
        }),
        TaskEvent::Delete {
            container_id,
            pid,
            exit_status,
            exited_at,
        } => Box::new(TaskDelete {
            id: container_id.clone(),
            container_id,
            pid,
            exit_status,
            exited_at: MessageField::some(timestamp(exited_at)),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::agent::{CpuStats, IoEntry, MemoryStats, PidsStats};
    use std::time::Duration;

    #[test]
    fn metrics_map_every_cgroup_v2_figure() {
        let mut mem = MemoryStats {
            usage: 10,
            usage_limit: 20,
            swap_usage: 1,
            swap_limit: 2,
            oom_kill_events: 3,
            ..Default::default()
        };
        mem.stat.insert("anon".into(), 7);
        mem.stat.insert("file".into(), 8);
        let s = StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: 100,
                user_usec: 60,
                system_usec: 40,
                nr_throttled: 2,
                ..Default::default()
            })
            .into(),
            memory: Some(mem).into(),
            pids: Some(PidsStats {
                current: 3,
                limit: 100,
                ..Default::default()
            })
            .into(),
            io: vec![IoEntry {
                major: 254,
                minor: 0,
                rbytes: 4096,
                ..Default::default()
            }],
            ..Default::default()
        };
        let any = stats_any(&s).unwrap();
        assert_eq!(any.type_url, "io.containerd.cgroups.v2.Metrics");
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!(m.cpu.usage_usec, 100);
        assert_eq!(m.cpu.nr_throttled, 2);
        assert_eq!(m.memory.usage, 10);
        assert_eq!(m.memory.usage_limit, 20);
        assert_eq!(m.memory.anon, 7);
        assert_eq!(m.memory.file, 8);
        assert_eq!(m.memory_events.oom_kill, 3);
        assert_eq!(m.pids.current, 3);
        assert_eq!(m.io.usage[0].rbytes, 4096);
    }

    #[test]
    fn state_of_an_exited_process() {
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let r = state_response(ProcessStatus {
            container_id: "c".into(),
            exec_id: "e".into(),
            bundle: "/b".into(),
            pid: 7,
            state: TaskState::Exited(ExitInfo { status: 3, at }),
            stdio: StdioPaths::default(),
        });
        assert_eq!(r.status.enum_value().unwrap(), Status::STOPPED);
        assert_eq!(r.exit_status, 3);
        assert_eq!(r.exited_at.seconds, 1_700_000_000);
        assert_eq!(r.exited_at.nanos, 5);
    }

    #[test]
    fn checkpoint_restore_is_refused() {
        let req = CreateTaskRequest {
            id: "c".into(),
            bundle: "/b".into(),
            checkpoint: "/cp".into(),
            ..Default::default()
        };
        assert!(matches!(
            create_request(req),
            Err(ShimError::Unimplemented(_))
        ));
    }

    #[test]
    fn exec_ids_travel_as_process_details() {
        let r = pids_response(vec![
            GuestProcess {
                pid: 1,
                exec_id: String::new(),
            },
            GuestProcess {
                pid: 9,
                exec_id: "e1".into(),
            },
        ])
        .unwrap();
        assert!(r.processes[0].info.is_none());
        assert_eq!(
            r.processes[1].info.type_url,
            "containerd.runc.v1.ProcessDetails"
        );
    }

    #[test]
    fn delete_event_names_the_container() {
        let e = event(TaskEvent::Delete {
            container_id: "c".into(),
            pid: 4,
            exit_status: 0,
            exited_at: UNIX_EPOCH,
        });
        assert_eq!(
            e.descriptor_dyn().full_name(),
            "containerd.events.TaskDelete"
        );
    }
}
