#!/bin/bash
# Reproduces the nested node's "int3 loop" (docs/testing-nested.md): the
# outer QEMU leaving a stale translation of kernel text that the node has
# just patched. Run it in the node:
#
#   scripts/nested-run.sh -- tests/nested/static-key-flips.sh [--without-idle-vm] [SECONDS]
#
# One process creates and destroys KVM VMs in a loop while two pipe
# ping-pongs keep __schedule running on both vCPUs. Each time the node's
# VM count goes 0 -> 1 -> 0, KVM flips the kernel's preempt-notifier static
# key, and the kernel rewrites a jump in __schedule with text_poke_bp: an
# int3 first, then the new bytes. The node's init holds an idle VM so that
# the count never reaches 0 (the way around the bug); --without-idle-vm
# kills it first, to show the bug: the node then froze 2 to 10 s into the
# loop in each of 4 runs (a few hundred flips at most), both vCPUs looping
# on the int3 of __schedule+0x2ab. Exits 0 when SECONDS (default 600) have
# passed; a frozen node is nested-run.sh's to report (exit 125).
set -eu
if [ "${1:-}" = --without-idle-vm ]; then
    kill "$(cat /run/boxlite-node-kvm-holder.pid)"
    shift
fi
secs="${1:-600}"

# Context switches on both vCPUs: a parent and child passing a byte back
# and forth through two pipes.
churn() {
    python3 - "$secs" <<'EOF'
import os, sys, time
end = time.time() + float(sys.argv[1])
down_r, down_w = os.pipe()  # parent -> child
up_r, up_w = os.pipe()  # child -> parent
if os.fork() == 0:
    while True:
        b = os.read(down_r, 1)
        if not b:
            os._exit(0)
        os.write(up_w, b)
n = 0
while time.time() < end:
    os.write(down_w, b"x")
    os.read(up_r, 1)
    n += 1
os.close(down_w)
print(f"churn: {n} round trips", flush=True)
EOF
}

churn &
churn &
python3 - "$secs" <<'EOF'
import fcntl, os, sys, time
KVM_CREATE_VM = 0xAE01
end = time.time() + float(sys.argv[1])
flips, last = 0, time.time()
while time.time() < end:
    kvm = os.open("/dev/kvm", os.O_RDWR)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    # Closing the VM's fd destroys it: the count goes back to 0.
    os.close(vm)
    os.close(kvm)
    flips += 1
    if time.time() - last >= 10:
        print(f"static-key-flips: {flips} VMs created and destroyed", flush=True)
        last = time.time()
print(f"static-key-flips: done, {flips} VMs created and destroyed in {sys.argv[1]} s", flush=True)
EOF
wait
