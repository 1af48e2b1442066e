//! `/proc/self/mountinfo`: the one parser of the project. The agent reads it
//! for the virtio-fs shares it mounted, the shim for what is still mounted
//! under a container's directory before it removes it, and the tests for
//! what a run left behind and which file system holds a path. It lives
//! here, in the crate every other one already depends on, because it needs
//! nothing but std.
//!
//! A line holds `id parent major:minor root mount_point options`, the
//! optional fields, a lone `-`, then `fstype source super_options`; the
//! kernel escapes space, tab, newline and backslash in paths as `\ooo`.
//! Mount points are any bytes, so the text is taken as bytes, never as
//! UTF-8.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// The calling process's mount table.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: PathBuf,
    /// The mount point's own options (`ro`, `nosuid`, `relatime`, …).
    pub options: Vec<String>,
    /// The optional fields: propagation (`shared:N`, `master:N`, …).
    pub optional: Vec<String>,
    pub fstype: String,
    /// The mount source (a device, a virtio-fs tag, `tmpfs`, …).
    pub source: String,
    /// The file system's (superblock's) options; empty if the line has none.
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// Whether `option` is among the mount point's own options.
    pub fn has_option(&self, option: &str) -> bool {
        self.options.iter().any(|o| o == option)
    }

    /// Whether the mount point is read-only (`ro`).
    pub fn is_read_only(&self) -> bool {
        self.has_option("ro")
    }
}

/// Parses mountinfo text; malformed lines are skipped.
pub fn parse(text: &[u8]) -> Vec<MountEntry> {
    lines(text).filter_map(parse_line).collect()
}

/// The mount points of mountinfo text (field 5 of each line), in order,
/// without parsing the rest of the line.
pub fn mount_points(text: &[u8]) -> impl Iterator<Item = PathBuf> + '_ {
    lines(text)
        .filter_map(|line| fields(line).nth(4))
        .map(path_of)
}

/// The mount points of mountinfo text at or under `dir`, deepest first:
/// the order to unmount them in.
pub fn mount_points_under(text: &[u8], dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = mount_points(text).filter(|p| p.starts_with(dir)).collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&b| b == b'\n')
}

fn fields(part: &[u8]) -> impl Iterator<Item = &[u8]> {
    part.split(|&b| b == b' ')
}

fn parse_line(line: &[u8]) -> Option<MountEntry> {
    // The optional fields end at " - "; fstype and source follow it.
    let sep = line.windows(3).position(|w| w == b" - ")?;
    let left: Vec<&[u8]> = fields(&line[..sep]).collect();
    let mut right = fields(&line[sep + 3..]);
    Some(MountEntry {
        mount_point: path_of(left.get(4)?),
        options: comma_list(left.get(5)?),
        optional: left[6..].iter().map(|f| text_of(f)).collect(),
        fstype: text_of(right.next()?),
        source: text_of(&unescape(right.next()?)),
        super_options: right.next().map(comma_list).unwrap_or_default(),
    })
}

fn text_of(field: &[u8]) -> String {
    String::from_utf8_lossy(field).into_owned()
}

fn comma_list(field: &[u8]) -> Vec<String> {
    field.split(|&b| b == b',').map(text_of).collect()
}

fn path_of(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …) byte-wise.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            if let Some(byte) = field.get(i + 1..i + 4).and_then(octal_byte) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Three octal digits as one byte (`None` if not digits or above 0o377).
fn octal_byte(digits: &[u8]) -> Option<u8> {
    let mut value = 0u32;
    for &d in digits {
        if !(b'0'..=b'7').contains(&d) {
            return None;
        }
        value = value * 8 + u32::from(d - b'0');
    }
    u8::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn parses_mountinfo() {
        let text = b"\
22 1 0:20 / / rw,relatime - rootfs rootfs rw
30 22 0:27 / /run/boxlite/shares/share0 ro,relatime - virtiofs share0 rw
31 22 0:28 / /mnt/with\\040space rw shared:5 master:2 - tmpfs my\\040tmp rw,size=10k
garbage line
";
        let m = parse(text);
        assert_eq!(m.len(), 3);
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            m[1],
            MountEntry {
                mount_point: "/run/boxlite/shares/share0".into(),
                options: list(&["ro", "relatime"]),
                optional: Vec::new(),
                fstype: "virtiofs".into(),
                source: "share0".into(),
                super_options: list(&["rw"]),
            }
        );
        assert!(m[1].is_read_only());
        assert_eq!(m[2].mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(m[2].source, "my tmp");
        assert_eq!(m[2].optional, list(&["shared:5", "master:2"]));
        assert_eq!(m[2].super_options, list(&["rw", "size=10k"]));
        assert!(!m[2].is_read_only());
    }

    #[test]
    fn escapes() {
        assert_eq!(unescape(b"/a\\040b"), b"/a b");
        assert_eq!(unescape(b"/plain"), b"/plain");
        assert_eq!(unescape(b"/tab\\011"), b"/tab\t");
        assert_eq!(unescape(b"a\\134b\\"), b"a\\b\\");
        // Not escapes: too short, not octal, above 0o377; raw non-UTF-8
        // bytes stay as they are.
        assert_eq!(unescape(b"/a\\04"), b"/a\\04");
        assert_eq!(unescape(b"/a\\089"), b"/a\\089");
        assert_eq!(unescape(b"/a\\777"), b"/a\\777");
        assert_eq!(unescape(b"/\xff\\134x"), b"/\xff\\x");
    }

    /// A mount point with bytes that are not UTF-8 (any other mount on the
    /// host can have one) is still found: reading mountinfo as text failed
    /// on it, and the failure read as "nothing mounted".
    #[test]
    fn mount_points_are_bytes() {
        let info = b"36 25 0:31 / /run/a\\040b rw - tmpfs tmpfs rw\n\
                     37 25 0:32 / /run/x\xffy rw - tmpfs tmpfs rw\n";
        let points: Vec<PathBuf> = mount_points(info).collect();
        assert_eq!(points[0], Path::new("/run/a b"));
        assert_eq!(points[1].as_os_str().as_bytes(), b"/run/x\xffy");
        assert_eq!(points.len(), 2);
        assert_eq!(parse(info)[1].mount_point, points[1]);
    }

    #[test]
    fn mount_points_under_a_dir_come_deepest_first() {
        let info = b"1 0 0:1 / / rw - ext4 /dev/root rw\n\
                     2 1 0:2 / /run/c rw - tmpfs tmpfs rw\n\
                     3 2 0:3 / /run/c/a/b rw - tmpfs tmpfs rw\n\
                     4 2 0:4 / /run/cc rw - tmpfs tmpfs rw\n\
                     5 2 0:5 / /run/c/a rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mount_points_under(info, Path::new("/run/c")),
            ["/run/c/a/b", "/run/c/a", "/run/c"].map(PathBuf::from)
        );
    }
}
