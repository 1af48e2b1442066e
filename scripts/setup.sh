#!/usr/bin/env bash
# BoxLite set-up (README: the main command). Run as root on Debian 12.
#
# Installs what BoxLite needs (Debian packages, virtiofsd and
# vhost-device-vsock from crates.io), builds the guest kernel (cached by its
# config hash), the static guest agent and the initramfs, installs them with
# the tools and a default config, then boots a sandbox micro-VM and talks to
# its agent. Idempotent: run it again after a pull.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root
cd "$REPO_ROOT"

ensure_apt_packages
ensure_cargo_tools
build_guest_assets

log "host tools: cargo build --release"
cargo build --release --quiet -p boxlite-runtime --bin boxlite-smoke

log "install: guest assets, tools, config"
install -D -m 0644 "$BOXLITE_KERNEL" /usr/share/boxlite/vmlinux
install -D -m 0644 "$BOXLITE_INITRAMFS" /usr/share/boxlite/initramfs
install -D -m 0755 target/release/boxlite-smoke /usr/local/bin/boxlite-smoke
if [ -e /etc/boxlite/boxlite.toml ]; then
    echo "kept existing /etc/boxlite/boxlite.toml"
else
    install -D -m 0644 configs/boxlite.toml /etc/boxlite/boxlite.toml
    echo "wrote /etc/boxlite/boxlite.toml (defaults; see docs/configuration.md)"
fi

log "smoke test: boot a sandbox micro-VM and talk to its agent"
boxlite-smoke

cat <<EOT

BoxLite is set up:
  guest kernel     /usr/share/boxlite/vmlinux
  guest initramfs  /usr/share/boxlite/initramfs
  config           /etc/boxlite/boxlite.toml
  tools            /usr/local/bin/boxlite-smoke
  sandbox state    /run/boxlite/<sandbox-id>/ (console.log, helper logs; kept when a boot fails)
Run 'boxlite-smoke --runs 5' to time boots on this host.
EOT
