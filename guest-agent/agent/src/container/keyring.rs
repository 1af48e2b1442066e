//! A container's session keyring, joined between fork and exec of the
//! helper so every process of the container inherits it.

use std::ffi::CStr;

/// `KEY_USR_SEARCH` (linux/key.h): the owner may find the keyring by name.
const KEY_USR_SEARCH: u32 = 0x0008_0000;

/// The session keyring of a container, as runc sets it up: every process
/// of the container (its init and every exec) joins the keyring
/// `_ses.<container id>`, created on the first join, so containers do not
/// share the agent's session keyring (libcontainer 0.7 does no keyring
/// set-up at all), and the keyring gets runc's extra permission bit
/// `KEY_USR_SEARCH` so that the next exec can join it by name.
///
/// Runs in the helper between fork and exec: raw syscalls on memory that
/// exists before the fork, no allocation, no locks. A kernel without keys
/// (ENOSYS) is not an error, as in runc.
pub fn join_session_keyring(name: &CStr) -> std::io::Result<()> {
    let keyctl = |op: u32, a: libc::c_ulong, b: libc::c_ulong, c: libc::c_ulong| {
        // SAFETY: keyctl(2) with plain integers or pointers into live
        // buffers (`name`, `buf` below) and their true lengths.
        let rc = unsafe { libc::syscall(libc::SYS_keyctl, op as libc::c_ulong, a, b, c) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    let id = match keyctl(
        libc::KEYCTL_JOIN_SESSION_KEYRING,
        name.as_ptr() as libc::c_ulong,
        0,
        0,
    ) {
        Ok(id) => id as libc::c_ulong,
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => return Ok(()),
        Err(e) => return Err(e),
    };
    // "type;uid;gid;perm;description": the perm field is the 4th, in hex.
    let mut buf = [0u8; 512];
    let len = keyctl(
        libc::KEYCTL_DESCRIBE,
        id,
        buf.as_mut_ptr() as libc::c_ulong,
        buf.len() as libc::c_ulong,
    )?;
    let desc = &buf[..(len as usize).min(buf.len())];
    let field = desc.split(|&b| b == b';').nth(3).unwrap_or_default();
    if field.is_empty() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut perm: u32 = 0;
    for &b in field {
        let digit = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            _ => return Err(std::io::Error::from_raw_os_error(libc::EINVAL)),
        };
        perm = perm.wrapping_shl(4) | u32::from(digit);
    }
    keyctl(
        libc::KEYCTL_SETPERM,
        id,
        libc::c_ulong::from(perm | KEY_USR_SEARCH),
        0,
    )?;
    Ok(())
}
