//! What makes this VM its own when it may be one of many restored from
//! one snapshot (a pod template): CreateSandbox brings host entropy and
//! the host's wall clock, applied before anything else the sandbox does.
//!
//! - Entropy: every clone starts with the template's random pool, so
//!   until the kernel reseeds (up to a minute later) clones would draw
//!   the same `/dev/urandom` bytes. The host's seed is mixed into the pool
//!   with `RNDADDENTROPY` (credited: it comes from the host's CSPRNG over
//!   the agent's private channel) and the kernel's CRNG is reseeded at
//!   once with `RNDRESEEDCRNG`, which also tells the vDSO's `getrandom`
//!   to reseed its per-thread state.
//! - Wall clock: a restored guest's `CLOCK_REALTIME` resumes from the
//!   time the template was saved. It is stepped to the host's when it is
//!   off by more than [`CLOCK_STEP_THRESHOLD`], which a freshly booted
//!   guest (whose kvmclock already gives it the host's time) never is.
//!
//! On the host (tests), the requests are validated and nothing is applied.

use std::os::fd::AsRawFd;
use std::time::Duration;

use crate::config::{Config, Mode};

/// The most entropy one CreateSandbox may bring: the kernel mixes any
/// amount, but 64 bytes already fill its 256-bit CRNG key twice over.
pub const MAX_ENTROPY_SEED: usize = 512;
/// The least entropy worth crediting: the CRNG's key size.
pub const MIN_ENTROPY_SEED: usize = 32;
/// How far the guest's wall clock may be from the host's before it is
/// stepped: more than the time the request spends in flight, less than
/// anything a person or a certificate check would notice.
pub const CLOCK_STEP_THRESHOLD: Duration = Duration::from_millis(50);

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`, linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`, linux/random.h).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "entropy_seed is {got} bytes; give none or {MIN_ENTROPY_SEED}..={MAX_ENTROPY_SEED} bytes"
    )]
    SeedLength { got: usize },
    #[error("wall_clock_unix_ns = {0} is before 1970")]
    Clock(i64),
    #[error("adding the host's entropy to the guest's random pool failed ({call})")]
    Entropy {
        call: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("setting the guest's wall clock failed")]
    SetClock(#[source] std::io::Error),
}

/// A validated identity request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// Host entropy to mix in; empty: none.
    pub entropy_seed: Vec<u8>,
    /// The host's wall clock when it sent the request; None: leave the
    /// guest's alone.
    pub wall_clock: Option<Duration>,
}

/// What [`apply`] did, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub reseeded: bool,
    /// How far the guest's clock was stepped (positive: forward), if it
    /// was.
    pub clock_step_ms: Option<i64>,
}

impl Identity {
    /// Checks the two CreateSandbox fields.
    pub fn validate(entropy_seed: &[u8], wall_clock_unix_ns: i64) -> Result<Self, IdentityError> {
        if !entropy_seed.is_empty()
            && !(MIN_ENTROPY_SEED..=MAX_ENTROPY_SEED).contains(&entropy_seed.len())
        {
            return Err(IdentityError::SeedLength {
                got: entropy_seed.len(),
            });
        }
        let wall_clock = match wall_clock_unix_ns {
            0 => None,
            ns if ns < 0 => return Err(IdentityError::Clock(ns)),
            ns => Some(Duration::from_nanos(ns as u64)),
        };
        Ok(Identity {
            entropy_seed: entropy_seed.to_vec(),
            wall_clock,
        })
    }
}

/// Applies `id` (guest mode only: it changes the kernel's state).
pub fn apply(config: &Config, id: &Identity) -> Result<Applied, IdentityError> {
    let mut applied = Applied::default();
    if config.mode != Mode::Guest {
        return Ok(applied);
    }
    if !id.entropy_seed.is_empty() {
        add_entropy(&id.entropy_seed)?;
        applied.reseeded = true;
    }
    if let Some(host) = id.wall_clock {
        applied.clock_step_ms = step_clock(host)?;
    }
    Ok(applied)
}

/// `struct rand_pool_info` with its buffer: entropy bits credited, buffer
/// length, then the bytes.
fn rand_pool_info(seed: &[u8]) -> Vec<u8> {
    let bits = i32::try_from(seed.len() * 8).expect("seed length is bounded");
    let len = i32::try_from(seed.len()).expect("seed length is bounded");
    let mut info = Vec::with_capacity(8 + seed.len());
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(seed);
    info
}

fn add_entropy(seed: &[u8]) -> Result<(), IdentityError> {
    let failed = |call| move |source| IdentityError::Entropy { call, source };
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")
        .map_err(failed("open /dev/random"))?;
    let info = rand_pool_info(seed);
    // SAFETY: `info` is a complete rand_pool_info (two ints, then
    // buf_size bytes) that lives across the call; the kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(failed("RNDADDENTROPY")(std::io::Error::last_os_error()));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(failed("RNDRESEEDCRNG")(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Steps `CLOCK_REALTIME` to `host` if it is off by more than the
/// threshold; returns the step in ms.
fn step_clock(host: Duration) -> Result<Option<i64>, IdentityError> {
    use nix::time::{clock_gettime, clock_settime, ClockId};
    let now =
        clock_gettime(ClockId::CLOCK_REALTIME).map_err(|e| IdentityError::SetClock(e.into()))?;
    let guest = Duration::from(now);
    let Some(step_ms) = clock_step_ms(guest, host) else {
        return Ok(None);
    };
    clock_settime(ClockId::CLOCK_REALTIME, host.into())
        .map_err(|e| IdentityError::SetClock(e.into()))?;
    Ok(Some(step_ms))
}

/// The step from `guest` to `host` in ms, if it is beyond the threshold.
fn clock_step_ms(guest: Duration, host: Duration) -> Option<i64> {
    let off = host.abs_diff(guest);
    if off <= CLOCK_STEP_THRESHOLD {
        return None;
    }
    let ms = i64::try_from(off.as_millis()).unwrap_or(i64::MAX);
    Some(if host > guest { ms } else { -ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        assert_eq!(Identity::validate(&[], 0).unwrap(), Identity::default());
        let id = Identity::validate(&[7; 64], 1_700_000_000_123_456_789).unwrap();
        assert_eq!(id.entropy_seed.len(), 64);
        assert_eq!(
            id.wall_clock,
            Some(Duration::new(1_700_000_000, 123_456_789))
        );
        for n in [1, 31, 513] {
            let err = Identity::validate(&vec![1; n], 0).unwrap_err().to_string();
            assert_eq!(
                err,
                format!("entropy_seed is {n} bytes; give none or 32..=512 bytes")
            );
        }
        assert!(Identity::validate(&[], -1).is_err());
    }

    #[test]
    fn the_pool_info_is_bits_length_then_bytes() {
        let info = rand_pool_info(&[0xab; 40]);
        assert_eq!(&info[..4], &320i32.to_ne_bytes());
        assert_eq!(&info[4..8], &40i32.to_ne_bytes());
        assert_eq!(&info[8..], &[0xab; 40]);
    }

    #[test]
    fn the_clock_is_stepped_only_beyond_the_threshold() {
        let t = Duration::from_secs(1_700_000_000);
        let ms = Duration::from_millis;
        assert_eq!(clock_step_ms(t, t), None);
        assert_eq!(clock_step_ms(t, t + ms(50)), None);
        assert_eq!(clock_step_ms(t + ms(50), t), None);
        assert_eq!(clock_step_ms(t, t + ms(51)), Some(51));
        assert_eq!(clock_step_ms(t + ms(3_600_000), t), Some(-3_600_000));
    }

    #[test]
    fn nothing_is_applied_on_the_host() {
        let config = Config {
            mode: Mode::Host,
            ..Config::guest(None)
        };
        let id = Identity::validate(&[1; 64], 1).unwrap();
        assert_eq!(apply(&config, &id).unwrap(), Applied::default());
    }
}
