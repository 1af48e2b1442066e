#!/bin/bash
# Keeps containers busy on the builtin backend inside the nested node, to
# reproduce the test-host kernel crash seen under load (docs/testing-nested.md,
# "Boot loops", mode (d)): a long-lived container taking a loop of execs
# (guest user space busy, a stdin stream in and out) while fresh containers
# boot and end beside it.
#
#   scripts/nested-run.sh --timeout SECS -- tests/nested/exec-stress.sh [SECONDS]
#
# Runs for SECONDS (default 600) or until the node's kernel log shows a BUG,
# WARNING, Oops or panic line; prints a line per round and the kernel lines
# it found. Exits 1 if it found any, 2 if a container operation failed
# (then containerd's log, with a failed boot's console tail, and dmesg are
# in $BOXLITE_NODE_OUT).
set -u
duration="${1:-600}"
image=docker.io/library/busybox:boxlite
runtime=io.containerd.boxlite.v2
# shellcheck source=../../scripts/common.sh
source /payload/scripts/common.sh
import_busybox_image "$image" >/dev/null

crash_lines() { dmesg | grep -E 'BUG:|WARNING:|Oops|Kernel panic' || true; }

ctr run -d --runtime "$runtime" "$image" long sleep 100000 || exit 2
echo "exec-stress: node $(uname -r), $(nproc) CPUs; container 'long' up; running ${duration}s"
start=$SECONDS round=0 failed=0
while [ $((SECONDS - start)) -lt "$duration" ]; do
    round=$((round + 1))
    # A fresh container boots beside the busy one.
    ctr run --rm --runtime "$runtime" "$image" "fresh$round" sh -c 'echo fresh' >/dev/null &
    fresh=$!
    for j in 1 2 3 4; do
        # Guest user space busy: many exits from guest user mode.
        out="$(ctr task exec --exec-id "spin$round-$j" long \
            sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo $i')" \
            || { echo "exec-stress: round $round: exec spin$j failed"; failed=1; }
        [ "$out" = 20000 ] || { echo "exec-stress: round $round: spin$j said '$out'"; failed=1; }
    done
    # A stdin stream through the agent and back.
    n="$(head -c 262144 /dev/zero | ctr task exec --exec-id "stream$round" long wc -c)" \
        || { echo "exec-stress: round $round: stdin exec failed"; failed=1; }
    [ "${n// /}" = 262144 ] || { echo "exec-stress: round $round: stream counted '$n'"; failed=1; }
    wait "$fresh" || { echo "exec-stress: round $round: fresh container failed"; failed=1; }
    echo "exec-stress: round $round done at $((SECONDS - start))s"
    if [ -n "$(crash_lines)" ]; then
        break
    fi
    [ "$failed" = 0 ] || break
done
ctr task kill -s KILL long >/dev/null 2>&1
sleep 2
ctr task delete long >/dev/null 2>&1
ctr container delete long >/dev/null 2>&1
if [ "$failed" != 0 ] && [ -n "${BOXLITE_NODE_OUT:-}" ]; then
    # A failed boot's console tail is in containerd's log (docs/shim.md).
    cp /var/log/boxlite-containerd.log "$BOXLITE_NODE_OUT/" 2>/dev/null
    dmesg >"$BOXLITE_NODE_OUT/dmesg.txt"
fi
crash="$(crash_lines)"
if [ -n "$crash" ]; then
    echo "exec-stress: kernel trouble after $round rounds:"
    printf '%s\n' "$crash"
    exit 1
fi
[ "$failed" = 0 ] || { echo "exec-stress: $round rounds, no kernel trouble, but a container operation failed"; exit 2; }
echo "exec-stress: $round rounds, no kernel trouble"
