#!/bin/bash
# Init (PID 1) of the nested test node, run from the payload disk that
# scripts/nested-run.sh writes for each run (docs/testing-nested.md).
#
# 1. mounts what a node needs (the image's bootstrap mounted /proc, /sys,
#    /dev and this disk on /payload);
# 2. installs BoxLite the way scripts/setup.sh does (install_boxlite,
#    register_containerd_runtime), with the builtin backend on KVM;
# 3. starts containerd;
# 4. runs the run's script as root in /payload/files, its stdout and stderr
#    on the second serial port (the caller's stdout), nothing on stdin;
# 5. writes the script's exit status to /payload/status (or why the node
#    could not run it, as "setup-failed: …"), stops every other process,
#    unmounts this disk cleanly so the host can read it, and powers off.
#
# Progress and errors of this init go to the kernel console (ttyS0), which
# nested-run.sh keeps in a file and shows the tail of on failure.
set -u
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
P=/payload
OUT_TTY=/dev/ttyS1

say() { echo "boxlite-node: $*" >/dev/console; }

finish() {
    echo "$1" >"$P/status"
    say "finished: $1"
    # Everything but PID 1: the script's leftovers, containerd, shims and
    # VMMs, so that nothing holds the payload disk.
    kill -KILL -1 2>/dev/null
    sleep 0.5
    sync
    umount "$P" || mount -o remount,ro "$P" || say "cannot unmount $P; its status may not reach the host"
    sync
    # reboot=t on the command line: the reset ends the test host's QEMU
    # (-no-reboot), so the caller sees the node end.
    exec /bin/busybox reboot -f
}

mount_all() {
    mkdir -p /dev/pts /dev/shm /dev/mqueue /run /tmp /sys/fs/cgroup
    mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
    mount -t tmpfs -o nosuid,nodev,mode=1777 shm /dev/shm
    mount -t mqueue mqueue /dev/mqueue
    mount -t tmpfs -o nosuid,nodev,mode=755 run /run
    mount -t tmpfs -o nosuid,nodev,mode=1777 tmp /tmp
    mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
    ln -sfn /proc/self/fd /dev/fd
    ln -sfn /proc/self/fd/0 /dev/stdin
    ln -sfn /proc/self/fd/1 /dev/stdout
    ln -sfn /proc/self/fd/2 /dev/stderr
    hostname "$(cat /etc/hostname)"
    ip link set lo up
}

# The install steps of scripts/setup.sh, then this node's backend: builtin
# on KVM, what `auto` picks on a server with VMX/SVM (the node has no
# kvm_pvm), written out so a wrong pick fails instead of falling back.
install_node() (
    set -euo pipefail
    # shellcheck source=common.sh
    source "$P/scripts/common.sh"
    install_boxlite "$P/bin" "$P/guest/vmlinux" "$P/guest/initramfs.cpio.gz"
    # The static virtiofsd (on a host, setup.sh installs it with cargo).
    install -D -m 0755 "$P/bin/virtiofsd" /usr/local/bin/virtiofsd
    local cfg=/etc/boxlite/boxlite.toml
    grep -q '^# backend = "auto"$' "$cfg" && grep -q '^# accel = "auto"$' "$cfg" \
        || { echo "$cfg has no '# backend = \"auto\"' / '# accel = \"auto\"' lines to set" >&2; exit 1; }
    sed -i -e 's/^# backend = "auto"$/backend = "builtin"/' -e 's/^# accel = "auto"$/accel = "kvm"/' "$cfg"
    register_containerd_runtime >/dev/null
    ensure_containerd start
)

# The node runs Debian's cloud kernel, which builds what BoxLite, containerd
# and CNI use as modules. /dev/kvm and /dev/net/tun appear only once their
# module is loaded, which udev and systemd's kmod-static-nodes do on a real
# node; this init does it with modprobe (the options on the kernel command
# line, e.g. kvm_amd.npt=0, apply), and loads the rest up front too rather
# than leaving it to the kernel's on-demand loading.
load_modules() {
    modprobe -a kvm_amd tun virtio_rng overlay veth bridge \
        sch_ingress cls_u32 act_mirred nf_tables
}

say "init: up $(cut -d' ' -f1 /proc/uptime)s after boot"
mount_all
load_modules >/dev/console 2>&1 || finish "setup-failed: cannot load the kernel modules the node needs (see the console above)"
[ -c /dev/kvm ] || finish "setup-failed: no /dev/kvm in the node (is KVM_AMD in the test-host kernel, and svm in the outer CPU?)"
if ! install_node >/dev/console 2>&1; then
    finish "setup-failed: installing BoxLite or starting containerd failed (see the console above)"
fi
say "containerd up $(cut -d' ' -f1 /proc/uptime)s after boot; running the script"

# For a node that freezes (docs/testing-nested.md, "A frozen node"): its
# symbols, modules included and written through to the disk now, so that
# nested-run.sh can name where its vCPUs stopped; and a heartbeat on the
# console, whose silence nested-run.sh takes as the freeze.
cp /proc/kallsyms "$P/kallsyms" && sync "$P/kallsyms"
# Kernel text the node would otherwise patch while tests run, patched once
# here instead (docs/testing-nested.md, "The int3 loop"): the outer QEMU can
# miss such a patch and loop on its int3 forever, freezing the node.
# - An idle KVM VM with an in-kernel irqchip and one vCPU that never runs,
#   held for the node's life: the count of VMs never drops to 0 (each
#   0 <-> 1 change flips KVM's preempt-notifier key, which patches
#   __schedule), and its LAPIC stays software-disabled (every other VM's
#   vCPU would flip KVM's apic_sw_disabled key on at creation and off a
#   second after its guest enables the APIC).
# - A dummy link with an ingress qdisc: each pod's tap gets one, and the
#   first and last of them flip the ingress key of the network receive path.
python3 -c '
import fcntl, os, signal
kvm = os.open("/dev/kvm", os.O_RDWR)
vm = fcntl.ioctl(kvm, 0xAE01, 0)  # KVM_CREATE_VM
fcntl.ioctl(vm, 0xAE60, 0)  # KVM_CREATE_IRQCHIP
fcntl.ioctl(vm, 0xAE41, 0)  # KVM_CREATE_VCPU, id 0
signal.pause()
' &
echo $! >/run/boxlite-node-kvm-holder.pid
ip link add keyhold0 type dummy && tc qdisc add dev keyhold0 ingress \
    || say "cannot hold the ingress key (dummy link keyhold0)"
# nested-run.sh sends a frozen node an NMI: it panics with the backtrace of
# every CPU (panic_print bit 6) instead of going on. On microvm, which has
# no NMI sources, the kernel reads an NMI as a PCI system error (port 0x61
# reads 0xff), which panic_on_unrecovered_nmi makes a panic;
# unknown_nmi_panic covers a machine that reports it as unknown.
for knob in unknown_nmi_panic=1 panic_on_unrecovered_nmi=1 panic_print=64; do
    echo "${knob#*=}" >"/proc/sys/kernel/${knob%=*}" || say "cannot set kernel.$knob"
done
( while sleep 30; do
    say "alive $(cut -d' ' -f1 /proc/uptime)s after boot, load $(cut -d' ' -f1-3 /proc/loadavg)"
done ) &
# (A script that stops it makes the node look frozen: how the watchdog of
# nested-run.sh is tried out.)
echo $! >/run/boxlite-node-heartbeat.pid

# Raw: the script's bytes reach the caller unchanged (no \n → \r\n).
stty -F "$OUT_TTY" raw -echo
while IFS= read -r kv; do
    [ -n "$kv" ] && export "${kv?}"
done <"$P/run/env"
export BOXLITE_NODE_OUT="$P/out"
mkdir -p "$BOXLITE_NODE_OUT"
mapfile -d '' args <"$P/run/args"
cd "$P/files" || finish "setup-failed: no $P/files"
# --wait: should setsid need to fork (it does when it leads a process
# group), it still waits for the script and passes on its status.
setsid --wait bash "$P/run/script" "${args[@]}" </dev/null >"$OUT_TTY" 2>&1
finish "$?"
