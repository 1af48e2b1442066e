# Shared helpers for scripts/setup.sh and scripts/test.sh. Source, don't run.
#
# Every step is idempotent: it checks what is there before it installs or
# builds, so a second run is fast and changes nothing.

set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$HOME/.cargo/bin:/usr/local/bin:$PATH"

# Debian packages the build, the tests and the qemu backend need.
APT_PACKAGES=(
    # guest kernel build (docs/architecture.md)
    linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev xz-utils
    # the qemu backend and its helper daemons' build deps
    qemu-system-x86 libseccomp-dev libcap-ng-dev pkg-config
    # test images and containers (mmdebstrap: the Debian image of the runc
    # differential suite, tests/src/debian_image.rs)
    busybox-static containerd runc mmdebstrap
    # pod networking: CNI plugins (bridge, host-local, loopback) for the CRI path
    containernetworking-plugins
    # CRI client code generation (k8s-cri) and general tools
    protobuf-compiler iproute2 procps file
    # the nested node's monitor, read when the node freezes (qemu-state.sh)
    socat
)

# crates.io tools: name, version, binary.
CARGO_TOOLS=(
    "virtiofsd 1.14.0 virtiofsd"
)

# Each step's line says how far into the run it starts (minutes:seconds since
# the first script of this run sourced this file), so a CI log shows where
# the time goes.
BOXLITE_RUN_STARTED="${BOXLITE_RUN_STARTED:-$(date +%s)}"
export BOXLITE_RUN_STARTED
log() {
    local t=$(($(date +%s) - BOXLITE_RUN_STARTED))
    printf '\033[1m==> [%d:%02d] %s\033[0m\n' $((t / 60)) $((t % 60)) "$*"
}

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
# Copies stdin to stdout and to this script's stderr. Not `tee /dev/stderr`:
# when stderr is a file (`bash scripts/test.sh >log 2>&1`), opening
# /dev/stderr opens that file again with O_TRUNC and wipes the log so far.
tee_stderr() {
    local line
    while IFS= read -r line || [ -n "$line" ]; do
        printf '%s\n' "$line"
        printf '%s\n' "$line" >&2
    done
}

build_guest_assets() {
    log "guest assets: kernel (cached by config hash), static agent, initramfs"
    local out
    out="$(cd "$REPO_ROOT" && cargo xtask guest | tee_stderr)"
    BOXLITE_KERNEL="$(printf '%s\n' "$out" | sed -n 's/^vmlinux: //p' | tail -n1)"
    BOXLITE_INITRAMFS="$(printf '%s\n' "$out" | sed -n 's/^initramfs: //p' | tail -n1)"
    if [ ! -f "$BOXLITE_KERNEL" ] || [ ! -f "$BOXLITE_INITRAMFS" ]; then
        echo "error: cargo xtask guest did not report vmlinux/initramfs paths" >&2
        exit 1
    fi
    export BOXLITE_KERNEL BOXLITE_INITRAMFS
}

# Installs BoxLite from built files: the guest kernel $2 and initramfs $3
# to /usr/share/boxlite, the shim, boxlite-vmm, boxlite-vsock and
# boxlite-smoke from directory $1 to /usr/local/bin, and the default config
# unless /etc/boxlite/boxlite.toml exists. scripts/setup.sh installs this
# machine with it; the nested test node's init installs the node with it.
install_boxlite() {
    local bin="$1" kernel="$2" initramfs="$3"
    install -D -m 0644 "$kernel" /usr/share/boxlite/vmlinux
    install -D -m 0644 "$initramfs" /usr/share/boxlite/initramfs
    install -D -m 0755 "$bin/boxlite-smoke" /usr/local/bin/boxlite-smoke
    install -D -m 0755 "$bin/containerd-shim-boxlite-v2" /usr/local/bin/containerd-shim-boxlite-v2
    # The built-in VMM: the default backend on hosts with VMX/SVM (hypervisor = "auto").
    install -D -m 0755 "$bin/boxlite-vmm" /usr/local/bin/boxlite-vmm
    # The same vsock device as a vhost-user backend, for the qemu backend.
    install -D -m 0755 "$bin/boxlite-vsock" /usr/local/bin/boxlite-vsock
    if [ -e /etc/boxlite/boxlite.toml ]; then
        echo "kept existing /etc/boxlite/boxlite.toml"
    else
        install -D -m 0644 "$REPO_ROOT/configs/boxlite.toml" /etc/boxlite/boxlite.toml
        echo "wrote /etc/boxlite/boxlite.toml (defaults; see docs/configuration.md)"
    fi
}

# Builds a one-layer OCI image of Debian's busybox-static and imports it into
# containerd as $1 (no registry is reachable: images are built locally).
import_busybox_image() {
    local name="$1" work layer_digest config_digest manifest_digest applet
    work="$(mktemp -d)"
    mkdir -p "$work/rootfs/bin" "$work/rootfs/etc" "$work/rootfs/tmp" "$work/layout/blobs/sha256"
    cp /bin/busybox "$work/rootfs/bin/busybox"
    for applet in sh echo cat ls id env sleep true false hostname uname wc head; do
        ln -sf busybox "$work/rootfs/bin/$applet"
    done
    echo "root:x:0:0:root:/:/bin/sh" > "$work/rootfs/etc/passwd"
    tar --sort=name --mtime=@0 --owner=0 --group=0 -C "$work/rootfs" -cf "$work/layer.tar" .
    layer_digest="$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
    mv "$work/layer.tar" "$work/layout/blobs/sha256/$layer_digest"
    printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$layer_digest" > "$work/config.json"
    config_digest="$(sha256sum "$work/config.json" | cut -d' ' -f1)"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config_digest" "$(stat -c %s "$work/config.json")" \
        "$layer_digest" "$(stat -c %s "$work/layout/blobs/sha256/$layer_digest")" > "$work/manifest.json"
    manifest_digest="$(sha256sum "$work/manifest.json" | cut -d' ' -f1)"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s"}}]}' \
        "$manifest_digest" "$(stat -c %s "$work/manifest.json")" "$name" > "$work/layout/index.json"
    mv "$work/config.json" "$work/layout/blobs/sha256/$config_digest"
    mv "$work/manifest.json" "$work/layout/blobs/sha256/$manifest_digest"
    echo '{"imageLayoutVersion":"1.0.0"}' > "$work/layout/oci-layout"
    tar -C "$work/layout" -cf "$work/image.tar" .
    ctr image import "$work/image.tar"
    rm -rf "$work"
}

# Registers the runtime in /etc/containerd/config.toml without touching
# anything else in it; prints "changed" when it wrote the file.
register_containerd_runtime() {
    local config=/etc/containerd/config.toml snippet="$REPO_ROOT/configs/containerd-boxlite.toml"
    if [ -f "$config" ] && grep -q 'io.containerd.boxlite.v2' "$config"; then
        return
    fi
    mkdir -p /etc/containerd
    if [ ! -s "$config" ]; then
        cp "$snippet" "$config"
    elif grep -Eq '^version *= *2' "$config"; then
        cp "$config" "$config.before-boxlite"
        { echo; grep -v '^version' "$snippet"; } >> "$config"
    else
        echo "warning: $config is not a version 2 config; not registering the runtime for CRI" >&2
        echo "         (ctr and nerdctl need only the shim on PATH; see configs/containerd-boxlite.toml)" >&2
        return
    fi
    echo changed
}

is_zombie() {
    [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" = Z ]
}

# The containerd this machine runs for itself (without systemd): not the
# private ones tests start with their own --config, and no zombies.
system_containerd_pids() {
    local pid cmd
    for pid in $(pgrep -x containerd); do
        is_zombie "$pid" && continue
        cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)"
        case "$cmd" in
            *"--config /etc/containerd/config.toml"* | *"-c /etc/containerd/config.toml"*) echo "$pid" ;;
            *"--config "* | *" -c "*) ;;
            *) echo "$pid" ;;
        esac
    done
}

# Starts containerd, or restarts it when $1 is "restart": through systemd
# when it runs, else as a background daemon logging to
# /var/log/boxlite-containerd.log.
ensure_containerd() {
    local want="$1"
    if [ "$(systemctl is-system-running 2>/dev/null)" != "offline" ] && systemctl list-unit-files containerd.service >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        if [ "$want" = restart ] || ! systemctl is-active -q containerd; then
            systemctl restart containerd
        fi
    else
        local pids pid
        pids="$(system_containerd_pids)"
        if [ "$want" = restart ] && [ -n "$pids" ]; then
            kill $pids
            for pid in $pids; do
                while kill -0 "$pid" 2>/dev/null && ! is_zombie "$pid"; do sleep 0.2; done
            done
            pids=""
        fi
        if [ -z "$pids" ]; then
            nohup containerd >>/var/log/boxlite-containerd.log 2>&1 &
        fi
    fi
    local i
    for i in $(seq 1 100); do
        ctr version >/dev/null 2>&1 && return
        sleep 0.2
    done
    echo "error: containerd did not answer on /run/containerd/containerd.sock within 20s; log: /var/log/boxlite-containerd.log (or journalctl -u containerd)" >&2
    exit 1
}
