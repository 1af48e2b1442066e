//! The uid (= gid) each sandbox's jailed `boxlite-vmm` runs as: leased from
//! the range `hypervisor.jail_id_base`/`jail_id_count`, so that no two live
//! sandboxes share one (what Firecracker's jailer expects of its users: a
//! uid per microVM).
//!
//! Every sandbox has its own shim process and shims start concurrently, so
//! the leases are files every shim sees: `<state_dir>/.jail-ids/<uid>`,
//! holding the sandbox id and a newline. The directory is root's (0700)
//! and no sandbox's (sandbox ids never start with `.`). Every change to it
//! happens under an exclusive `flock` of its `.lock` file, so finding a free
//! uid, taking it and reclaiming stale leases are one step for everyone. A
//! lease is written to a temporary file and linked to its name: it appears
//! whole, and the link fails if the name is taken.
//!
//! Probing starts at `base + FNV-1a(id) % count` and goes on upwards
//! (wrapping at the end of the range), so a sandbox usually gets the same
//! uid every time. A sandbox that already holds a lease in the range (a
//! retry, a new shim after a crashed one) gets that uid back.
//!
//! A lease is stale once its sandbox's directory `<state_dir>/<id>` is
//! gone: the VM start makes that directory before it leases, and the shim
//! removes it only after the VM's processes are gone (its teardown, or
//! `delete` after a crashed shim), so while it exists a VMM of the sandbox
//! may run as that uid. Every lease removes the stale ones it finds first.
//!
//! Release: the VM's teardown drops its [`JailLease`] (the process
//! backends' `ProcessVm`), and the shim's cleanup of a sandbox directory
//! calls [`release_sandbox`] for what a crashed shim held.

use std::collections::HashSet;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use boxlite_vmm_api::config::JailUser;
use nix::fcntl::{Flock, FlockArg};

use crate::config::Config;

/// The lease directory, beside the sandbox directories in `runtime.state_dir`.
pub const LEASE_DIR: &str = ".jail-ids";
/// Locked (`flock`, exclusive) for every change to the lease directory. It
/// and the directory stay when the last lease goes: removing them would
/// race with a shim waiting on the lock.
pub const LOCK_FILE: &str = ".lock";
/// A lease holds a sandbox id (at most 76 bytes) and a newline; a longer
/// file is not a lease.
const MAX_LEASE_LEN: u64 = 128;

/// Errors of the jail uid leases; each names the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum JailIdError {
    /// The id breaks containerd's rule, which the source names.
    #[error("cannot lease a jail uid")]
    InvalidSandboxId(#[source] boxlite_protocol::ids::InvalidId),
    #[error("sandbox {id}: {}: {op}", path.display())]
    Io {
        id: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error(
        "sandbox {id}: no jail uid is free: all {count} of {first}..={last} \
         (hypervisor.jail_id_base, hypervisor.jail_id_count) are leased to live sandboxes{} \
         (leases in {}); raise hypervisor.jail_id_count or end a sandbox",
        malformed_note(*malformed),
        lease_dir.display()
    )]
    Exhausted {
        id: String,
        first: u32,
        last: u32,
        count: u32,
        /// How many of them are lease files that do not parse (kept, and
        /// logged, since whoever wrote them may hold the uid).
        malformed: usize,
        lease_dir: PathBuf,
    },
}

fn malformed_note(malformed: usize) -> String {
    match malformed {
        0 => String::new(),
        n => format!(" ({n} by lease files that do not parse, see the log)"),
    }
}

/// `hypervisor.jail_id_base` and `jail_id_count`: the uids (= gids) the
/// jailed VMMs run as. `count` is at least 1 and `base + count` fits a u32
/// (the config's validation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JailIdRange {
    pub base: u32,
    pub count: u32,
}

impl JailIdRange {
    fn count(self) -> u32 {
        self.count.max(1)
    }

    pub fn last(self) -> u32 {
        self.base + (self.count() - 1)
    }

    pub fn contains(self, uid: u32) -> bool {
        (self.base..=self.last()).contains(&uid)
    }

    /// Where probing for `id` starts: the FNV-1a hash of the id in the
    /// range, so the same sandbox usually gets the same uid.
    pub fn home(self, id: &str) -> u32 {
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        });
        self.base + (hash % u64::from(self.count())) as u32
    }

    /// How many steps from `id`'s home probing reaches `uid` (in the range).
    fn probe_distance(self, id: &str, uid: u32) -> u32 {
        let count = u64::from(self.count());
        let (home, at) = (self.home(id) - self.base, uid - self.base);
        ((u64::from(at) + count - u64::from(home)) % count) as u32
    }

    /// Every uid of the range, from `id`'s home on, wrapping at the end.
    fn probe_order(self, id: &str) -> impl Iterator<Item = u32> {
        let start = self.home(id) - self.base;
        let count = self.count();
        (0..count).map(move |k| self.base + ((start + k) % count))
    }
}

/// The jail uids of the sandboxes under one `runtime.state_dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailIds {
    pub range: JailIdRange,
    /// The sandbox directories' parent; the leases are in its
    /// [`LEASE_DIR`].
    pub state_dir: PathBuf,
}

impl JailIds {
    pub fn from_config(config: &Config) -> Self {
        Self {
            range: JailIdRange {
                base: config.hypervisor.jail_id_base,
                count: config.hypervisor.jail_id_count,
            },
            state_dir: config.runtime.state_dir.clone(),
        }
    }

    pub fn lease_dir(&self) -> PathBuf {
        self.state_dir.join(LEASE_DIR)
    }

    /// A uid (= gid) of the range no other live sandbox holds, for sandbox
    /// `id`, whose directory must exist already (else the lease would look
    /// stale to the next shim). Removes the stale leases it finds.
    pub fn lease(&self, id: &str) -> Result<JailLease, JailIdError> {
        // It becomes a path and the lease's content.
        boxlite_protocol::ids::validate("sandbox", id).map_err(JailIdError::InvalidSandboxId)?;
        let own_dir = self.state_dir.join(id);
        if let Err(error) = std::fs::symlink_metadata(&own_dir) {
            return Err(JailIdError::Io {
                id: id.to_owned(),
                op: "the sandbox directory must exist before its jail uid is leased",
                path: own_dir,
                error,
            });
        }
        let leases = LeaseDir::create_and_lock(id, &self.lease_dir())?;
        let mut taken = HashSet::new();
        let mut own = HashSet::new();
        let mut malformed = 0;
        for entry in leases.scan()? {
            match entry {
                Entry::Lease { uid, holder } if holder == id => {
                    own.insert(uid);
                }
                Entry::Lease { uid, holder } => {
                    if self.is_stale(&holder) {
                        tracing::info!(sandbox_id = %id, uid, holder = %holder, "reclaiming the jail uid lease of a sandbox that is gone");
                        leases.remove(uid)?;
                    } else {
                        taken.insert(uid);
                    }
                }
                Entry::Malformed { uid, path, why } => {
                    tracing::warn!(sandbox_id = %id, lease = %path.display(), "jail uid lease does not parse ({why}); its uid stays taken");
                    taken.insert(uid);
                    if self.range.contains(uid) {
                        malformed += 1;
                    }
                }
            }
        }
        let range = self.range;
        // Held already: that one (the nearest its home, should there be
        // two), not a second.
        let held = own
            .into_iter()
            .filter(|uid| range.contains(*uid))
            .min_by_key(|uid| range.probe_distance(id, *uid));
        if let Some(uid) = held {
            return Ok(leases.lease_of(id, uid));
        }
        // Returns at the first free uid: a range of any size is probed
        // only about as far as there are leases.
        for uid in range.probe_order(id) {
            if !taken.contains(&uid) && leases.create(uid, id)? {
                tracing::debug!(sandbox_id = %id, uid, "jail uid leased");
                return Ok(leases.lease_of(id, uid));
            }
        }
        Err(JailIdError::Exhausted {
            id: id.to_owned(),
            first: range.base,
            last: range.last(),
            count: range.count(),
            malformed,
            lease_dir: self.lease_dir(),
        })
    }

    /// A lease is stale once its sandbox's directory is gone (see the
    /// module's doc). An error other than "not found" keeps it: a uid
    /// given twice is worse than one held too long.
    fn is_stale(&self, holder: &str) -> bool {
        let dir = self.state_dir.join(holder);
        match std::fs::symlink_metadata(&dir) {
            Ok(_) => false,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                tracing::warn!(sandbox = %dir.display(), error = %e, "cannot tell whether a sandbox directory exists; its jail uid lease stays");
                false
            }
        }
    }
}

/// Releases every jail uid lease of the sandbox whose directory is
/// `sandbox_dir` (`<state_dir>/<id>`): after a crashed shim, whose VM's
/// teardown never ran. Returns the uids released.
pub fn release_sandbox(sandbox_dir: &Path) -> Result<Vec<u32>, JailIdError> {
    let (Some(state_dir), Some(id)) = (
        sandbox_dir.parent(),
        sandbox_dir.file_name().and_then(|n| n.to_str()),
    ) else {
        return Ok(Vec::new());
    };
    let Some(leases) = LeaseDir::lock_if_present(id, &state_dir.join(LEASE_DIR))? else {
        return Ok(Vec::new());
    };
    let mut released = Vec::new();
    for entry in leases.scan()? {
        if let Entry::Lease { uid, holder } = entry {
            if holder == id {
                leases.remove(uid)?;
                released.push(uid);
            }
        }
    }
    Ok(released)
}

/// A sandbox's jail uid, held until dropped: dropping it removes the
/// lease (if it still names the sandbox), so drop it only once the VMM
/// running as the uid is gone. The lease is the sandbox's, not this
/// value's: a second lease for the same sandbox gets the same uid, and
/// dropping either frees it.
#[derive(Debug)]
pub struct JailLease {
    id: String,
    uid: u32,
    lease_dir: PathBuf,
}

impl JailLease {
    /// The uid and the gid (the same number) the VMM runs as.
    pub fn user(&self) -> JailUser {
        JailUser {
            uid: self.uid,
            gid: self.uid,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.lease_dir.join(self.uid.to_string())
    }

    fn release(&self) -> Result<(), JailIdError> {
        let Some(leases) = LeaseDir::lock_if_present(&self.id, &self.lease_dir)? else {
            return Ok(());
        };
        // Another sandbox's by now only if this one's was reclaimed as
        // stale (its directory went first): that one is not ours to free.
        if read_lease(&self.path()).is_ok_and(|holder| holder == self.id) {
            leases.remove(self.uid)?;
            tracing::debug!(sandbox_id = %self.id, uid = self.uid, "jail uid released");
        }
        Ok(())
    }
}

impl Drop for JailLease {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            // It stays until its sandbox directory is gone (stale).
            tracing::error!(error = %boxlite_protocol::error_chain::chain(&e), "cannot release the jail uid lease");
        }
    }
}

/// What a lease directory holds.
#[derive(Debug)]
enum Entry {
    Lease {
        uid: u32,
        holder: String,
    },
    /// A file named like a lease that is not one.
    Malformed {
        uid: u32,
        path: PathBuf,
        why: String,
    },
}

/// The lease directory, locked until dropped.
struct LeaseDir<'a> {
    /// The sandbox asking, for messages.
    id: &'a str,
    dir: PathBuf,
    _lock: Flock<File>,
}

impl<'a> LeaseDir<'a> {
    /// Makes the directory (root only) if it is missing, and locks it.
    fn create_and_lock(id: &'a str, dir: &Path) -> Result<Self, JailIdError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|error| JailIdError::Io {
                id: id.to_owned(),
                op: "cannot create the jail uid lease directory",
                path: dir.to_owned(),
                error,
            })?;
        Self::lock(id, dir)
    }

    /// Locks the directory if there is one (releasing needs none made).
    fn lock_if_present(id: &'a str, dir: &Path) -> Result<Option<Self>, JailIdError> {
        if !dir.exists() {
            return Ok(None);
        }
        Self::lock(id, dir).map(Some)
    }

    /// Blocks until the lock is ours: every holder only reads and writes a
    /// few small files.
    fn lock(id: &'a str, dir: &Path) -> Result<Self, JailIdError> {
        let io = |op, path: &Path, error| JailIdError::Io {
            id: id.to_owned(),
            op,
            path: path.to_owned(),
            error,
        };
        let path = dir.join(LOCK_FILE);
        let file = super::lock_file::open_lock_file(&path)
            .map_err(|e| io("cannot open the jail uid lock", &path, e))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| io("cannot lock the jail uid leases", &path, errno.into()))?;
        Ok(Self {
            id,
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    fn io(&self, op: &'static str, path: &Path, error: std::io::Error) -> JailIdError {
        JailIdError::Io {
            id: self.id.to_owned(),
            op,
            path: path.to_owned(),
            error,
        }
    }

    /// Every lease, well-formed or not. Temporary files a crashed writer
    /// left are removed (the lock means no one is writing one now); other
    /// names are not leases and are left alone.
    fn scan(&self) -> Result<Vec<Entry>, JailIdError> {
        let dir = &self.dir;
        let entries = std::fs::read_dir(dir)
            .map_err(|e| self.io("cannot list the jail uid leases", dir, e))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io("cannot list the jail uid leases", dir, e))?;
            let path = entry.path();
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                tracing::warn!(path = %path.display(), "not a jail uid lease; ignored");
                continue;
            };
            if name == LOCK_FILE {
                continue;
            }
            if parse_temp_name(name).is_some() {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(uid) = parse_uid(name) else {
                tracing::warn!(path = %path.display(), "not a jail uid lease; ignored");
                continue;
            };
            found.push(match read_lease(&path) {
                Ok(holder) => Entry::Lease { uid, holder },
                Err(why) => Entry::Malformed { uid, path, why },
            });
        }
        Ok(found)
    }

    /// Takes `uid` for `id`; false when its lease file exists already.
    fn create(&self, uid: u32, id: &str) -> Result<bool, JailIdError> {
        let tmp = self.dir.join(temp_name(uid));
        let path = self.dir.join(uid.to_string());
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(format!("{id}\n").as_bytes())?;
            // Whole on disk before it has its name, for a state_dir that
            // is not a tmpfs.
            f.sync_all()
        };
        let linked = match write() {
            Err(e) => Err(self.io("cannot write a jail uid lease", &tmp, e)),
            Ok(()) => match std::fs::hard_link(&tmp, &path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(self.io("cannot link the jail uid lease into place", &path, e)),
            },
        };
        let _ = std::fs::remove_file(&tmp);
        linked
    }

    fn remove(&self, uid: u32) -> Result<(), JailIdError> {
        let path = self.dir.join(uid.to_string());
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io("cannot remove the jail uid lease", &path, e)),
        }
    }

    fn lease_of(&self, id: &str, uid: u32) -> JailLease {
        JailLease {
            id: id.to_owned(),
            uid,
            lease_dir: self.dir.clone(),
        }
    }
}

/// A lease's name: the uid in decimal as `to_string` writes it (no sign,
/// no leading zero, no space).
fn parse_uid(name: &str) -> Option<u32> {
    let uid: u32 = name.parse().ok()?;
    (uid.to_string() == name).then_some(uid)
}

fn temp_name(uid: u32) -> String {
    format!(".{uid}.tmp")
}

fn parse_temp_name(name: &str) -> Option<u32> {
    parse_uid(name.strip_prefix('.')?.strip_suffix(".tmp")?)
}

/// A regular file (not a link) holding a valid sandbox id and one
/// newline, nothing else.
fn read_lease(path: &Path) -> Result<String, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot stat it: {e}"))?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    let mut data = Vec::new();
    file.take(MAX_LEASE_LEN + 1)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read it: {e}"))?;
    parse_lease(&data)
}

/// The holder a lease's content names.
fn parse_lease(data: &[u8]) -> Result<String, String> {
    if data.len() as u64 > MAX_LEASE_LEN {
        return Err(format!("it is longer than {MAX_LEASE_LEN} bytes"));
    }
    let text = std::str::from_utf8(data).map_err(|_| "it is not UTF-8".to_owned())?;
    let id = text
        .strip_suffix('\n')
        .ok_or_else(|| "it does not end with a newline".to_owned())?;
    boxlite_protocol::ids::validate("sandbox", id).map_err(|e| e.to_string())?;
    Ok(id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::error_chain::chain;
    use std::sync::{Arc, Barrier};

    /// A state dir with a range of `count` uids from 1000.
    struct Pool {
        _tmp: tempfile::TempDir,
        ids: JailIds,
    }

    impl Pool {
        fn new(count: u32) -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let ids = JailIds {
                range: JailIdRange { base: 1000, count },
                state_dir: tmp.path().join("state"),
            };
            Self { _tmp: tmp, ids }
        }

        /// A sandbox: its directory, then its lease.
        fn lease(&self, id: &str) -> Result<JailLease, JailIdError> {
            std::fs::create_dir_all(self.ids.state_dir.join(id)).unwrap();
            self.ids.lease(id)
        }

        fn uid(&self, id: &str) -> u32 {
            self.lease(id).unwrap().uid
        }

        /// The lease files: uid → content.
        fn files(&self) -> Vec<(String, String)> {
            let Ok(dir) = std::fs::read_dir(self.ids.lease_dir()) else {
                return Vec::new();
            };
            let mut v: Vec<_> = dir
                .map(|e| e.unwrap())
                .filter(|e| e.file_name() != LOCK_FILE)
                .map(|e| {
                    let content = std::fs::read_to_string(e.path()).unwrap_or_default();
                    (e.file_name().into_string().unwrap(), content)
                })
                .collect();
            v.sort();
            v
        }
    }

    /// `n` sandbox ids whose hash puts them all at `home` of `range`.
    fn colliding(range: JailIdRange, home: u32, n: usize) -> Vec<String> {
        let ids: Vec<String> = (0..)
            .map(|i| format!("pod-{i}"))
            .filter(|id| range.home(id) == home)
            .take(n)
            .collect();
        assert_eq!(ids.len(), n);
        ids
    }

    #[test]
    fn the_hash_position_is_stable_and_spreads_over_the_range() {
        let range = JailIdRange {
            base: 1000,
            count: 16,
        };
        assert_eq!(range.home("pod-a"), range.home("pod-a"));
        let homes: HashSet<u32> = (0..200).map(|i| range.home(&format!("pod-{i}"))).collect();
        assert!(homes.iter().all(|u| range.contains(*u)), "{homes:?}");
        assert_eq!(homes.len(), 16, "the hash spreads over the whole range");
        let one = JailIdRange {
            base: 0x7000_0000,
            count: 1,
        };
        assert_eq!(one.home("x"), 0x7000_0000);
        let top = JailIdRange {
            base: u32::MAX - 4,
            count: 4,
        };
        assert_eq!(top.last(), u32::MAX - 1);
        assert!(top.probe_order("x").all(|u| top.contains(u)));
        for (k, uid) in top.probe_order("x").enumerate() {
            assert_eq!(top.probe_distance("x", uid) as usize, k);
        }
    }

    #[test]
    fn sandboxes_the_hash_puts_on_one_uid_get_distinct_ones_from_there_on() {
        let pool = Pool::new(8);
        let range = pool.ids.range;
        // Probing wraps from the last uid of the range to the first.
        let ids = colliding(range, range.last() - 1, 5);
        let leases: Vec<JailLease> = ids.iter().map(|id| pool.lease(id).unwrap()).collect();
        let uids: Vec<u32> = leases.iter().map(|l| l.user().uid).collect();
        assert_eq!(uids, [1006, 1007, 1000, 1001, 1002]);
        for l in &leases {
            assert_eq!(l.user().uid, l.user().gid);
        }
        let files = pool.files();
        assert_eq!(files.len(), 5, "{files:?}");
        assert!(files.contains(&("1000".into(), format!("{}\n", ids[2]))));
    }

    #[test]
    fn the_same_sandbox_gets_the_uid_it_holds() {
        let pool = Pool::new(8);
        let ids = colliding(pool.ids.range, 1003, 2);
        let (a, b) = (&ids[0], &ids[1]);
        let lease_a = pool.lease(a).unwrap();
        let lease_b = pool.lease(b).unwrap();
        assert_eq!((lease_a.uid, lease_b.uid), (1003, 1004));
        let again = pool.lease(b).unwrap();
        assert_eq!(again.uid, 1004, "asked again");
        std::mem::forget(again);
        // b's shim crashed: its lease is never dropped. a's uid is free by
        // the time b asks again; b keeps 1004 rather than moving to its
        // hash position, where it would hold two.
        std::mem::forget(lease_b);
        drop(lease_a);
        let after = pool.lease(b).unwrap();
        assert_eq!(after.uid, 1004);
        assert_eq!(pool.files(), [("1004".to_string(), format!("{b}\n"))]);
        drop(after);
        assert_eq!(pool.files(), []);
    }

    #[test]
    fn release_frees_the_uid() {
        let pool = Pool::new(4);
        let ids = colliding(pool.ids.range, 1001, 3);
        let first = pool.lease(&ids[0]).unwrap();
        let second = pool.lease(&ids[1]).unwrap();
        assert_eq!((first.uid, second.uid), (1001, 1002));
        assert_eq!(first.path(), pool.ids.lease_dir().join("1001"));
        drop(first);
        assert!(!pool.ids.lease_dir().join("1001").exists());
        assert_eq!(pool.uid(&ids[2]), 1001, "the freed uid, first in line");
        drop(second);
        assert_eq!(pool.files(), []);
    }

    #[test]
    fn the_release_of_a_crashed_shims_sandbox_frees_its_uids_only() {
        let pool = Pool::new(4);
        let kept = pool.lease("kept").unwrap();
        let crashed = pool.lease("crashed").unwrap();
        let crashed_uid = crashed.uid;
        // The shim died holding it.
        std::mem::forget(crashed);
        let dir = pool.ids.state_dir.join("crashed");
        assert_eq!(release_sandbox(&dir).unwrap(), [crashed_uid]);
        assert_eq!(release_sandbox(&dir).unwrap(), Vec::<u32>::new());
        assert_eq!(pool.files(), [(kept.uid.to_string(), "kept\n".into())]);
        // No lease directory (the qemu backend never made one): nothing.
        let elsewhere = tempfile::tempdir().unwrap();
        assert_eq!(
            release_sandbox(&elsewhere.path().join("x")).unwrap(),
            Vec::<u32>::new()
        );
        assert!(!elsewhere.path().join(LEASE_DIR).exists());
    }

    #[test]
    fn the_leases_of_sandboxes_that_are_gone_are_reclaimed() {
        let pool = Pool::new(2);
        std::mem::forget(pool.lease("gone").unwrap());
        let live = pool.lease("live").unwrap();
        let gone_uid = 1000 + 1001 - live.uid;
        let err = chain(&pool.lease("new").unwrap_err());
        assert!(err.contains("no jail uid is free"), "{err}");
        std::fs::remove_dir(pool.ids.state_dir.join("gone")).unwrap();
        let new = pool.lease("new").unwrap();
        assert_eq!(new.uid, gone_uid);
        assert_eq!(
            pool.files(),
            {
                let mut v = vec![
                    (live.uid.to_string(), "live\n".to_string()),
                    (new.uid.to_string(), "new\n".to_string()),
                ];
                v.sort();
                v
            },
            "the stale lease is replaced"
        );
    }

    #[test]
    fn a_stale_lease_is_reclaimed_at_any_lease_not_only_when_the_range_is_full() {
        let pool = Pool::new(64);
        std::mem::forget(pool.lease("gone").unwrap());
        std::fs::remove_dir(pool.ids.state_dir.join("gone")).unwrap();
        let other = pool.lease("other").unwrap();
        assert_eq!(
            pool.files(),
            [(other.uid.to_string(), "other\n".to_string())]
        );
    }

    #[test]
    fn exhaustion_names_the_sandbox_the_range_and_the_lease_directory() {
        let pool = Pool::new(3);
        let held: Vec<JailLease> = ["a", "b", "c"]
            .iter()
            .map(|id| pool.lease(id).unwrap())
            .collect();
        let err = pool.lease("d").unwrap_err();
        assert!(matches!(err, JailIdError::Exhausted { .. }), "{err:?}");
        assert_eq!(
            chain(&err),
            format!(
                "sandbox d: no jail uid is free: all 3 of 1000..=1002 (hypervisor.jail_id_base, \
                 hypervisor.jail_id_count) are leased to live sandboxes (leases in {}); \
                 raise hypervisor.jail_id_count or end a sandbox",
                pool.ids.lease_dir().display()
            )
        );
        drop(held);
        pool.lease("d").unwrap();
    }

    #[test]
    fn the_sandbox_directory_comes_first() {
        let pool = Pool::new(3);
        let err = chain(&pool.ids.lease("../x").unwrap_err());
        assert!(
            err.starts_with("cannot lease a jail uid: sandbox id \"../x\" is invalid"),
            "{err}"
        );
        let err = chain(&pool.ids.lease("nodir").unwrap_err());
        assert!(
            err.starts_with(&format!(
                "sandbox nodir: {}: the sandbox directory must exist before its jail uid is leased: ",
                pool.ids.state_dir.join("nodir").display()
            )),
            "{err}"
        );
        assert_eq!(pool.files(), []);
    }

    /// `SANDBOXES` threads, each its own sandbox, lease at once from a
    /// range of `RANGE` and hold what they got until all have tried: the
    /// winners' uids are distinct, the others get the exhaustion error,
    /// and the lease files name exactly the winners.
    fn race(pool: &Arc<Pool>) -> Vec<Result<u32, String>> {
        const SANDBOXES: usize = 12;
        for i in 0..SANDBOXES {
            std::fs::create_dir_all(pool.ids.state_dir.join(format!("s{i}"))).unwrap();
        }
        let start = Arc::new(Barrier::new(SANDBOXES));
        let done = Arc::new(Barrier::new(SANDBOXES + 1));
        let threads: Vec<_> = (0..SANDBOXES)
            .map(|i| {
                let (pool, start, done) = (pool.clone(), start.clone(), done.clone());
                std::thread::spawn(move || {
                    start.wait();
                    let got = pool.ids.lease(&format!("s{i}"));
                    // Every lease is held until every thread has tried.
                    done.wait();
                    done.wait();
                    got.map(|l| l.uid).map_err(|e| chain(&e))
                })
            })
            .collect();
        done.wait();
        let files = pool.files();
        done.wait();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let winners: Vec<(String, String)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((r.clone().ok()?.to_string(), format!("s{i}\n"))))
            .collect();
        let distinct: HashSet<&String> = winners.iter().map(|(uid, _)| uid).collect();
        assert_eq!(winners.len(), pool.ids.range.count as usize, "{results:?}");
        assert_eq!(distinct.len(), winners.len(), "{results:?}");
        let mut expected = winners;
        expected.sort();
        assert_eq!(files, expected, "{results:?}");
        for err in results.iter().filter_map(|r| r.clone().err()) {
            assert!(err.contains("no jail uid is free"), "{err}");
        }
        assert_eq!(pool.files(), [], "every winner released its uid");
        results
    }

    #[test]
    fn concurrent_leases_in_a_tiny_range_never_share_a_uid() {
        race(&Arc::new(Pool::new(3)));
    }

    /// The race again with every uid held by a sandbox that is gone: each
    /// stale lease is reclaimed by one thread only (the lock; without it
    /// two could each remove it and take its uid).
    #[test]
    fn concurrent_leases_reclaim_each_stale_lease_once() {
        let pool = Arc::new(Pool::new(3));
        for gone in ["gone-a", "gone-b", "gone-c"] {
            std::mem::forget(pool.lease(gone).unwrap());
            std::fs::remove_dir(pool.ids.state_dir.join(gone)).unwrap();
        }
        race(&pool);
    }

    #[test]
    fn lease_files_are_parsed_strictly() {
        assert_eq!(parse_lease(b"pod-1\n"), Ok("pod-1".into()));
        for (bad, why) in [
            (&b""[..], "does not end with a newline"),
            (b"pod-1", "does not end with a newline"),
            (b"pod-1\n\n", "is invalid"),
            (b"pod 1\n", "is invalid"),
            (b"../etc\n", "is invalid"),
            (b"\n", "is invalid"),
            (b"\xff\n", "not UTF-8"),
        ] {
            let err = parse_lease(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let long = format!("{}\n", "x".repeat(MAX_LEASE_LEN as usize));
        assert!(parse_lease(long.as_bytes()).unwrap_err().contains("longer"));
        assert_eq!(parse_uid("1000"), Some(1000));
        for bad in ["", "01000", "+1000", "1000 ", "4294967296", "x"] {
            assert_eq!(parse_uid(bad), None, "{bad:?}");
        }
        assert_eq!(parse_temp_name(".1000.tmp"), Some(1000));
        assert_eq!(parse_temp_name("1000.tmp"), None);
    }

    #[test]
    fn a_lease_that_does_not_parse_keeps_its_uid_taken() {
        let pool = Pool::new(2);
        let dir = pool.ids.lease_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("1000"), "garbage with spaces\n").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("1001")).unwrap();
        // Not leases at all: ignored, kept. A crashed writer's temporary
        // file: removed.
        std::fs::write(dir.join("notes"), "").unwrap();
        std::fs::write(dir.join(".1000.tmp"), "half").unwrap();
        let err = chain(&pool.lease("p").unwrap_err());
        assert!(
            err.contains("(2 by lease files that do not parse, see the log)"),
            "{err}"
        );
        assert!(dir.join("1000").exists() && dir.join("notes").exists());
        assert!(!dir.join(".1000.tmp").exists());
        std::fs::remove_file(dir.join("1001")).unwrap();
        assert_eq!(pool.uid("p"), 1001);
    }
}
