#!/bin/busybox sh
# shellcheck shell=dash
# Stage 1 of the nested test host and node (xtask/src/stage1.rs): they boot
# Debian's cloud kernel, which builds what they need as modules. Loads the
# modules listed in /etc/stage1/modules ("name path" lines, dependencies
# first) with the options the kernel command line gives as name.param=value,
# as modprobe would, then hands over as /etc/stage1/next says:
#   an absolute path:  exec it as PID 1 (the test host's nested driver);
#   switch-root:       mount root= read-write and switch_root to init=
#                      (the nested node's Debian root disk).
B=/bin/busybox

fail() {
    echo "stage1: $*" >/dev/console
    # reboot=t on the command line: the reset ends QEMU (-no-reboot).
    $B sleep 1
    $B reboot -f
}

$B mkdir -p /proc /sys /dev
$B mount -t proc proc /proc
$B mount -t sysfs sysfs /sys
$B mount -t devtmpfs -o mode=0755 devtmpfs /dev
cmdline="$($B cat /proc/cmdline)"

while read -r name path; do
    [ -n "$name" ] || continue
    params=""
    for word in $cmdline; do
        case "$word" in "$name".*) params="$params ${word#"$name".}" ;; esac
    done
    # shellcheck disable=SC2086 # one word per module option
    $B insmod "$path" $params || fail "cannot load kernel module $name ($path$params)"
done </etc/stage1/modules

next="$($B cat /etc/stage1/next)"
if [ "$next" != switch-root ]; then
    exec "$next"
fi

root="" init=/sbin/init
for word in $cmdline; do
    case "$word" in
        root=*) root="${word#root=}" ;;
        init=*) init="${word#init=}" ;;
    esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"
# The block driver finds its disks asynchronously after insmod.
tries=0
while [ ! -b "$root" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || fail "root device $root did not appear within 10s"
    $B sleep 0.1
done
$B mkdir -p /newroot
$B mount -o rw "$root" /newroot || fail "cannot mount $root"
$B mount --move /dev /newroot/dev 2>/dev/null || $B umount /dev
$B umount /proc /sys
exec $B switch_root /newroot "$init"
