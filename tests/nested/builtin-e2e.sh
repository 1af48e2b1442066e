#!/bin/bash
# The end-to-end tests on the builtin backend, inside the nested test node
# (scripts/nested-run.sh runs this; scripts/test.sh copies in the test
# binaries): the same shim and CRI test binaries that run on the qemu
# backend on the host, with BOXLITE_TEST_BACKEND=builtin, against the
# BoxLite the node installed (docs/testing-nested.md). Prints cargo's
# summary lines; exits non-zero if any test binary failed.
set -u
export BOXLITE_TEST_BACKEND=builtin
export BOXLITE_SHIM=/usr/local/bin/containerd-shim-boxlite-v2
export BOXLITE_KERNEL=/usr/share/boxlite/vmlinux
export BOXLITE_INITRAMFS=/usr/share/boxlite/initramfs
# Test images copied in beside the binaries (--copy of a
# /var/cache/boxlite/images/<hash> directory) are found here: the node has
# no Debian mirror to build them from.
export BOXLITE_IMAGE_CACHE="${BOXLITE_IMAGE_CACHE:-$PWD}"
# 20 VMs at once crash the test host's kernel here: QEMU's emulation of SVM
# (TCG) delivered a timer interrupt inside __svm_vcpu_run, before the host's
# GS was restored ("Fatal exception in interrupt", seen 2026-12-06 with
# 20 concurrent guests). The density test runs 5 here, 20 on the host.
export BOXLITE_E2E_DENSITY=5
export BOXLITE_E2E_DENSITY_WHY="20 concurrent nested guests crash the TCG-emulated test host's kernel (interrupt inside __svm_vcpu_run)"
# Tests that find they cannot run here record it (boxlite_tests::report_skip);
# scripts/test.sh counts these lines as skipped.
export BOXLITE_SKIP_LOG="$BOXLITE_NODE_OUT/skips"
: >"$BOXLITE_SKIP_LOG"
echo "node: $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 / 1024 " MiB"}' /proc/meminfo); /dev/kvm: $(ls -l /dev/kvm)"
# Each test runs in its own process, bounded: a test that hangs is killed
# after $TEST_TIMEOUT seconds with what the node looked like dumped first,
# and the tests after it still run; a failed test's output is printed as
# soon as it ends, not lost with a later hang.
TEST_TIMEOUT="${BOXLITE_E2E_TEST_TIMEOUT:-600}"

# What a hung test leaves to look at: processes (with where they wait),
# the kernel log, and the tail of every containerd, shim and console log.
dump_node() {
    echo "---- node state ----"
    ps -eo pid,ppid,stat,etime,wchan:28,args | grep -v ' \[' | head -80
    echo "---- dmesg (last 40 lines) ----"
    dmesg | tail -40
    for f in $(find /tmp /run/boxlite -maxdepth 5 \( -name containerd.log -o -name console.log -o -name '*.log' \) -size +0 2>/dev/null | head -20); do
        echo "---- $f (last 60 lines) ----"
        tail -n 60 "$f" | cut -c1-400
    done
}

run_test() {
    local bin="$1" name="$2" pid waited=0
    "./$bin" --ignored --test-threads=1 --exact "$name" &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$waited" -ge "$TEST_TIMEOUT" ]; then
            echo "test $name ... still running after ${TEST_TIMEOUT}s: killing it"
            dump_node
            kill -TERM "$pid" 2>/dev/null
            sleep 5
            kill -KILL "$pid" 2>/dev/null
            wait "$pid"
            echo "test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out (killed after ${TEST_TIMEOUT}s)"
            return 1
        fi
        sleep 1
        waited=$((waited + 1))
    done
    wait "$pid"
}

status=0
for t in "$@"; do
    echo "==> $t (builtin backend, in the nested node)"
    tests=$("./$t" --ignored --list 2>/dev/null | sed -n 's/: test$//p')
    [ -n "$tests" ] || { echo "$t: lists no tests"; status=1; continue; }
    for name in $tests; do
        run_test "$t" "$name" || status=1
    done
done
exit "$status"
