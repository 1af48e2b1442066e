//! [`TemplateStore`]: the template directory — finding a finished
//! template, the build lock, publishing a built one whole, discarding a
//! bad one.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};

use super::{TemplateError, TemplateInputs, TemplateRecord, MEMORY_FILE, RECORD_FILE, STATE_FILE};

/// `template.json` is a few hundred bytes; anything much larger is not one.
const MAX_RECORD_LEN: u64 = 64 * 1024;

/// A finished template, found by [`TemplateStore::find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub key: String,
    pub dir: PathBuf,
    pub record: TemplateRecord,
}

impl Template {
    pub fn state_file(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    pub fn memory_file(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}

/// The directory of `templates.dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateStore {
    dir: PathBuf,
}

/// The exclusive build lock of one key, released when dropped.
#[derive(Debug)]
pub struct BuildLock {
    _lock: Flock<File>,
}

impl TemplateStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn template_dir(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    pub fn partial_dir(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.partial"))
    }

    fn lock_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.lock"))
    }

    /// The finished template for `inputs`, if there is one whose record
    /// names the same inputs and whose snapshot files are there. One that
    /// is there but unreadable or for other inputs is discarded (logged):
    /// the next build replaces it.
    pub fn find(&self, inputs: &TemplateInputs) -> Option<Template> {
        let key = inputs.key();
        let dir = self.template_dir(&key);
        if !dir.exists() {
            return None;
        }
        match read_record(&dir) {
            Ok(record) if record.inputs == *inputs && record.nic_macs.len() == inputs.nics => {
                if let Err(why) = record.macs() {
                    self.discard(&key, &why);
                    return None;
                }
                let t = Template { key, dir, record };
                for f in [t.state_file(), t.memory_file()] {
                    if !f.is_file() {
                        self.discard(&t.key, &format!("{} is missing", f.display()));
                        return None;
                    }
                }
                Some(t)
            }
            Ok(_) => {
                self.discard(
                    &key,
                    "its record names other inputs than its key, or not one MAC per NIC",
                );
                None
            }
            Err(reason) => {
                self.discard(&key, &reason);
                None
            }
        }
    }

    /// Takes the build lock of `key` without waiting: [`TemplateError::Busy`]
    /// when another shim holds it (that shim's sandbox boots from it once
    /// built; ours cold-boots meanwhile). Creates the directory (0700).
    pub fn try_lock(&self, key: &str) -> Result<BuildLock, TemplateError> {
        let io = |op, path: &Path, error| TemplateError::Io {
            key: key.to_owned(),
            op,
            path: path.to_owned(),
            error,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| io("cannot create the template directory", &self.dir, e))?;
        let path = self.lock_path(key);
        let file = crate::hypervisor::lock_file::open_lock_file(&path)
            .map_err(|e| io("cannot open the build lock", &path, e))?;
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(BuildLock { _lock: lock }),
            Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(TemplateError::Busy {
                key: key.to_owned(),
                lock: path,
            }),
            Err((_, errno)) => Err(io("cannot lock", &path, errno.into())),
        }
    }

    /// A fresh, empty `<key>.partial` (what a dead builder left is
    /// removed). Only under the build lock.
    pub fn fresh_partial(&self, key: &str, _lock: &BuildLock) -> Result<PathBuf, TemplateError> {
        let dir = self.partial_dir(key);
        remove_dir_if_there(&dir).map_err(|error| TemplateError::Io {
            key: key.to_owned(),
            op: "cannot remove the unfinished template",
            path: dir.clone(),
            error,
        })?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|error| TemplateError::Io {
                key: key.to_owned(),
                op: "cannot create",
                path: dir.clone(),
                error,
            })?;
        Ok(dir)
    }

    /// Writes the record into `<key>.partial`, syncs it and renames the
    /// directory to `<key>`: readers see the whole template or none.
    pub fn publish(
        &self,
        key: &str,
        record: &TemplateRecord,
        _lock: &BuildLock,
    ) -> Result<Template, TemplateError> {
        let partial = self.partial_dir(key);
        let io = |op, path: &Path, error| TemplateError::Io {
            key: key.to_owned(),
            op,
            path: path.to_owned(),
            error,
        };
        let record_path = partial.join(RECORD_FILE);
        let json = serde_json::to_vec_pretty(record).expect("template record serializes");
        std::fs::write(&record_path, json).map_err(|e| io("cannot write", &record_path, e))?;
        for name in [STATE_FILE, MEMORY_FILE, RECORD_FILE] {
            let path = partial.join(name);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io("cannot sync", &path, e))?;
        }
        let dir = self.template_dir(key);
        // A template for the same key published meanwhile is replaced: it
        // cannot be, under the lock, unless it was found bad and left.
        remove_dir_if_there(&dir).map_err(|e| io("cannot remove the old template", &dir, e))?;
        std::fs::rename(&partial, &dir)
            .map_err(|e| io("cannot rename to the template", &partial, e))?;
        File::open(&self.dir)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("cannot sync", &self.dir, e))?;
        Ok(Template {
            key: key.to_owned(),
            dir,
            record: record.clone(),
        })
    }

    /// Removes a template that cannot be used (`why` is logged). Renamed
    /// away first, so a shim looking at the same moment finds none rather
    /// than half of one; a VMM that has the files open keeps them.
    pub fn discard(&self, key: &str, why: &str) {
        let dir = self.template_dir(key);
        let away = self.dir.join(format!(
            "{key}.discarded-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        tracing::warn!(template = %key, dir = %dir.display(), reason = why, "discarding the template; the next sandbox rebuilds it");
        match std::fs::rename(&dir, &away) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir_all(&away) {
                    tracing::warn!(path = %away.display(), error = %e, "cannot remove a discarded template");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot discard the template")
            }
        }
    }
}

fn remove_dir_if_there(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `template.json` of `dir`, or why it cannot be read.
fn read_record(dir: &Path) -> Result<TemplateRecord, String> {
    let path = dir.join(RECORD_FILE);
    let mut text = String::new();
    File::open(&path)
        .and_then(|f| f.take(MAX_RECORD_LEN + 1).read_to_string(&mut text))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.len() as u64 > MAX_RECORD_LEN {
        return Err(format!(
            "{} is larger than {MAX_RECORD_LEN} bytes",
            path.display()
        ));
    }
    serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a template record: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::super::{FileId, TEMPLATE_FORMAT};
    use super::*;
    use boxlite_vmm_api::config::BalloonConfig;

    fn inputs(dir: &Path) -> TemplateInputs {
        let f = dir.join("kernel");
        std::fs::write(&f, "k").unwrap();
        let id = FileId::of(&f).unwrap();
        TemplateInputs {
            format: TEMPLATE_FORMAT,
            vmm: id.clone(),
            kernel: id.clone(),
            initramfs: id,
            cmdline: String::new(),
            vcpus: 1,
            memory_mib: 128,
            balloon: BalloonConfig::default(),
            share_tags: vec![],
            nics: 0,
        }
    }

    fn record(inputs: &TemplateInputs) -> TemplateRecord {
        TemplateRecord {
            inputs: inputs.clone(),
            snapshot_id: "abc".into(),
            nic_macs: Vec::new(),
            snapshot_ms: 2,
        }
    }

    /// Builds `<key>.partial` with the two snapshot files and publishes it.
    fn publish(store: &TemplateStore, inputs: &TemplateInputs) -> Template {
        let key = inputs.key();
        let lock = store.try_lock(&key).unwrap();
        let partial = store.fresh_partial(&key, &lock).unwrap();
        std::fs::write(partial.join(STATE_FILE), "s").unwrap();
        std::fs::write(partial.join(MEMORY_FILE), "m").unwrap();
        store.publish(&key, &record(inputs), &lock).unwrap()
    }

    #[test]
    fn a_published_template_is_found_and_a_partial_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(tmp.path().join("templates"));
        let inputs = inputs(tmp.path());
        assert_eq!(store.find(&inputs), None);
        let key = inputs.key();
        let lock = store.try_lock(&key).unwrap();
        let partial = store.fresh_partial(&key, &lock).unwrap();
        std::fs::write(partial.join(STATE_FILE), "s").unwrap();
        assert_eq!(store.find(&inputs), None, "not published yet");
        drop(lock);
        let t = publish(&store, &inputs);
        assert_eq!(store.find(&inputs), Some(t.clone()));
        assert_eq!(t.dir, store.dir().join(&key));
        assert!(!store.partial_dir(&key).exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.dir()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn the_build_lock_is_exclusive_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(tmp.path().to_owned());
        let held = store.try_lock("k").unwrap();
        let err = store.try_lock("k").unwrap_err().to_string();
        assert!(
            err.starts_with("template k: another shim is building it (lock "),
            "{err}"
        );
        assert!(store.try_lock("other").is_ok(), "per key");
        drop(held);
        store.try_lock("k").unwrap();
    }

    #[test]
    fn a_corrupt_or_foreign_template_is_discarded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(tmp.path().join("t"));
        let inputs = inputs(tmp.path());
        let t = publish(&store, &inputs);
        // A record that is not JSON.
        std::fs::write(t.dir.join(RECORD_FILE), "{garbage").unwrap();
        assert_eq!(store.find(&inputs), None);
        assert!(!t.dir.exists(), "discarded");
        // A record for other inputs under this key.
        let t = publish(&store, &inputs);
        let mut other = record(&inputs);
        other.inputs.memory_mib = 4096;
        std::fs::write(t.dir.join(RECORD_FILE), serde_json::to_vec(&other).unwrap()).unwrap();
        assert_eq!(store.find(&inputs), None);
        assert!(!t.dir.exists());
        // A missing memory file.
        let t = publish(&store, &inputs);
        std::fs::remove_file(t.memory_file()).unwrap();
        assert_eq!(store.find(&inputs), None);
        assert!(!t.dir.exists());
        // Nothing else is left in the directory but the lock.
        let left: Vec<_> = std::fs::read_dir(store.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [format!("{}.lock", inputs.key())]);
    }
}
