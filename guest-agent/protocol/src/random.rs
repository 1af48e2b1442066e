//! Bytes from the kernel's CSPRNG (`getrandom(2)`), for what the host and
//! the VMM must not share with anything else: snapshot ids, the entropy a
//! sandbox's guest is seeded with, a VMM's first vsock port.

use std::io;

/// Fills `buf` from the kernel's CSPRNG, blocking only until the kernel's
/// pool is initialised (early boot).
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most the `buf.len() - filled` bytes that
        // remain of `buf`, a live exclusive borrow.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fills_the_whole_buffer_with_fresh_bytes() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        super::fill(&mut a).unwrap();
        super::fill(&mut b).unwrap();
        assert_ne!(a, [0; 64]);
        assert_ne!(a, b);
        super::fill(&mut []).unwrap();
    }
}
