#!/usr/bin/env bash
# The whole test suite (README: "Run the tests"). Run as root on Debian 12.
#
# 1. installs what the tests need (idempotent; see scripts/common.sh),
# 2. checks formatting and clippy (-D warnings),
# 3. builds the guest kernel (cached by its config hash), the static agent and
#    the initramfs,
# 4. runs the unit and host-side tests (no root, KVM or QEMU needed),
# 5. runs the #[ignore]d VM tests: real guests under QEMU (TCG here), which
#    need root, QEMU, virtiofsd, vhost-device-vsock and the guest assets.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root
cd "$REPO_ROOT"

ensure_apt_packages
ensure_cargo_tools

log "format: cargo fmt --check"
cargo fmt --all --check
log "lint: cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

build_guest_assets

log "tests: unit and host-side"
cargo test --workspace

log "tests: VM tests (QEMU; kernel $BOXLITE_KERNEL, initramfs $BOXLITE_INITRAMFS)"
cargo test --workspace -- --ignored --test-threads=1
