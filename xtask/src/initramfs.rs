//! A gzip-compressed newc cpio archive (an initramfs), written by our own code.
//!
//! ```no_run
//! # use xtask::initramfs::Initramfs;
//! Initramfs::new()
//!     .dir("/dev", 0o755)
//!     .file("/init", "/path/to/agent", 0o755)
//!     .symlink("/bin/sh", "busybox")
//!     .write_to("initramfs.cpio.gz".as_ref())?;
//! # Ok::<(), xtask::initramfs::InitramfsError>(())
//! ```
//!
//! The output is deterministic: entries are sorted by path, every entry has
//! uid/gid 0 and mtime 0, inode numbers follow the sorted order, and the gzip
//! header carries no name or time. Identical inputs give identical bytes.
//! Missing parent directories are added with mode 0755, so the kernel (which
//! creates nothing implicitly while unpacking) always sees a parent before its
//! children.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use cpio::newc::{self, ModeFileType};
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::artefact;

/// Mode bits an entry may carry: permissions plus setuid/setgid/sticky.
const PERMISSION_BITS: u32 = 0o7777;
/// Mode of parent directories that were not listed explicitly.
const IMPLICIT_DIR_MODE: u32 = 0o755;

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("initramfs path {path:?} is invalid: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    #[error("initramfs entry {path}: mode {mode:#o} has bits outside {PERMISSION_BITS:#o}")]
    InvalidMode { path: String, mode: u32 },
    #[error("initramfs entry {path} is listed twice with different contents")]
    Duplicate { path: String },
    #[error("initramfs entry {path} is inside {parent}, which is not a directory")]
    ParentNotDir { path: String, parent: String },
    #[error("cannot read {host} for initramfs entry {path}")]
    ReadHostFile {
        path: String,
        host: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("initramfs entry {path} is {len} bytes, more than newc's 4 GiB limit")]
    TooLarge { path: String, len: u64 },
    #[error("cannot write the initramfs archive")]
    Write(#[source] io::Error),
    #[error("cannot write initramfs {path}")]
    Install {
        path: PathBuf,
        #[source]
        source: artefact::ArtefactError,
    },
}

/// Where a regular file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Contents {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Dir,
    File(Contents),
    Symlink(String),
    CharDevice { major: u32, minor: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    mode: u32,
}

/// The list of entries of an initramfs; see the module documentation.
///
/// The builder methods only record entries; paths, modes and host files are
/// checked when the archive is written, and the first problem is returned.
#[derive(Debug, Clone, Default)]
pub struct Initramfs {
    entries: Vec<(String, Entry)>,
}

impl Initramfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory with permission bits `mode`.
    pub fn dir(self, path: &str, mode: u32) -> Self {
        self.push(path, Kind::Dir, mode)
    }

    /// A regular file whose contents are read from `host_path` when the
    /// archive is written.
    pub fn file(self, path: &str, host_path: impl Into<PathBuf>, mode: u32) -> Self {
        self.push(path, Kind::File(Contents::Host(host_path.into())), mode)
    }

    /// A regular file with the given contents.
    pub fn file_bytes(self, path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        self.push(path, Kind::File(Contents::Bytes(contents.into())), mode)
    }

    /// A symbolic link at `path` pointing to `target` (stored verbatim).
    pub fn symlink(self, path: &str, target: &str) -> Self {
        self.push(path, Kind::Symlink(target.to_owned()), 0o777)
    }

    /// A character device node, e.g. `/dev/console` (5, 1): the kernel opens
    /// it for PID 1's stdio before devtmpfs is mounted.
    pub fn char_device(self, path: &str, mode: u32, major: u32, minor: u32) -> Self {
        self.push(path, Kind::CharDevice { major, minor }, mode)
    }

    fn push(mut self, path: &str, kind: Kind, mode: u32) -> Self {
        self.entries.push((path.to_owned(), Entry { kind, mode }));
        self
    }

    /// Writes the gzip-compressed archive to `out`, atomically: a temporary
    /// file in the same directory is renamed over `out` once complete.
    pub fn write_to(&self, out: &Path) -> Result<(), InitramfsError> {
        // Built in memory first, so a bad entry fails before `out` is touched.
        let bytes = self.to_bytes()?;
        artefact::write_atomic(out, 0o644, |file| file.write_all(&bytes)).map_err(|source| {
            InitramfsError::Install {
                path: out.to_owned(),
                source,
            }
        })
    }

    /// The gzip-compressed archive as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, InitramfsError> {
        write_archive(&self.resolve()?, Vec::new())
    }

    /// Validates and normalises the entries, adds missing parents and sorts.
    fn resolve(&self) -> Result<BTreeMap<String, Entry>, InitramfsError> {
        let mut tree: BTreeMap<String, Entry> = BTreeMap::new();
        for (raw, entry) in &self.entries {
            let path = normalise(raw)?;
            if entry.mode & !PERMISSION_BITS != 0 {
                return Err(InitramfsError::InvalidMode {
                    path,
                    mode: entry.mode,
                });
            }
            match tree.get(&path) {
                Some(existing) if existing != entry => {
                    return Err(InitramfsError::Duplicate { path });
                }
                _ => {
                    tree.insert(path, entry.clone());
                }
            }
        }
        let paths: Vec<String> = tree.keys().cloned().collect();
        for path in paths {
            let mut parent = path.as_str();
            while let Some((p, _)) = parent.rsplit_once('/') {
                parent = p;
                match tree.get(parent) {
                    Some(Entry {
                        kind: Kind::Dir, ..
                    }) => {}
                    Some(_) => {
                        return Err(InitramfsError::ParentNotDir {
                            parent: parent.to_owned(),
                            path: path.clone(),
                        })
                    }
                    None => {
                        tree.insert(
                            parent.to_owned(),
                            Entry {
                                kind: Kind::Dir,
                                mode: IMPLICIT_DIR_MODE,
                            },
                        );
                    }
                }
            }
        }
        Ok(tree)
    }
}

/// `/a//b/` → `a/b`; rejects empty paths, `.` and `..` components.
fn normalise(raw: &str) -> Result<String, InitramfsError> {
    let invalid = |reason| InitramfsError::InvalidPath {
        path: raw.to_owned(),
        reason,
    };
    let mut parts = Vec::new();
    for part in raw.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(invalid("`.` and `..` components are not allowed"));
        }
        if part.contains('\0') {
            return Err(invalid("it contains a NUL byte"));
        }
        parts.push(part);
    }
    if parts.is_empty() {
        return Err(invalid("it names the archive root"));
    }
    Ok(parts.join("/"))
}

fn write_archive<W: Write>(entries: &BTreeMap<String, Entry>, out: W) -> Result<W, InitramfsError> {
    // Default level: gzip decompression speed barely depends on it, and the
    // kernel unpacks the archive on every boot.
    let mut gz = GzEncoder::new(out, Compression::default());
    for (ino, (path, entry)) in (1u32..).zip(entries) {
        let builder = newc::Builder::new(path).ino(ino).mode(entry.mode);
        match &entry.kind {
            Kind::Dir => {
                let builder = builder.nlink(2).set_mode_file_type(ModeFileType::Directory);
                write_entry(&mut gz, builder, path, &[])?;
            }
            Kind::File(contents) => {
                let builder = builder.set_mode_file_type(ModeFileType::Regular);
                match contents {
                    Contents::Bytes(bytes) => write_entry(&mut gz, builder, path, bytes)?,
                    Contents::Host(host) => {
                        let bytes =
                            std::fs::read(host).map_err(|source| InitramfsError::ReadHostFile {
                                path: path.clone(),
                                host: host.clone(),
                                source,
                            })?;
                        write_entry(&mut gz, builder, path, &bytes)?;
                    }
                }
            }
            Kind::Symlink(target) => {
                let builder = builder.set_mode_file_type(ModeFileType::Symlink);
                write_entry(&mut gz, builder, path, target.as_bytes())?;
            }
            Kind::CharDevice { major, minor } => {
                let builder = builder
                    .rdev_major(*major)
                    .rdev_minor(*minor)
                    .set_mode_file_type(ModeFileType::Char);
                write_entry(&mut gz, builder, path, &[])?;
            }
        }
    }
    let gz = newc::trailer(gz).map_err(InitramfsError::Write)?;
    let mut out = gz.finish().map_err(InitramfsError::Write)?;
    out.flush().map_err(InitramfsError::Write)?;
    Ok(out)
}

fn write_entry<W: Write>(
    out: &mut W,
    builder: newc::Builder,
    path: &str,
    data: &[u8],
) -> Result<(), InitramfsError> {
    let len = u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge {
        path: path.to_owned(),
        len: data.len() as u64,
    })?;
    let mut writer = builder.write(out, len);
    writer.write_all(data).map_err(InitramfsError::Write)?;
    writer.finish().map_err(InitramfsError::Write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// One entry as read back: name, mode, uid, gid, mtime, rdev, data.
    #[derive(Debug, PartialEq)]
    struct ReadEntry {
        name: String,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: u32,
        rdev: (u32, u32),
        data: Vec<u8>,
    }

    fn read_back(gz: &[u8]) -> Vec<ReadEntry> {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut raw)
            .expect("gunzip");
        let mut rest: &[u8] = &raw;
        let mut entries = Vec::new();
        loop {
            let mut reader = newc::Reader::new(rest).expect("cpio header");
            if reader.entry().is_trailer() {
                break;
            }
            let e = reader.entry().clone();
            let mut data = Vec::new();
            reader.read_to_end(&mut data).expect("cpio data");
            entries.push(ReadEntry {
                name: e.name().to_owned(),
                mode: e.mode(),
                uid: e.uid(),
                gid: e.gid(),
                mtime: e.mtime(),
                rdev: (e.rdev_major(), e.rdev_minor()),
                data,
            });
            rest = reader.finish().expect("cpio entry end");
        }
        entries
    }

    fn sample(host_file: &Path) -> Initramfs {
        Initramfs::new()
            .file("/init", host_file, 0o755)
            .dir("/dev", 0o755)
            .dir("/tmp", 0o1777)
            .char_device("/dev/console", 0o600, 5, 1)
            .symlink("/bin/sh", "busybox")
            .file_bytes("/etc/hostname", "guest\n", 0o644)
    }

    #[test]
    fn round_trip_names_modes_and_contents() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().join("agent");
        std::fs::write(&host, b"\x7fELF not really").expect("write host file");

        let entries = read_back(&sample(&host).to_bytes().expect("archive"));
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        // Sorted, with the implicit parents `bin` and `etc` added.
        assert_eq!(
            names,
            [
                "bin",
                "bin/sh",
                "dev",
                "dev/console",
                "etc",
                "etc/hostname",
                "init",
                "tmp"
            ]
        );
        let get = |name: &str| entries.iter().find(|e| e.name == name).expect(name);

        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("init").data, b"\x7fELF not really");
        assert_eq!(get("dev").mode, 0o040755);
        assert_eq!(get("tmp").mode, 0o041777);
        assert_eq!(get("bin").mode, 0o040755);
        assert_eq!(get("bin/sh").mode, 0o120777);
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("dev/console").mode, 0o020600);
        assert_eq!(get("dev/console").rdev, (5, 1));
        assert_eq!(get("etc/hostname").mode, 0o100644);
        assert_eq!(get("etc/hostname").data, b"guest\n");
        for e in &entries {
            assert_eq!((e.uid, e.gid, e.mtime), (0, 0, 0), "{}", e.name);
        }
    }

    #[test]
    fn identical_inputs_give_identical_bytes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let host = dir.path().join("agent");
        std::fs::write(&host, vec![0xa5; 100_000]).expect("write host file");

        let a = sample(&host).to_bytes().expect("archive a");
        // Touching the host file changes its mtime, not the archive.
        std::fs::write(&host, vec![0xa5; 100_000]).expect("rewrite host file");
        // Insertion order does not matter either.
        let b = Initramfs::new()
            .file_bytes("/etc/hostname", "guest\n", 0o644)
            .symlink("/bin/sh", "busybox")
            .char_device("/dev/console", 0o600, 5, 1)
            .dir("/tmp", 0o1777)
            .dir("/dev", 0o755)
            .file("/init", &host, 0o755)
            .to_bytes()
            .expect("archive b");
        assert_eq!(a, b);

        let out = dir.path().join("initramfs.cpio.gz");
        sample(&host).write_to(&out).expect("write_to");
        assert_eq!(std::fs::read(&out).expect("read back"), a);
    }

    #[test]
    fn paths_are_normalised_and_validated() {
        let entries = read_back(
            &Initramfs::new()
                .dir("run//boxlite/", 0o700)
                .to_bytes()
                .expect("archive"),
        );
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["run", "run/boxlite"]);
        assert_eq!(entries[1].mode, 0o040700);

        for bad in ["/", "", "/a/../b", "./x"] {
            let err = Initramfs::new().dir(bad, 0o755).to_bytes().unwrap_err();
            assert!(
                matches!(err, InitramfsError::InvalidPath { .. }),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn bad_entries_are_rejected_by_name() {
        let err = Initramfs::new().dir("/x", 0o40755).to_bytes().unwrap_err();
        assert!(matches!(err, InitramfsError::InvalidMode { .. }), "{err}");

        let err = Initramfs::new()
            .dir("/x", 0o755)
            .dir("/x", 0o700)
            .to_bytes()
            .unwrap_err();
        assert!(matches!(err, InitramfsError::Duplicate { .. }), "{err}");
        // The same entry twice is fine.
        Initramfs::new()
            .dir("/x", 0o755)
            .dir("/x", 0o755)
            .to_bytes()
            .expect("identical duplicate");

        let err = Initramfs::new()
            .file_bytes("/a", "", 0o644)
            .file_bytes("/a/b", "", 0o644)
            .to_bytes()
            .unwrap_err();
        assert!(matches!(err, InitramfsError::ParentNotDir { .. }), "{err}");

        let err = Initramfs::new()
            .file("/init", "/nonexistent/boxlite-agent", 0o755)
            .to_bytes()
            .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/boxlite-agent"),
            "{err}"
        );
        assert!(err.to_string().contains("init"), "{err}");
    }

    #[test]
    fn failed_write_leaves_no_artefact() {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("initramfs.cpio.gz");
        Initramfs::new()
            .file("/init", dir.path().join("missing"), 0o755)
            .write_to(&out)
            .unwrap_err();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .expect("read_dir")
            .collect::<Result<_, _>>()
            .expect("entries");
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
