//! The sandbox this VM belongs to: CreateSandbox records it (and sets the
//! hostname and mounts the shares), DestroySandbox ends it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use boxlite_protocol::ids::{self, InvalidId};

use crate::etc::EtcError;
use crate::identity::{Identity, IdentityError};
use crate::power::{DEFAULT_STOP_TIMEOUT, MAX_STOP_TIMEOUT};
use crate::share::{ShareError, ShareRequest};

/// Most shares one CreateSandbox may list.
pub const MAX_SHARES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The id and why it is refused are in the source.
    #[error("sandbox_id is refused")]
    InvalidId(#[source] InvalidId),
    #[error("sandbox {0} was already created")]
    AlreadyCreated(String),
    #[error("sandbox is being destroyed")]
    Destroying,
    #[error("{count} shares given, the limit is {MAX_SHARES}")]
    TooManyShares { count: usize },
    #[error("timeout_secs = {got} is out of range 0..={max}")]
    Timeout { got: u32, max: u64 },
    #[error(transparent)]
    Hostname(#[from] EtcError),
    #[error(transparent)]
    Share(#[from] ShareError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// A validated CreateSandbox request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateSandbox {
    pub id: String,
    /// None keeps the hostname from boot.
    pub hostname: Option<String>,
    pub shares: Vec<ShareRequest>,
    /// Entropy and wall clock from the host, applied first.
    pub identity: Identity,
}

impl CreateSandbox {
    pub fn validate(
        id: &str,
        hostname: &str,
        shares: impl ExactSizeIterator<Item = Result<ShareRequest, ShareError>>,
        identity: Identity,
    ) -> Result<Self, SandboxError> {
        ids::validate("sandbox", id).map_err(SandboxError::InvalidId)?;
        let hostname = if hostname.is_empty() {
            None
        } else {
            crate::etc::validate_hostname(hostname)?;
            Some(hostname.to_string())
        };
        if shares.len() > MAX_SHARES {
            return Err(SandboxError::TooManyShares {
                count: shares.len(),
            });
        }
        Ok(CreateSandbox {
            id: id.to_string(),
            hostname,
            shares: shares.collect::<Result<_, _>>()?,
            identity,
        })
    }
}

/// DestroySandbox's grace period: 0 means the default.
pub fn stop_timeout(timeout_secs: u32) -> Result<Duration, SandboxError> {
    match u64::from(timeout_secs) {
        0 => Ok(DEFAULT_STOP_TIMEOUT),
        s if s <= MAX_STOP_TIMEOUT.as_secs() => Ok(Duration::from_secs(s)),
        _ => Err(SandboxError::Timeout {
            got: timeout_secs,
            max: MAX_STOP_TIMEOUT.as_secs(),
        }),
    }
}

/// The sandbox record. CreateSandbox holds `create_lock` throughout so two
/// creates cannot interleave; the other fields are only held briefly, so
/// Health.Check and log fields never wait for a slow mount.
#[derive(Debug, Default)]
pub struct Sandbox {
    id: Mutex<Option<String>>,
    destroying: AtomicBool,
    create_lock: Mutex<()>,
}

impl Sandbox {
    /// The sandbox id, or "" before CreateSandbox (for log fields).
    pub fn id(&self) -> String {
        lock(&self.id).clone().unwrap_or_default()
    }

    pub fn set_id(&self, id: &str) {
        *lock(&self.id) = Some(id.to_string());
    }

    pub fn created(&self) -> Option<String> {
        lock(&self.id).clone()
    }

    pub fn is_destroying(&self) -> bool {
        self.destroying.load(Ordering::SeqCst)
    }

    /// Marks the sandbox as being destroyed; false if it already was.
    pub fn begin_destroy(&self) -> bool {
        !self.destroying.swap(true, Ordering::SeqCst)
    }

    pub fn lock_for_create(&self) -> MutexGuard<'_, ()> {
        lock(&self.create_lock)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_create_requests() {
        let ok = CreateSandbox::validate(
            "sb-1",
            "",
            [ShareRequest::validate("share0", "", false)].into_iter(),
            Identity::default(),
        )
        .unwrap();
        assert_eq!(ok.hostname, None);
        assert_eq!(ok.shares.len(), 1);
        for bad_id in [
            "",
            "a b",
            "a/b",
            "a+b",
            ".x",
            &"x".repeat(ids::MAX_ID_LEN + 1),
        ] {
            let e = CreateSandbox::validate(bad_id, "", std::iter::empty(), Identity::default())
                .unwrap_err();
            assert!(matches!(e, SandboxError::InvalidId(_)), "{bad_id:?}");
        }
        let e = CreateSandbox::validate("sb", "bad_host", std::iter::empty(), Identity::default())
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("hostname \"bad_host\" is invalid"),
            "{e}"
        );
        let e = CreateSandbox::validate(
            "sb",
            "",
            [ShareRequest::validate("", "", false)].into_iter(),
            Identity::default(),
        )
        .unwrap_err();
        assert!(matches!(
            e,
            SandboxError::Share(ShareError::InvalidTag { .. })
        ));
    }

    #[test]
    fn stop_timeouts() {
        assert_eq!(stop_timeout(0).unwrap(), DEFAULT_STOP_TIMEOUT);
        assert_eq!(stop_timeout(7).unwrap(), Duration::from_secs(7));
        assert_eq!(
            stop_timeout(301).unwrap_err().to_string(),
            "timeout_secs = 301 is out of range 0..=300"
        );
    }
}
