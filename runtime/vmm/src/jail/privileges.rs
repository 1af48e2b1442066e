//! Becoming an unprivileged user with no capabilities.
//!
//! Done last among the steps that need root (after the cgroup, the mount
//! namespace and pivot_root): the bounding set is emptied first (that needs
//! CAP_SETPCAP), then the supplementary groups, gid and uid are set; moving
//! every uid away from 0 clears the permitted and effective sets, and the
//! ambient set is cleared explicitly.

use crate::config::JailUser;

use super::JailError;

/// uid and gid when the config names none (`nobody`).
pub const DEFAULT_USER: JailUser = JailUser::NOBODY;

/// `linux/capability.h`.
const CAP_KILL: u32 = 5;

fn err(what: &'static str) -> JailError {
    JailError::Privileges(what, std::io::Error::last_os_error())
}

/// Keeps only CAP_KILL, for the waiting parent (`super::pidns`): the
/// kernel checks the parent-death signal like any kill, so without it a
/// parent dying as root would not reach the VM process once that runs as
/// the jail's uid.
pub fn keep_only_kill() -> Result<(), JailError> {
    let kill = 1u64 << CAP_KILL;
    drop_bounding_set(kill)?;
    set_capability_sets(kill)
}

/// Empties the bounding set but for the capabilities in `keep` (a mask;
/// needs CAP_SETPCAP: before leaving root).
fn drop_bounding_set(keep: u64) -> Result<(), JailError> {
    for cap in 0..64u32 {
        if keep & (1u64 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integers; EINVAL past the last capability.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err("prctl(PR_CAPBSET_DROP)"));
        }
    }
    Ok(())
}

/// Empties the ambient and inheritable sets and sets the effective and
/// permitted sets to `keep`.
fn set_capability_sets(keep: u64) -> Result<(), JailError> {
    // SAFETY: prctl with integers.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(err("prctl(PR_CAP_AMBIENT_CLEAR_ALL)"));
    }
    // capset(2) with version 3: two 32-bit words of each set, all zero.
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let word = |i: u32| (keep >> (32 * i)) as u32;
    let data = [0, 1].map(|i| Data {
        effective: word(i),
        permitted: word(i),
        inheritable: 0,
    });
    // SAFETY: header and data are valid for the v3 layout the kernel reads.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(err("capset"));
    }
    Ok(())
}

/// Drops every capability and becomes `user` (no supplementary groups).
/// uid or gid 0 is refused: the jail would not be one.
pub fn become_user(user: JailUser) -> Result<(), JailError> {
    if user.uid == 0 || user.gid == 0 {
        return Err(JailError::RootUser(user.uid, user.gid));
    }
    drop_bounding_set(0)?;
    // SAFETY: an empty group list.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(err("setgroups"));
    }
    // SAFETY: integers only.
    if unsafe { libc::setresgid(user.gid, user.gid, user.gid) } != 0 {
        return Err(err("setresgid"));
    }
    // SAFETY: integers only.
    if unsafe { libc::setresuid(user.uid, user.uid, user.uid) } != 0 {
        return Err(err("setresuid"));
    }
    set_capability_sets(0)
}
