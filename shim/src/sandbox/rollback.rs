//! Undoing a half-done Create or boot: the steps taken so far, undone in
//! reverse order when a later step fails.
//!
//! An explicit [`Rollback`] rather than a guard that undoes on drop: the
//! undo steps are async (RemoveContainer, killing the VM, tearing the pod
//! network down), and `Drop` cannot await them. So every fallible step
//! after the first undo goes through [`Rollback::check`], which runs the
//! undo steps before it returns the error, and success ends with
//! [`Rollback::commit`]. A rollback dropped with steps left is logged: an
//! early return that skipped `check` (a bug), or the call's future dropped
//! mid-way (ttrpc drops a handler at its deadline), which nothing can undo
//! from `Drop`.

use std::future::Future;
use std::pin::Pin;

use boxlite_protocol::error_chain::chain;

use crate::error::{Result, ShimError};

type UndoStep<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// The undo steps of one operation (`what`, for the log), run last first.
#[must_use = "a rollback must end in check's error path or commit"]
pub struct Rollback<'a> {
    what: &'static str,
    steps: Vec<(&'static str, UndoStep<'a>)>,
}

impl<'a> Rollback<'a> {
    pub fn new(what: &'static str) -> Self {
        Self {
            what,
            steps: Vec::new(),
        }
    }

    /// Adds a step (`name` for the log) to undo what was just done. Nothing
    /// runs now: an async block does nothing until awaited.
    pub fn push(&mut self, name: &'static str, undo: impl Future<Output = ()> + Send + 'a) {
        self.steps.push((name, Box::pin(undo)));
    }

    /// Passes `result` through; on an error, first undoes every step.
    pub async fn check<T>(&mut self, result: Result<T>) -> Result<T> {
        match result {
            Ok(value) => Ok(value),
            Err(error) => {
                self.run(&error).await;
                Err(error)
            }
        }
    }

    /// Undoes every step, last first, because of `error`.
    pub async fn run(&mut self, error: &ShimError) {
        tracing::warn!(error = %chain(error), "{} failed; undoing it", self.what);
        while let Some((name, undo)) = self.steps.pop() {
            tracing::debug!(step = name, "undo");
            undo.await;
        }
    }

    /// The operation succeeded: its steps stay done.
    pub fn commit(mut self) {
        self.steps.clear();
    }
}

impl Drop for Rollback<'_> {
    fn drop(&mut self) {
        if self.steps.is_empty() {
            return;
        }
        let names: Vec<_> = self.steps.iter().map(|(name, _)| *name).collect();
        tracing::error!(
            ?names,
            "{}: rollback dropped with steps not undone",
            self.what
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[tokio::test]
    async fn undoes_last_first_on_error_and_nothing_after_commit() {
        let log = Mutex::new(Vec::new());
        let mut undo = Rollback::new("test");
        undo.push("first", async { log.lock().unwrap().push("first") });
        undo.push("second", async { log.lock().unwrap().push("second") });
        assert_eq!(undo.check(Ok(1)).await.unwrap(), 1);
        assert!(log.lock().unwrap().is_empty(), "nothing runs on success");
        let err = undo
            .check::<()>(Err(ShimError::Internal("boom".into())))
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "boom");
        assert_eq!(*log.lock().unwrap(), ["second", "first"]);

        let mut undo = Rollback::new("test");
        undo.push("kept", async { log.lock().unwrap().push("kept") });
        undo.commit();
        assert_eq!(log.lock().unwrap().len(), 2);
    }
}
