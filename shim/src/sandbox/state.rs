//! The life cycle of one process (a container's init or an exec), with
//! checked transitions: an illegal one is a `FailedPrecondition` that names
//! the process, the operation and the state it is in.

use std::fmt;
use std::time::SystemTime;

use crate::error::ShimError;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal.
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Created (container) or registered (exec), not started.
    Created,
    Running,
    Paused,
    Exited(ExitInfo),
    /// Delete has begun; nothing else is allowed.
    Deleted,
}

impl TaskState {
    pub fn name(&self) -> &'static str {
        match self {
            TaskState::Created => "created",
            TaskState::Running => "running",
            TaskState::Paused => "paused",
            TaskState::Exited(_) => "stopped",
            TaskState::Deleted => "deleted",
        }
    }

    fn illegal(&self, what: &str, op: &str) -> ShimError {
        ShimError::FailedPrecondition(format!("cannot {op} {what}: it is {}", self.name()))
    }

    /// Created → Running.
    pub fn start(&mut self, what: &str) -> Result<(), ShimError> {
        match self {
            TaskState::Created => {
                *self = TaskState::Running;
                Ok(())
            }
            other => Err(other.illegal(what, "start")),
        }
    }

    /// Running → Paused.
    pub fn pause(&mut self, what: &str) -> Result<(), ShimError> {
        match self {
            TaskState::Running => {
                *self = TaskState::Paused;
                Ok(())
            }
            other => Err(other.illegal(what, "pause")),
        }
    }

    /// Paused → Running.
    pub fn resume(&mut self, what: &str) -> Result<(), ShimError> {
        match self {
            TaskState::Paused => {
                *self = TaskState::Running;
                Ok(())
            }
            other => Err(other.illegal(what, "resume")),
        }
    }

    /// Any live state → Exited. An exit that arrives twice keeps the first.
    pub fn exit(&mut self, info: ExitInfo) {
        if matches!(
            self,
            TaskState::Created | TaskState::Running | TaskState::Paused
        ) {
            *self = TaskState::Exited(info);
        }
    }

    /// Signals go to processes that exist in the guest.
    pub fn check_kill(&self, what: &str) -> Result<(), ShimError> {
        match self {
            TaskState::Created | TaskState::Running | TaskState::Paused => Ok(()),
            TaskState::Exited(_) => Err(ShimError::NotFound(format!(
                "{what} has already exited: process"
            ))),
            other => Err(other.illegal(what, "signal")),
        }
    }

    /// Exec and the container RPCs that need a running init.
    pub fn check_running(&self, what: &str, op: &str) -> Result<(), ShimError> {
        match self {
            TaskState::Running => Ok(()),
            other => Err(other.illegal(what, op)),
        }
    }

    /// Created or Exited → Deleted; a live process must be killed first.
    pub fn delete(&mut self, what: &str) -> Result<(), ShimError> {
        match self {
            TaskState::Created | TaskState::Exited(_) => {
                *self = TaskState::Deleted;
                Ok(())
            }
            other => Err(other.illegal(what, "delete")),
        }
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        match self {
            TaskState::Exited(info) => Some(*info),
            _ => None,
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited() -> TaskState {
        TaskState::Exited(ExitInfo {
            status: 0,
            at: SystemTime::UNIX_EPOCH,
        })
    }

    fn is_precondition(r: Result<(), ShimError>, want: &str) {
        match r {
            Err(ShimError::FailedPrecondition(m)) => assert_eq!(m, want),
            other => panic!("expected FailedPrecondition({want}), got {other:?}"),
        }
    }

    #[test]
    fn the_normal_life() {
        let mut s = TaskState::Created;
        s.start("c").unwrap();
        s.pause("c").unwrap();
        s.resume("c").unwrap();
        s.check_kill("c").unwrap();
        s.exit(ExitInfo {
            status: 137,
            at: SystemTime::UNIX_EPOCH,
        });
        assert_eq!(s.exit_info().unwrap().status, 137);
        s.delete("c").unwrap();
        assert_eq!(s, TaskState::Deleted);
    }

    #[test]
    fn illegal_transitions_are_failed_preconditions() {
        is_precondition(
            TaskState::Running.start("container \"c\""),
            "cannot start container \"c\": it is running",
        );
        is_precondition(exited().start("c"), "cannot start c: it is stopped");
        is_precondition(
            TaskState::Created.pause("c"),
            "cannot pause c: it is created",
        );
        is_precondition(TaskState::Paused.pause("c"), "cannot pause c: it is paused");
        is_precondition(
            TaskState::Running.resume("c"),
            "cannot resume c: it is running",
        );
        is_precondition(
            TaskState::Running.delete("c"),
            "cannot delete c: it is running",
        );
        is_precondition(
            TaskState::Paused.delete("c"),
            "cannot delete c: it is paused",
        );
        is_precondition(
            TaskState::Deleted.delete("c"),
            "cannot delete c: it is deleted",
        );
        is_precondition(
            TaskState::Created.check_running("c", "exec in"),
            "cannot exec in c: it is created",
        );
        is_precondition(
            TaskState::Deleted.check_kill("c"),
            "cannot signal c: it is deleted",
        );
    }

    #[test]
    fn killing_an_exited_process_is_not_found() {
        assert!(matches!(
            exited().check_kill("c"),
            Err(ShimError::NotFound(_))
        ));
    }

    #[test]
    fn first_exit_wins() {
        let mut s = TaskState::Running;
        s.exit(ExitInfo {
            status: 1,
            at: SystemTime::UNIX_EPOCH,
        });
        s.exit(ExitInfo {
            status: 2,
            at: SystemTime::UNIX_EPOCH,
        });
        assert_eq!(s.exit_info().unwrap().status, 1);
        // A created process that never started can still be reported exited
        // (killed before start).
        let mut c = TaskState::Created;
        c.exit(ExitInfo {
            status: 137,
            at: SystemTime::UNIX_EPOCH,
        });
        assert_eq!(c.name(), "stopped");
    }
}
