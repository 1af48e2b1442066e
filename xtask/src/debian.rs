//! Debian root filesystems by `mmdebstrap`: what every slim image of ours
//! shares (the nested test node's root disk, [`crate::node_image`], and
//! the tests' Debian container image, `tests/src/debian_image.rs`).

/// mmdebstrap's arguments for a slim root in `format` ("tar",
/// "directory", …) with the image's own `--customize-hook`s, before
/// `--include`, suite and target:
/// - `minbase`: the required packages and apt, nothing else;
/// - root mode: real owners in the output, and hooks can chroot;
/// - no documentation, manuals, info pages or translations: a third of
///   the size, and nothing here reads them;
/// - no `/dev`: the container runtime, or the node's devtmpfs, makes it.
pub fn mmdebstrap_slim_args(format: &str, customize_hooks: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--variant=minbase".to_owned(),
        "--mode=root".to_owned(),
        format!("--format={format}"),
        "--dpkgopt=path-exclude=/usr/share/doc/*".to_owned(),
        "--dpkgopt=path-exclude=/usr/share/man/*".to_owned(),
        "--dpkgopt=path-exclude=/usr/share/info/*".to_owned(),
        "--dpkgopt=path-exclude=/usr/share/locale/*".to_owned(),
        "--skip=output/dev".to_owned(),
    ];
    args.extend(
        customize_hooks
            .iter()
            .map(|hook| format!("--customize-hook={hook}")),
    );
    args
}
