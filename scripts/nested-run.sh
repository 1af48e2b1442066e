#!/usr/bin/env bash
# Runs a script as root inside the nested test node: a Debian 12 node with
# containerd and BoxLite on the builtin backend (boxlite-vmm on the node's
# KVM), booted under QEMU TCG with an emulated SVM CPU
# (docs/testing-nested.md). Run as root on Debian 12.
#
#   scripts/nested-run.sh [--memory MIB] [--cpus N] [--accel ACCEL] \
#       [--copy PATH]... [--env NAME=VALUE]... [--out DIR] [--timeout SECS] \
#       [--keep] -- SCRIPT [ARGS...]
#
# Builds (or takes from the caches) the test-host kernel, the guest kernel
# and initramfs, the node's root image and our binaries; writes them with
# the node's init, SCRIPT, its ARGS and the --copy files onto a payload
# disk; boots the node; streams the script's stdout and stderr here; and
# exits with the script's exit status. The script runs in the directory
# holding the --copy files, with $BOXLITE_NODE_OUT a directory whose
# contents land in --out DIR after the run. If the node does not come up,
# freezes (its console silent for BOXLITE_NODE_SILENCE seconds) or the
# script does not finish within --timeout, it says why, prints what the
# node's vCPUs were doing (scripts/qemu-state.sh), shows the tail of the
# node's console and exits 125.
#
# --accel is the outer QEMU's accelerator (default tcg: one thread per
# vCPU), for experiments such as tcg,thread=single (docs/testing-nested.md,
# "The int3 loop").
#
# Environment: BOXLITE_NODE_PROFILE=release|debug (our binaries' cargo
# profile; default release), BOXLITE_TESTHOST_TSC_KHZ (the host's TSC
# frequency; default from /proc/cpuinfo), BOXLITE_TESTHOST_APPEND (more
# kernel arguments for the node), BOXLITE_NODE_SILENCE (default 240),
# CARGO_TARGET_DIR.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    sed -n '7,9p' "${BASH_SOURCE[0]}" | sed 's/^# *//' >&2
    exit 2
}

memory=4096 cpus=2 accel=tcg timeout=3600 out="" keep=0
copies=() envs=()
while [ $# -gt 0 ]; do
    case "$1" in
        --memory) memory="$2"; shift 2 ;;
        --cpus) cpus="$2"; shift 2 ;;
        --accel) accel="$2"; shift 2 ;;
        --copy) copies+=("$2"); shift 2 ;;
        --env) envs+=("$2"); shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        --keep) keep=1; shift ;;
        --) shift; break ;;
        *) echo "nested-run: unknown option $1" >&2; usage ;;
    esac
done
[ $# -ge 1 ] || usage
script="$1"
shift
[ -f "$script" ] || { echo "nested-run: no script $script" >&2; exit 2; }
for c in "${copies[@]}"; do
    [ -e "$c" ] || { echo "nested-run: --copy $c: no such file or directory" >&2; exit 2; }
done
for e in "${envs[@]}"; do
    [[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || { echo "nested-run: --env $e: not NAME=VALUE" >&2; exit 2; }
    [[ "$e" != *$'\n'* ]] || { echo "nested-run: --env ${e%%=*}: the value has a newline" >&2; exit 2; }
done
require_root
cd "$REPO_ROOT"

# Everything below goes to stderr: stdout is the script's.
{
    ensure_apt_packages
    ensure_cargo_tools
    build_guest_assets
    log "nested node: test-host kernel, static boxlite-vmm and virtiofsd (cargo xtask testhost)"
    testhost_out="$(cargo xtask testhost --guest-initramfs "$BOXLITE_INITRAMFS")"
    log "nested node: root image (cargo xtask node-image)"
    node_image="$(cargo xtask node-image | sed -n 's/^node-image: //p')"
    profile="${BOXLITE_NODE_PROFILE:-release}"
    log "nested node: our binaries (cargo build, $profile)"
    if [ "$profile" = release ]; then
        cargo build --release --quiet -p boxlite-runtime -p boxlite-vmm -p containerd-shim-boxlite-v2 --bins
    else
        # The whole workspace, as scripts/test.sh builds it: a subset of
        # packages unifies features differently and rebuilds crates that
        # build just made (two minutes of a CI run).
        cargo build --quiet --workspace --bins
    fi
} >&2
kernel="$(sed -n 's/^testhost-kernel: //p' <<<"$testhost_out")"
node_initramfs="$(sed -n 's/^testhost-node-initramfs: //p' <<<"$testhost_out")"
vmm="$(sed -n 's/^testhost-vmm: //p' <<<"$testhost_out")"
virtiofsd="$(sed -n 's/^testhost-virtiofsd: //p' <<<"$testhost_out")"
bin_dir="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/$profile"

work="$(mktemp -d /tmp/boxlite-nested-run.XXXXXX)"
qemu_pid=""
cleanup() {
    # An early exit (a signal, an error) must not leave the node running.
    [ -z "$qemu_pid" ] || kill -KILL "$qemu_pid" 2>/dev/null || true
    if [ "$keep" = 1 ]; then
        echo "nested-run: kept $work (console.log, payload.ext4)" >&2
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT

# The payload disk: the node's init, our binaries (the static release VMM
# and virtiofsd the test host uses, the shim and tools of $profile), the
# guest assets, the install helpers, the run's script, args, env and files.
p="$work/payload"
mkdir -p "$p/bin" "$p/guest" "$p/scripts" "$p/configs" "$p/run" "$p/files"
install -m 0755 scripts/node-init.sh "$p/init"
cp scripts/common.sh "$p/scripts/"
cp configs/boxlite.toml configs/containerd-boxlite.toml "$p/configs/"
for b in containerd-shim-boxlite-v2 boxlite-vsock boxlite-smoke; do
    install -m 0755 "$bin_dir/$b" "$p/bin/$b"
done
install -m 0755 "$vmm" "$p/bin/boxlite-vmm"
install -m 0755 "$virtiofsd" "$p/bin/virtiofsd"
cp "$BOXLITE_KERNEL" "$p/guest/vmlinux"
cp "$BOXLITE_INITRAMFS" "$p/guest/initramfs.cpio.gz"
cp "$script" "$p/run/script"
if [ $# -gt 0 ]; then printf '%s\0' "$@" >"$p/run/args"; else : >"$p/run/args"; fi
if [ ${#envs[@]} -gt 0 ]; then printf '%s\n' "${envs[@]}" >"$p/run/env"; else : >"$p/run/env"; fi
for c in "${copies[@]}"; do
    cp -a "$c" "$p/files/"
done
# Room for what the script writes to its directory and $BOXLITE_NODE_OUT.
size_mib=$(($(du -sm "$p" | cut -f1) * 5 / 4 + 512))
mke2fs -q -t ext4 -L boxlite-payload -d "$p" "$work/payload.ext4" "${size_mib}M" >&2
rm -rf "$p"

tsc_khz="${BOXLITE_TESTHOST_TSC_KHZ:-$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)}"
[ "${tsc_khz:-0}" -gt 0 ] || { echo "nested-run: cannot read the host's TSC frequency from /proc/cpuinfo; set BOXLITE_TESTHOST_TSC_KHZ" >&2; exit 125; }
# Waits while QEMU runs. Prints why it gave up instead: the run took longer
# than --timeout, or the node's console has been silent for
# $BOXLITE_NODE_SILENCE seconds (default 240). The node's init prints a
# heartbeat there every 30 s, so a silent console is a node whose
# userspace no longer runs: frozen (docs/testing-nested.md, "A frozen
# node"), which no waiting undoes.
watch_node() {
    local pid="$1" silence="${BOXLITE_NODE_SILENCE:-240}" size last_size=-1 last_change=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        size="$(stat -c %s "$work/console.log" 2>/dev/null || echo 0)"
        if [ "$size" != "$last_size" ]; then
            last_size="$size" last_change=$SECONDS
        fi
        if [ $((SECONDS - last_change)) -ge "$silence" ]; then
            echo "the node froze: its console (and its 30 s heartbeat) has been silent for ${silence}s"
            return
        fi
        if [ $((SECONDS - started)) -ge "$timeout" ]; then
            echo "the node did not finish within ${timeout}s (--timeout)"
            return
        fi
        sleep 2
    done
}

echo "nested-run: booting the node (${memory} MiB, $cpus vCPUs, -accel $accel; console: $work/console.log)" >&2
started=$SECONDS
# The root image opens with snapshot=on: the run's writes go to a temporary
# overlay and the cached image never changes. The kernel console goes to a
# file; the script's output comes on the second serial port to our stdout.
# tsc_early_khz and tsc=reliable: docs/testing-nested.md, "Why
# tsc_early_khz" and "The test host's clock" (TCG's TSC is the host's one
# TSC on every vCPU; without tsc=reliable the node keeps time by jiffies,
# which lose ticks under load, and its guests' kvm-clock follows them).
# kvm_amd.npt=0: the node's KVM runs its guests on shadow paging, because
# the outer QEMU's emulation of nested paging fails now and then right
# after a #VMEXIT (docs/testing-nested.md, "Shadow paging in the test host").
# The virtio-rng device seeds the node's entropy at once: without it the
# kernel's random pool took ~10 s to initialise under TCG, and containerd
# waited for it.
# The kernel is Debian's cloud kernel (cargo xtask testhost): its
# virtio-mmio driver is a module that finds the devices in microvm's ACPI
# tables (so no acpi=off), and the node's stage 1 (node-initramfs) loads it
# and virtio-blk, mounts root= and switches to init=.
qemu-system-x86_64 \
    -M microvm -accel "$accel" -cpu EPYC,+svm,+npt -smp "$cpus" -m "$memory" \
    -name boxlite-node,debug-threads=on \
    -nodefaults -no-user-config -display none -no-reboot \
    -monitor "unix:$work/monitor.sock,server=on,wait=off" \
    -chardev "file,id=console,path=$work/console.log" -serial chardev:console \
    -chardev stdio,id=out,signal=off -device isa-serial,chardev=out \
    -drive "id=root,file=$node_image,format=raw,if=none,snapshot=on,cache=unsafe" \
    -device virtio-blk-device,drive=root \
    -drive "id=payload,file=$work/payload.ext4,format=raw,if=none,cache=unsafe" \
    -device virtio-blk-device,drive=payload \
    -object rng-random,id=rng,filename=/dev/urandom -device virtio-rng-device,rng=rng \
    -kernel "$kernel" -initrd "$node_initramfs" \
    -append "console=ttyS0 root=/dev/vda rw init=/sbin/boxlite-node-boot reboot=t panic=-1 no_timer_check tsc_early_khz=$tsc_khz tsc=reliable kvm_amd.npt=0${BOXLITE_TESTHOST_APPEND:+ $BOXLITE_TESTHOST_APPEND}" \
    </dev/null &
qemu_pid=$!
stuck="$(watch_node "$qemu_pid")"
if [ -n "$stuck" ]; then
    # What the node was doing, before QEMU goes; then its symbols, from the
    # payload disk, which QEMU must have let go of first.
    bash scripts/qemu-state.sh "$qemu_pid" "$work/monitor.sock" >"$work/qemu-state.txt" 2>&1 || true
    # Then an NMI to every vCPU of the node: its init made an NMI a panic
    # (microvm has no NMI sources, so the kernel reads it as a system
    # error) that prints every CPU's backtrace, so a node whose kernel
    # still takes interrupts panics with every CPU's backtrace on its
    # console and resets (QEMU ends); a node that does not is killed.
    printf 'nmi\n' | timeout 10 socat -t 2 - "UNIX-CONNECT:$work/monitor.sock" >/dev/null 2>&1 || true
    for _ in $(seq 20); do
        kill -0 "$qemu_pid" 2>/dev/null || break
        sleep 1
    done
    kill -KILL "$qemu_pid" 2>/dev/null || true
fi
set +e
wait "$qemu_pid"
qemu_status=$?
set -e
qemu_pid=""
elapsed=$((SECONDS - started))

console_lines=60
fail() {
    echo "nested-run: $* (after ${elapsed}s); the node's console ($work/console.log), its last $console_lines lines but the heartbeats before the last:" >&2
    { grep -v 'boxlite-node: alive ' "$work/console.log" || true; } | tail -n "$console_lines" | sed 's/^/  | /' >&2
    { grep 'boxlite-node: alive ' "$work/console.log" || true; } | tail -n 1 | sed 's/^/  | (last heartbeat) /' >&2
    keep=1
    exit 125
}
if [ -n "$stuck" ]; then
    debugfs -R "dump /kallsyms $work/kallsyms" "$work/payload.ext4" >/dev/null 2>&1 || true
    bash scripts/qemu-state.sh --symbolize "$work/qemu-state.txt" \
        "node=$work/kallsyms" "guest=$BOXLITE_KERNEL" >>"$work/qemu-state.txt" 2>&1
    sed 's/^/nested-run: /' "$work/qemu-state.txt" >&2
    # Room for the panic's backtraces of both CPUs.
    console_lines=150
    fail "$stuck"
fi
status="$(debugfs -R 'cat /status' "$work/payload.ext4" 2>/dev/null || true)"
if [ -n "$out" ]; then
    mkdir -p "$out" "$work/dump"
    if debugfs -R "rdump /out $work/dump" "$work/payload.ext4" >/dev/null 2>&1 && [ -d "$work/dump/out" ]; then
        cp -a "$work/dump/out/." "$out/"
    else
        echo "nested-run: no \$BOXLITE_NODE_OUT to copy to $out" >&2
    fi
fi
case "$status" in
    '') fail "the node ended (QEMU status $qemu_status) without recording the script's exit status" ;;
    setup-failed:*) fail "the node could not run the script: ${status#setup-failed: }" ;;
    *[!0-9]*) fail "unexpected status on the payload disk: $status" ;;
esac
echo "nested-run: script exited $status after ${elapsed}s in the node" >&2
exit "$status"
