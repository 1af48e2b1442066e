// Included (include!) by the agent's sandboxing tests and by the
// workspace's guest tests (tests/guest_containers.rs): one recipe for
// building the sandbox probe.

/// Compiles `src` (the sandbox probe, `tests/helpers/sandbox_probe.c`) into
/// a static binary at `out` with gcc, warnings as errors; panics with gcc's
/// output on failure.
fn build_sandbox_probe(src: &std::path::Path, out: &std::path::Path) {
    let result = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
        .arg(out)
        .arg(src)
        .output()
        .expect("run gcc (the sandbox probe is built with gcc -static)");
    assert!(
        result.status.success(),
        "gcc -static {}: {}\n{}",
        src.display(),
        result.status,
        String::from_utf8_lossy(&result.stderr)
    );
}
