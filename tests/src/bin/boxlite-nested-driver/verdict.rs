//! What a scenario returns: a verdict, or a failure with the VM whose logs
//! explain it; and the one-line form every verdict is printed in.

use crate::vm::VmFiles;

/// The outcome of one scenario.
pub enum Verdict {
    Pass(String),
    Fail(String),
    Skip(String),
}

/// A scenario failure: a one-line reason and the VM whose logs explain it.
pub struct Failure {
    pub reason: String,
    pub vm: Option<VmFiles>,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            reason: e.to_string(),
            vm: None,
        }
    }
}

pub type ScenarioResult = Result<Verdict, Failure>;

/// `s` with every run of whitespace made one space: verdicts are one line.
pub fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
