//! The sandbox probe: `sandbox_probe.c` (beside this crate's manifest), a
//! static binary that tries one nested-sandboxing step inside a container
//! (a seccomp filter, `setresuid`, `unshare(CLONE_NEWNET)`) and prints the
//! outcome with the errno's name.

use std::path::Path;

/// The probe's C source.
pub const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/sandbox_probe.c");

/// Compiles the probe into a static binary at `out` with gcc, warnings as
/// errors; panics with gcc's output on failure.
pub fn build(out: &Path) {
    let result = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out)
        .arg(SOURCE)
        .output()
        .expect("run gcc (the sandbox probe is built with gcc -static)");
    assert!(
        result.status.success(),
        "gcc -static {SOURCE}: {}\n{}",
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
}

/// The nested-sandboxing script run in a container with the probe at
/// `/bin/sandbox-probe`: `unshare -n` with busybox, then each probe step,
/// every step printing its result and then its exit status (stderr goes to
/// stdout so the order is fixed); last the `/proc/self/status` lines whose
/// names match `status_fields` (an ERE alternation, `CapEff|NoNewPrivs`).
pub fn nested_script(status_fields: &str) -> String {
    format!(
        "exec 2>&1
unshare -n sh -c 'ip link'; echo unshare=$?
sandbox-probe unshare-net; echo probe-unshare=$?
sandbox-probe seccomp nnp; echo seccomp-nnp=$?
sandbox-probe seccomp; echo seccomp=$?
sandbox-probe setresuid 1234; echo setresuid=$?
grep -E '^({status_fields}):' /proc/self/status"
    )
}
