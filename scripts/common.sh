# Shared helpers for scripts/setup.sh and scripts/test.sh. Source, don't run.
#
# Every step is idempotent: it checks what is there before it installs or
# builds, so a second run is fast and changes nothing.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/bin:$PATH"

# Debian packages the build, the tests and the qemu backend need.
APT_PACKAGES=(
    # guest kernel build (DESIGN.md §3)
    linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils
    # the qemu backend and its helper daemons' build deps
    qemu-system-x86 libseccomp-dev libcap-ng-dev pkg-config
    # test images and containers
    busybox-static containerd runc
    # CRI client code generation (k8s-cri) and general tools
    protobuf-compiler iproute2 procps file
)

# crates.io tools: name, version, binary.
CARGO_TOOLS=(
    "virtiofsd 1.14.0 virtiofsd"
    "vhost-device-vsock 0.3.0 vhost-device-vsock"
)

log() { printf '\033[1m==> %s\033[0m\n' "$*"; }

require_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: $0 must run as root (it installs packages and starts VMs)" >&2
        exit 1
    fi
}

ensure_apt_packages() {
    local missing=()
    local pkg
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "apt packages: all present"
        return
    fi
    log "apt packages: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}

ensure_cargo_tools() {
    local entry name version bin
    for entry in "${CARGO_TOOLS[@]}"; do
        read -r name version bin <<<"$entry"
        if command -v "$bin" >/dev/null 2>&1 && cargo install --list | grep -q "^$name v$version:"; then
            log "cargo tool $name $version: present"
            continue
        fi
        log "cargo tool $name $version: installing (takes a few minutes the first time)"
        cargo install --locked "$name@$version"
    done
}

# Builds kernel (cached by fragment hash), static agent and initramfs; exports
# BOXLITE_KERNEL and BOXLITE_INITRAMFS.
build_guest_assets() {
    log "guest assets: kernel (cached by config hash), static agent, initramfs"
    local out
    out="$(cd "$REPO_ROOT" && cargo xtask guest | tee /dev/stderr)"
    BOXLITE_KERNEL="$(printf '%s\n' "$out" | sed -n 's/^vmlinux: //p' | tail -n1)"
    BOXLITE_INITRAMFS="$(printf '%s\n' "$out" | sed -n 's/^initramfs: //p' | tail -n1)"
    if [ ! -f "$BOXLITE_KERNEL" ] || [ ! -f "$BOXLITE_INITRAMFS" ]; then
        echo "error: cargo xtask guest did not report vmlinux/initramfs paths" >&2
        exit 1
    fi
    export BOXLITE_KERNEL BOXLITE_INITRAMFS
}
