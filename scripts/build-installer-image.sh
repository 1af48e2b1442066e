#!/usr/bin/env bash
# Builds the image of the BoxLite node installer DaemonSet (k8s/installer.yaml)
# as an OCI image archive that `ctr -n k8s.io image import` loads: no
# registry and no docker/buildah needed.
#
#   bash scripts/build-installer-image.sh [--from-node] [--out FILE] [--import]
#
# The image holds the static `boxlite-node-installer` and its payload:
#   /payload/bin/    containerd-shim-boxlite-v2, boxlite-vmm, boxlite-vsock,
#                    virtiofsd
#   /payload/share/  vmlinux, initramfs (the guest)
#   /payload/etc/boxlite.toml  the default config pointing at /opt/boxlite
#
# Where the payload comes from:
#   default      this checkout's build outputs: the shim, boxlite-vmm and
#                boxlite-vsock from target/release (BOXLITE_BUILD_DIR; build
#                them with `cargo build --release -p containerd-shim-boxlite-v2
#                -p boxlite-vmm` first), the guest from `cargo xtask guest`
#                (or BOXLITE_KERNEL/BOXLITE_INITRAMFS), helpers from PATH;
#   --from-node  the files scripts/setup.sh installed on this machine
#                (/usr/local/bin, /usr/share/boxlite).
# The payload's binaries other than the installer are linked like on the
# build machine (glibc): build on the distribution the nodes run (Debian 12).
#
# Writes build/boxlite-node-installer.tar (or --out FILE); --import also
# imports it into this machine's containerd (namespace k8s.io).

source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

IMAGE_NAME=docker.io/boxlite/node-installer:dev
TARGET=x86_64-unknown-linux-gnu
FROM_NODE=0
IMPORT=0
OUT="$REPO_ROOT/build/boxlite-node-installer.tar"

while [ $# -gt 0 ]; do
    case "$1" in
        --from-node) FROM_NODE=1 ;;
        --import) IMPORT=1 ;;
        --out) OUT="$2"; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

die() { echo "error: $*" >&2; exit 1; }

# --- the installer: static, like xtask's guest agent (xtask/src/agent.rs) ---
# RUSTFLAGS with --target applies to the installer only, not to build
# scripts and proc macros. ureq uses rustls (ring): no OpenSSL to link.
build_installer() {
    local target_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}"
    log "installer: cargo build --release -p boxlite-node-installer --target $TARGET (+crt-static)"
    (cd "$REPO_ROOT" && RUSTFLAGS="-C target-feature=+crt-static" \
        cargo build --release -p boxlite-node-installer --target "$TARGET" >&2)
    INSTALLER="$target_dir/$TARGET/release/boxlite-node-installer"
    [ -x "$INSTALLER" ] || die "$INSTALLER was not produced by the build"
    # A scratch image has no dynamic loader: refuse anything that needs one.
    if readelf -l "$INSTALLER" | grep -q 'program interpreter' \
        || readelf -d "$INSTALLER" | grep -q '(NEEDED)'; then
        die "$INSTALLER is dynamically linked; it must be static (RUSTFLAGS=-C target-feature=+crt-static)"
    fi
}

# --- the payload ---
# add_bin SRC [NAME]: copies an executable into payload/bin.
add_bin() {
    local src="$1" name="${2:-$(basename "$1")}"
    [ -x "$src" ] || die "payload: $src is missing or not executable"
    install -m 0755 "$src" "$PAYLOAD/bin/$name"
    echo "payload: bin/$name <- $src" >&2
}

add_share() {
    local src="$1" name="$2"
    [ -f "$src" ] || die "payload: $src is missing"
    install -m 0644 "$src" "$PAYLOAD/share/$name"
    echo "payload: share/$name <- $src" >&2
}

# Finds a helper by name like the runtime does (docs/configuration.md).
find_helper() {
    local name="$1" dir
    command -v "$name" 2>/dev/null && return
    for dir in "$HOME/.cargo/bin" /usr/local/bin /usr/bin /usr/libexec; do
        [ -x "$dir/$name" ] && { echo "$dir/$name"; return; }
    done
    return 1
}

assemble_payload() {
    mkdir -p "$PAYLOAD/bin" "$PAYLOAD/share" "$PAYLOAD/etc"
    local kernel initramfs vsock="" dir
    if [ "$FROM_NODE" = 1 ]; then
        add_bin /usr/local/bin/containerd-shim-boxlite-v2
        [ -x /usr/local/bin/boxlite-vmm ] && add_bin /usr/local/bin/boxlite-vmm
        [ -x /usr/local/bin/boxlite-vsock ] && add_bin /usr/local/bin/boxlite-vsock && vsock=boxlite-vsock
        kernel=/usr/share/boxlite/vmlinux
        initramfs=/usr/share/boxlite/initramfs
    else
        dir="${BOXLITE_BUILD_DIR:-$REPO_ROOT/target/release}"
        [ -x "$dir/containerd-shim-boxlite-v2" ] \
            || die "$dir/containerd-shim-boxlite-v2 is missing: run \`cargo build --release -p containerd-shim-boxlite-v2 -p boxlite-vmm\` (or use --from-node)"
        add_bin "$dir/containerd-shim-boxlite-v2"
        [ -x "$dir/boxlite-vmm" ] && add_bin "$dir/boxlite-vmm"
        [ -x "$dir/boxlite-vsock" ] && add_bin "$dir/boxlite-vsock" && vsock=boxlite-vsock
        if [ -n "${BOXLITE_KERNEL:-}" ] && [ -n "${BOXLITE_INITRAMFS:-}" ]; then
            kernel="$BOXLITE_KERNEL"
            initramfs="$BOXLITE_INITRAMFS"
        else
            build_guest_assets >&2
            kernel="$BOXLITE_KERNEL"
            initramfs="$BOXLITE_INITRAMFS"
        fi
    fi
    add_share "$kernel" vmlinux
    add_share "$initramfs" initramfs
    local virtiofsd
    virtiofsd="$(find_helper virtiofsd)" || die "virtiofsd not found: cargo install --locked virtiofsd@1.14.0"
    add_bin "$virtiofsd"
    # boxlite-vsock (built with boxlite-vmm) is the qemu backend's vsock
    # device; without it a node without KVM could not run a pod.
    [ -n "$vsock" ] || die "boxlite-vsock not found: build it with \`cargo build --release -p boxlite-vmm\` (or run scripts/setup.sh for --from-node)"

    # The node's default config: only the paths differ from the built-in
    # defaults (configs/boxlite.toml lists every key).
    {
        echo "# Written by boxlite-node-installer (k8s/installer.yaml) on a node that had"
        echo "# no /etc/boxlite/boxlite.toml; it is yours now: the installer never"
        echo "# overwrites or removes it. Every key: docs/configuration.md."
        echo
        echo "[hypervisor]"
        [ -f "$PAYLOAD/bin/boxlite-vmm" ] && echo 'vmm_binary = "/opt/boxlite/bin/boxlite-vmm"'
        echo 'virtiofsd_binary = "/opt/boxlite/bin/virtiofsd"'
        echo "vhost_vsock_binary = \"/opt/boxlite/bin/$vsock\""
        echo
        echo "[guest]"
        echo 'kernel = "/opt/boxlite/share/vmlinux"'
        echo 'initramfs = "/opt/boxlite/share/initramfs"'
    } > "$PAYLOAD/etc/boxlite.toml"
    echo "payload: etc/boxlite.toml (generated)" >&2
}

# --- the OCI image archive, as import_busybox_image (scripts/common.sh) ---
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

write_image() {
    local rootfs="$WORK/rootfs" layout="$WORK/layout" layer config manifest
    mkdir -p "$rootfs" "$layout/blobs/sha256"
    install -m 0755 "$INSTALLER" "$rootfs/boxlite-node-installer"
    cp -a "$PAYLOAD" "$rootfs/payload"
    tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$WORK/layer.tar" .
    layer="$(sha "$WORK/layer.tar")"
    printf '{"architecture":"amd64","os":"linux","config":{"Entrypoint":["/boxlite-node-installer"],"Cmd":["install","--host-root","/host","--payload","/payload","--wait"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$layer" > "$WORK/config.json"
    config="$(sha "$WORK/config.json")"
    printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
        "$config" "$(size "$WORK/config.json")" "$layer" "$(size "$WORK/layer.tar")" > "$WORK/manifest.json"
    manifest="$(sha "$WORK/manifest.json")"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"platform":{"architecture":"amd64","os":"linux"},"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"dev"}}]}' \
        "$manifest" "$(size "$WORK/manifest.json")" "$IMAGE_NAME" > "$layout/index.json"
    mv "$WORK/layer.tar" "$layout/blobs/sha256/$layer"
    mv "$WORK/config.json" "$layout/blobs/sha256/$config"
    mv "$WORK/manifest.json" "$layout/blobs/sha256/$manifest"
    echo '{"imageLayoutVersion":"1.0.0"}' > "$layout/oci-layout"
    mkdir -p "$(dirname "$OUT")"
    tar -C "$layout" -cf "$OUT.tmp" . && mv "$OUT.tmp" "$OUT"
}

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PAYLOAD="$WORK/payload"

build_installer
assemble_payload
write_image
log "image $IMAGE_NAME: $OUT ($(du -h "$OUT" | cut -f1))"
if [ "$IMPORT" = 1 ]; then
    ctr -n k8s.io image import "$OUT"
    log "imported into containerd (namespace k8s.io)"
else
    echo "import it on each node: ctr -n k8s.io image import $OUT"
fi
