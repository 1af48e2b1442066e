#!/usr/bin/env bash
# Benchmark (not a test): a pod VM cold-booted vs restored from a snapshot
# of an agent-ready VM, inside the nested test host (issue 14's benchmark;
# docs/benchmarks.md records the results).
#
#   bash scripts/bench-restore.sh [boots] [runs]   (default 1 boot × 5 runs)
#
# Builds the test host (`cargo xtask testhost`, into $BOXLITE_BENCH_DIR,
# default /tmp/boxlite-bench-restore), boots it `boots` times under QEMU
# TCG with an emulated SVM CPU (docs/testing-nested.md) and has its driver
# run the `snapshot` scenario `runs` times: each cold-boots a source VM to
# its agent's announcement, saves it, restores two clones from the one
# memory file and times each. Prints every run and the medians of:
#   VMM start → the agent listening: cold, its announcement; restored,
#     the reply to the `restore` op (the VMM's build time + the op);
#   VMM start → the agent answering Health on a fresh connection;
#   the restored VMM's build time and the `restore` op alone;
#   PSS/RSS of a clone with two running.
set -euo pipefail

BOOTS="${1:-1}"
RUNS="${2:-5}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${BOXLITE_BENCH_DIR:-/tmp/boxlite-bench-restore}"

die() { echo "error: $*" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"

mkdir -p "$OUT"
cd "$REPO_ROOT"
guest="$(cargo xtask guest | sed -n 's/^initramfs: //p' | tail -n1)"
cargo xtask testhost --out-dir "$OUT/th" --guest-initramfs "$guest" >/dev/null

# The outer QEMU's TSC frequency for the test host, as tests/nested_vmm.rs
# passes it (TSC calibration fails under TCG).
tsc_khz="$(awk -F: '/cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
results="$OUT/results.txt"
: >"$results"
scenarios="snapshot"
for _ in $(seq 2 "$RUNS"); do scenarios="$scenarios,snapshot"; done
for boot in $(seq 1 "$BOOTS"); do
    console="$OUT/console-$boot.log"
    timeout 1800 qemu-system-x86_64 -M microvm -accel tcg -cpu EPYC,+svm,+npt -smp 2 -m 2048 \
        -nodefaults -no-user-config -nographic -no-reboot -serial "file:$console" \
        -kernel "$OUT/th/vmlinuz" -initrd "$OUT/th/initramfs.cpio.gz" \
        -append "console=ttyS0 reboot=t panic=-1 no_timer_check boxlite.scenarios=$scenarios tsc_early_khz=$tsc_khz tsc=reliable kvm_amd.npt=0" \
        2>/dev/null || die "test host boot $boot failed; console: $console"
    grep -a "^BOXLITE-NESTED snapshot" "$console" | tee -a "$results"
    grep -aq "^BOXLITE-NESTED-DONE pass=$RUNS fail=0" "$console" \
        || die "boot $boot: not every run passed; console: $console"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.3f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# The first clone's figures: the part of the line before "; clone b".
field() { grep -a "^BOXLITE-NESTED snapshot PASS" "$results" | sed 's/; clone b.*//' | sed -n "s/.*$1.*/\\1/p"; }
cold="$(field 'cold boot to agent ready \([0-9.]*\)s' | median)"
cold_answering="$(field 'answering \([0-9.]*\)s; snapshot' | median)"
built="$(field 'built in \([0-9]*\) ms' | median)"
op="$(field 'restore op \([0-9]*\) us' | median)"
listening="$(awk -v b="$built" -v o="$op" 'BEGIN { printf "%.3f", b / 1000 + o / 1e6 }')"
restore="$(field 'agent answering \([0-9.]*\)s after start' | median)"
echo
echo "| $((BOOTS * RUNS)) runs, medians | cold boot | restored from the snapshot |"
echo "|---|---|---|"
echo "| VMM start → agent listening (cold: its announcement; restored: VMM built + \`restore\` op) | ${cold} s | ${listening} s |"
echo "| VMM start → agent answering Health on a fresh connection | ${cold_answering} s | ${restore} s |"
echo "| restored VMM built (files read, memory mapped, KVM state set) | | ${built} ms |"
echo "| \`restore\` op (devices woken, vCPUs resumed) | | ${op} µs |"
echo "| clone RSS / PSS with two clones running | | $(field 'RSS \([0-9]*\) MiB' | median) / $(field 'PSS \([0-9]*\) MiB' | median) MiB |"
awk -v c="$cold" -v l="$listening" -v ca="$cold_answering" -v r="$restore" 'BEGIN {
    printf "restore: %.1fx faster to a listening agent, %.1fx to an answering one\n", c / l, ca / r }'
