#!/usr/bin/env bash
# Benchmark (not a test): boot → agent ready inside the nested test host,
# boxlite-vmm vs QEMU microvm on the same guest kernel and initramfs
# (issue 4's benchmark, part 2; docs/benchmarks.md records the results).
#
#   bash scripts/bench-nested.sh [boots] [pairs]   (default 3 boots × 3 pairs)
#
# Builds a test host that carries this machine's QEMU
# (`cargo xtask testhost --with-qemu`, into $BOXLITE_BENCH_DIR, default
# /tmp/boxlite-bench-nested), boots it `boots` times under QEMU TCG with an
# emulated SVM CPU (docs/testing-nested.md) and has its driver run the
# `boot` (boxlite-vmm, jailed) and `boot-qemu` scenarios `pairs` times each,
# interleaved, the order flipped on every other boot. Each scenario starts
# its VMM and waits for the agent's "agent ready" line on the guest console.
# Prints every run and the medians.
set -euo pipefail

BOOTS="${1:-3}"
PAIRS="${2:-3}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${BOXLITE_BENCH_DIR:-/tmp/boxlite-bench-nested}"

die() { echo "error: $*" >&2; exit 1; }
command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"

mkdir -p "$OUT"
cd "$REPO_ROOT"
cargo xtask testhost --out-dir "$OUT/th" --with-qemu >/dev/null

# The outer QEMU's TSC frequency for the test host, as tests/nested_vmm.rs
# passes it (TSC calibration fails under TCG).
tsc_khz="$(awk -F: '/cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
results="$OUT/results.txt"
: >"$results"
for boot in $(seq 1 "$BOOTS"); do
    if [ $((boot % 2)) = 1 ]; then pair="boot,boot-qemu"; else pair="boot-qemu,boot"; fi
    scenarios="$pair"
    for _ in $(seq 2 "$PAIRS"); do scenarios="$scenarios,$pair"; done
    console="$OUT/console-$boot.log"
    timeout 900 qemu-system-x86_64 -M microvm -accel tcg -cpu EPYC,+svm,+npt -smp 2 -m 2048 \
        -nodefaults -no-user-config -nographic -no-reboot -serial "file:$console" \
        -kernel "$OUT/th/vmlinuz" -initrd "$OUT/th/initramfs.cpio.gz" \
        -append "console=ttyS0 reboot=t panic=-1 no_timer_check boxlite.scenarios=$scenarios tsc_early_khz=$tsc_khz tsc=reliable kvm_amd.npt=0" \
        2>/dev/null || die "test host boot $boot failed; console: $console"
    grep -a "^BOXLITE-NESTED boot" "$console" | tee -a "$results"
    grep -aq "^BOXLITE-NESTED-DONE pass=$((2 * PAIRS)) fail=0" "$console" \
        || die "boot $boot: not every scenario passed; console: $console"
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

# "agent ready X.XXs after <vmm> started (guest clock Y.YYs)" → medians.
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
column_of() {
    grep -a "^BOXLITE-NESTED $1 PASS" "$results" | sed -n "s/.*agent ready \([0-9.]*\)s after .* (guest clock \([0-9.?]*\)s\?).*/\\$2/p"
}
echo
echo "| $((BOOTS * PAIRS)) runs each | boxlite-vmm | QEMU microvm |"
echo "|---|---|---|"
echo "| VMM start → guest \"agent ready\", median (s) | $(column_of boot 1 | median) | $(column_of boot-qemu 1 | median) |"
echo "| guest clock at \"agent ready\", median (s) | $(column_of boot 2 | median) | $(column_of boot-qemu 2 | median) |"
