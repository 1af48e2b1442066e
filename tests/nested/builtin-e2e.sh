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
# Pod VMs come from templates, as they do by default on this backend: the
# first sandbox of each VM shape is saved once its agent answers, the rest
# are restored from it (docs/templates.md). One directory for the whole
# run, so the tests after the first exercise the restore.
export BOXLITE_TEST_TEMPLATES=on
export BOXLITE_TEST_TEMPLATES_DIR=/var/lib/boxlite/test-templates
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
# A leak of one thing per cycle shows after a few cycles; 20 take 4 minutes
# here (the host's qemu run does 20).
export BOXLITE_E2E_CYCLES=6
export BOXLITE_E2E_CYCLES_WHY="the nested node's time budget in CI; the host's qemu run does 20"

# Tests of what is the same code on both backends — the shim's own checks,
# the agent, the guest kernel and its cgroups — run on the qemu backend on
# the host only: here each test takes 3-5 times as long, and the CI run has
# an hour. Each is reported skipped with its reason (scripts/test.sh counts
# it as skipped; cargo never ran it). Everything a backend does differently
# runs here: boot and its failures, vsock stdio, virtio-fs, networking, the
# console, the jail and seccomp, the cgroup, sizing, the balloon, cleanup
# after crashes, density.
declare -A HOST_ONLY=(
    [a_container_limited_to_1_gib_fills_960_mib]="the guest's memory reserve (the VM's size is checked here by the_vm_is_sized_from_the_containers_limits)"
    [annotation_overrides_allowed_and_refused]="the shim's annotation policy (a VM's size on this backend is checked by the_vm_is_sized_from_the_containers_limits)"
    [bad_command_is_a_clear_error]="the agent's error for a missing binary"
    [env_cwd_read_only_and_immediate_exit]="the agent's process setup"
    [host_network_is_refused]="a check in the shim before any VM exists"
    [kill_exit_statuses]="the agent's signal delivery and exit statuses"
    [loopback_is_up_in_a_new_network_namespace]="the agent's network namespace setup"
    [memory_limit_in_the_guest_cgroup]="the agent's cgroup in the guest"
    [oom_kill_and_its_event]="the guest's OOM killer and the agent's event"
    [pause_resume_ps_and_metrics]="the guest cgroup freezer and the agent's stats"
    [run_with_a_terminal]="the agent's pty (the vsock stdio path runs here in exec_output_exit_code_and_tty)"
)
# Tests that find they cannot run here record it (boxlite_tests::report_skip);
# scripts/test.sh counts these lines as skipped.
export BOXLITE_SKIP_LOG="$BOXLITE_NODE_OUT/skips"
: >"$BOXLITE_SKIP_LOG"
: >"$BOXLITE_NODE_OUT/not-run"
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
listed=" "
for t in "$@"; do
    echo "==> $t (builtin backend, in the nested node)"
    tests=$("./$t" --ignored --list 2>/dev/null | sed -n 's/: test$//p')
    [ -n "$tests" ] || { echo "$t: lists no tests"; status=1; continue; }
    listed+="${tests//$'\n'/ } "
    for name in $tests; do
        if [ -n "${HOST_ONLY[$name]:-}" ]; then
            why="backend-independent (${HOST_ONLY[$name]}): runs on the qemu backend on the host"
            echo "test $name ... skipped here: $why"
            echo "$name (builtin backend): $why" >>"$BOXLITE_NODE_OUT/not-run"
            continue
        fi
        run_test "$t" "$name" || status=1
    done
done
# A renamed test must not leave a stale entry that skips nothing.
for name in "${!HOST_ONLY[@]}"; do
    if [[ "$listed" != *" $name "* ]]; then
        echo "builtin-e2e.sh: HOST_ONLY names no test of $*: $name"
        status=1
    fi
done
exit "$status"
