#!/usr/bin/env bash
# Boots the nested test host N times in a row and tallies the runs
# (docs/testing-nested.md, "Boot loops"): the flakiness check for Linux
# under boxlite-vmm.
#
#   scripts/nested-boot-loop.sh [--out DIR] [--append ARGS] [--cpu MODEL]
#       [--smp N] [--accel ACCEL] [--timeout SECS] [--keep-all] N [SCENARIOS]
#
# Each run is the QEMU command of tests/nested_vmm.rs (same test-host
# command line, same driver initramfs; one outer boot runs every scenario,
# default: the driver's default list), without cargo. A run is clean when
# the driver printed a PASS for every scenario and its DONE line, QEMU
# exited 0, and the test host's console has no kernel BUG, WARNING, Oops or
# panic. A failing run's console is kept as DIR/run-<i>.console.log (with
# QEMU's stderr and exit in DIR/run-<i>.qemu.log); --keep-all keeps every
# run's. Prints one line per run to stdout (also DIR/tally.txt) and ends
# with "N clean, M failed" and each failure's signature: the console's
# BUG:, WARNING:, Oops, panic, skew, Unhandled, KVM_EXIT_SHUTDOWN and
# FAIL lines. Exits 0 only if every run was clean.
#
# --append adds test-host kernel arguments (e.g. "kvm_amd.nested=0");
# --cpu, --smp and --accel change the outer QEMU's CPU model, count and
# accelerator (defaults EPYC,+svm,+npt, 2 and tcg, as the test; e.g.
# --accel tcg,thread=single). --timeout bounds one run (default 420 s).
#
# Environment: BOXLITE_TESTHOST_KERNEL and BOXLITE_TESTHOST_INITRAMFS
# (default build/testhost/vmlinuz and build/testhost/initramfs.cpio.gz, what
# `cargo xtask testhost` writes), BOXLITE_TESTHOST_TSC_KHZ (the host's TSC
# frequency; default from /proc/cpuinfo).
set -euo pipefail

usage() {
    sed -n '7,8p' "${BASH_SOURCE[0]}" | sed 's/^# *//' >&2
    exit 2
}

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="" append="" cpu="EPYC,+svm,+npt" smp=2 accel=tcg timeout=420 keep_all=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out="$2"; shift 2 ;;
        --append) append="$2"; shift 2 ;;
        --cpu) cpu="$2"; shift 2 ;;
        --smp) smp="$2"; shift 2 ;;
        --accel) accel="$2"; shift 2 ;;
        --timeout) timeout="$2"; shift 2 ;;
        --keep-all) keep_all=1; shift ;;
        -h|--help) usage ;;
        -*) echo "nested-boot-loop: unknown option $1" >&2; usage ;;
        *) break ;;
    esac
done
[ $# -ge 1 ] && [ $# -le 2 ] || usage
n="$1"
[[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "nested-boot-loop: N must be a positive number, not $n" >&2; exit 2; }
scenarios="${2:-$(sed -n 's/^pub const NESTED_SCENARIOS: &str = "\(.*\)";/\1/p' "$repo/tests/src/lib.rs")}"
[ -n "$scenarios" ] || { echo "nested-boot-loop: cannot read the default scenarios from tests/src/lib.rs" >&2; exit 2; }

kernel="${BOXLITE_TESTHOST_KERNEL:-$repo/build/testhost/vmlinuz}"
initramfs="${BOXLITE_TESTHOST_INITRAMFS:-$repo/build/testhost/initramfs.cpio.gz}"
for f in "$kernel" "$initramfs"; do
    [ -f "$f" ] || { echo "nested-boot-loop: no $f: run cargo xtask testhost (or set BOXLITE_TESTHOST_KERNEL/_INITRAMFS)" >&2; exit 2; }
done
tsc_khz="${BOXLITE_TESTHOST_TSC_KHZ:-$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)}"
[ "${tsc_khz:-0}" -gt 0 ] || { echo "nested-boot-loop: cannot read the host's TSC frequency from /proc/cpuinfo; set BOXLITE_TESTHOST_TSC_KHZ" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "nested-boot-loop: no qemu-system-x86_64 (install qemu-system-x86)" >&2; exit 2; }

[ -n "$out" ] || out="$(mktemp -d /tmp/boxlite-boot-loop.XXXXXX)"
mkdir -p "$out"
tally="$out/tally.txt"
: >"$tally"

# The test-host command line of tests/nested_vmm.rs (keep the two alike).
# tsc_early_khz and tsc=reliable: docs/testing-nested.md, "Why
# tsc_early_khz" and "The test host's clock"; kvm_amd.npt=0: "Shadow paging
# in the test host" (--append kvm_amd.npt=1 turns nested paging back on).
cmdline="console=ttyS0 reboot=t panic=-1 no_timer_check tsc_early_khz=$tsc_khz tsc=reliable kvm_amd.npt=0 boxlite.scenarios=$scenarios${append:+ $append}"
# A kernel warning reads "WARNING: CPU: n PID: …"; Debian's kernel also
# prints an informational "Speculative Return Stack Overflow: WARNING: …"
# at every boot on the EPYC model, which is not one.
signature_re='BUG:|WARNING: CPU:|Oops|Kernel panic|skew|Unhandled|KVM_EXIT_SHUTDOWN|BOXLITE-NESTED [a-z-]+ (FAIL|SKIP)'
crash_re='BUG:|WARNING: CPU:|Oops|Kernel panic'

echo "nested-boot-loop: $n runs of $scenarios; -accel $accel -cpu $cpu -smp $smp; test host: $cmdline; out $out" | tee -a "$tally"
clean=0 failed=0
failures=()
for i in $(seq 1 "$n"); do
    console="$out/run-$i.console.log"
    qlog="$out/run-$i.qemu.log"
    load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
    started=$SECONDS
    set +e
    timeout --kill-after=10 "$timeout" qemu-system-x86_64 \
        -M microvm -accel "$accel" -cpu "$cpu" -smp "$smp" -m 2048 \
        -nodefaults -no-user-config -nographic -no-reboot \
        -serial "file:$console" \
        -kernel "$kernel" -initrd "$initramfs" -append "$cmdline" \
        </dev/null >"$qlog" 2>&1
    qemu_status=$?
    set -e
    echo "qemu-exit=$qemu_status" >>"$qlog"
    took=$((SECONDS - started))

    problems=()
    [ "$qemu_status" = 0 ] || problems+=("qemu exit $qemu_status$([ "$qemu_status" = 124 ] && echo " (timeout ${timeout}s)")")
    grep -aq 'BOXLITE-NESTED-DONE' "$console" || problems+=("no DONE line")
    IFS=, read -ra want <<<"$scenarios"
    for s in "${want[@]}"; do
        grep -aqE "^BOXLITE-NESTED $s PASS " "$console" || problems+=("$s not PASS")
    done
    grep -aqE "$crash_re" "$console" && problems+=("kernel crash lines")

    done_line="$(grep -a 'BOXLITE-NESTED-DONE' "$console" | tr -d '\r' | head -n 1 || true)"
    ready="$(grep -aE '^BOXLITE-NESTED boot PASS' "$console" | grep -o 'agent ready [0-9.]*s' | head -n 1 || true)"
    clocksource="$(grep -a 'Switched to clocksource' "$console" | grep -v '^  |' | tail -n 1 | sed 's/.*clocksource //' | tr -d '\r' || true)"
    notes="$(grep -acE "$signature_re" "$console" || true)"
    line="run $i/$n: load ${load_before// /,} [${took}s] host-clock=${clocksource:-?} boot:${ready:-?} signature-lines=$notes :: ${done_line:-no DONE}"
    if [ ${#problems[@]} -eq 0 ]; then
        clean=$((clean + 1))
        echo "CLEAN $line" | tee -a "$tally"
        [ "$keep_all" = 1 ] || rm -f "$console" "$qlog"
    else
        failed=$((failed + 1))
        why="$(IFS=';'; echo "${problems[*]}")"
        echo "FAILED $line :: $why" | tee -a "$tally"
        # The test host's own lines, and boxlite-vmm's triple-fault line from
        # the driver's tails ("  | ").
        sig="$(awk -v re="$signature_re" '$0 ~ re && (!/^  \| / || /KVM_EXIT_SHUTDOWN/)' "$console" | tr -d '\r' | cut -c1-240 | head -n 12 || true)"
        failures+=("run $i ($why; console $console):"$'\n'"${sig:-  (no signature lines; see the console tail)}")
    fi
done

{
    echo "nested-boot-loop: $clean clean, $failed failed (load now $(cut -d' ' -f1-3 /proc/loadavg))"
    for f in "${failures[@]}"; do
        printf '%s\n' "$f" | sed '2,$s/^/    /'
    done
} | tee -a "$tally"
[ "$failed" = 0 ]
