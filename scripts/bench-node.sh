#!/usr/bin/env bash
# Benchmark (not a test), inside the nested node (docs/testing-nested.md):
# runc, BoxLite on the builtin backend (boxlite-vmm) and BoxLite on the
# qemu backend (QEMU microvm, -accel kvm), side by side in one run, on the
# node's KVM. docs/benchmarks.md, "Inside the nested node", records results.
#
#   scripts/nested-run.sh --memory 4096 --copy scripts/bench-lib.sh \
#       -- scripts/bench-node.sh [runs]          (default 10)
#
# Env: BENCH_STREAM_MIB (default 64), BENCH_STREAM_RUNS (default 3),
# BENCH_SETTLE_SECS (idle time before PSS is read, default 10).
#
# 1. `ctr run --rm IMAGE id true`: runc, builtin, qemu; one warm-up each,
#    then `runs` rounds, each round running all three (order rotated).
# 2. Into one running pod per backend: `ctr task exec … true` round trip,
#    and stdout throughput of busybox dd writing to the exec's stdout with
#    4 KiB and 1 MiB writes; builtin and qemu alternate in every round.
# 3. PSS of one idle pod per backend, alone on the node, per process.
#
# The backend is switched by editing `backend = …` in the BoxLite config
# before each sandbox is created: every new shim reads it then.
set -euo pipefail
# A failure inside $(…) ends the script too.
shopt -s inherit_errexit
here="$(dirname "${BASH_SOURCE[0]}")"
# nested-run.sh puts this script in /payload/run and --copy files in the
# working directory.
# shellcheck source=bench-lib.sh
if [ -f "$here/bench-lib.sh" ]; then source "$here/bench-lib.sh"; else source ./bench-lib.sh; fi

RUNS="${1:-10}"
STREAM_MIB="${BENCH_STREAM_MIB:-64}"
STREAM_RUNS="${BENCH_STREAM_RUNS:-3}"
SETTLE_SECS="${BENCH_SETTLE_SECS:-10}"
IMAGE=docker.io/library/busybox:boxlite
BOXLITE=io.containerd.boxlite.v2
CONFIG=/etc/boxlite/boxlite.toml
STATE_DIR=/run/boxlite
BACKENDS=(builtin qemu)
OUT="${BOXLITE_NODE_OUT:-/tmp/bench-node-out}"

# --- set-up and conditions ------------------------------------------------

preflight() {
    require_node
    grep -q '^backend = ' "$CONFIG" || die "$CONFIG has no 'backend = …' line"
    grep -q '^accel = "kvm"$' "$CONFIG" || die "$CONFIG does not set accel = \"kvm\""
    command -v runc qemu-system-x86_64 >/dev/null || die "runc or qemu-system-x86_64 missing"
    mkdir -p "$OUT"
}

# Sets the backend every shim started from now on uses.
use_backend() {
    sed -i "s/^backend = .*/backend = \"$1\"/" "$CONFIG"
}

conditions() {
    echo "node: $(uname -r), nproc $(nproc), $(awk '/MemTotal/ {printf "%d MiB", $2 / 1024}' /proc/meminfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "BoxLite config: $(grep -v '^#' "$CONFIG" | grep -E '^(backend|accel|vcpus|memory_mib) ' | tr '\n' ' ')"
    echo "QEMU: $(qemu-system-x86_64 --version | head -n1); runc: $(runc --version | head -n1)"
    echo "other processes on the node (comm, count):"
    ps --ppid 2 -p 2 --deselect --no-headers -o comm | sort | uniq -c | sort -rn | tr '\n' ' ' | sed 's/  */ /g'
    echo
}

# --- table helpers --------------------------------------------------------

median_of() { printf '%s\n' $1 | stats | cut -d' ' -f1; }

# builtin ÷ qemu of two medians, two decimals.
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

# --- 1. ctr run --rm … true -----------------------------------------------

# Times one `ctr run --rm … true` of runtime $1 (runc, builtin, qemu).
run_once() {
    local rt="$1" id="$2"
    case "$rt" in
        runc) time_run "$id" ;;
        *) use_backend "$rt"; time_run "$id" --runtime "$BOXLITE" ;;
    esac
}

bench_run() {
    local order=(runc builtin qemu) rt i k
    declare -A ms=()
    echo "== 1. ctr run --rm … true: $RUNS rounds, runc/builtin/qemu interleaved (order rotated), one warm-up each"
    for rt in "${order[@]}"; do run_once "$rt" "warm-$rt" >/dev/null; done
    for i in $(seq 1 "$RUNS"); do
        for k in 0 1 2; do
            rt="${order[$(((i + k) % 3))]}"
            ms[$rt]+=" $(run_once "$rt" "run-$rt-$i")"
        done
    done
    echo
    printf '| `ctr run --rm … true` (%s runs) | median | min | max |\n|---|---|---|---|\n' "$RUNS"
    stats_row runc "${ms[runc]}" ms
    stats_row "BoxLite, builtin (boxlite-vmm)" "${ms[builtin]}" ms
    stats_row "BoxLite, qemu (-accel kvm)" "${ms[qemu]}" ms
    echo
    echo "builtin ÷ qemu (medians): $(ratio "$(median_of "${ms[builtin]}")" "$(median_of "${ms[qemu]}")")"
    echo "all runs (ms): runc:${ms[runc]}; builtin:${ms[builtin]}; qemu:${ms[qemu]}"
}

# --- 2. exec round trip and stdout throughput -----------------------------

pod_id() { echo "bench-pod-$1"; }

start_pod() {
    use_backend "$1"
    ctr run -d --runtime "$BOXLITE" "$IMAGE" "$(pod_id "$1")" sleep 3600 >/dev/null \
        || die "starting the $1 pod failed"
}

# Times `ctr task exec` of "$3..." in the pod of backend $1 (exec id $2),
# its stdout counted by wc (the exec's stderr is dropped: dd's summary);
# prints "ms bytes".
time_exec() {
    local backend="$1" exec_id="$2" t0 t1 bytes
    shift 2
    t0="$(now_ms)"
    bytes="$(ctr task exec --exec-id "$exec_id" "$(pod_id "$backend")" "$@" 2>/dev/null | wc -c)" \
        || die "exec $exec_id ($*) in the $backend pod failed"
    t1="$(now_ms)"
    echo "$((t1 - t0)) $bytes"
}

# Interleaved rounds of one exec command; prints "| label | … |" rows of
# milliseconds, or of MB/s when $2 (the bytes expected) is not 0.
exec_rounds() {
    local name="$1" expect="$2" rounds="$3" b i r ms bytes
    shift 3
    declare -A out=()
    for b in "${BACKENDS[@]}"; do r="$(time_exec "$b" "warm-$name" "$@")"; done
    for i in $(seq 1 "$rounds"); do
        for b in "${BACKENDS[@]}"; do
            r="$(time_exec "$b" "$name-$i" "$@")"
            read -r ms bytes <<<"$r"
            [ "$expect" = 0 ] || [ "$bytes" = "$expect" ] || die "$name in the $b pod: $bytes bytes, expected $expect"
            if [ "$expect" = 0 ]; then out[$b]+=" $ms"; else out[$b]+=" $(mb_per_s "$expect" "$ms")"; fi
        done
    done
    for b in "${BACKENDS[@]}"; do echo "$b ${out[$b]}"; done
}

mb_per_s() { python3 -c "print(f'{$1 / $2 / 1000:.1f}')"; }

# A table titled $1 of exec_rounds' output ($3) in unit $2, decimals $4.
exec_table() {
    local title="$1" unit="$2" lines="$3" b vals
    printf '| %s | median | min | max |\n|---|---|---|---|\n' "$title"
    while read -r b vals; do stats_row "$b" "$vals" "$unit" "${4:-0}"; done <<<"$lines"
    echo "all runs ($unit): $(sed 's/ /:/' <<<"$lines" | paste -sd';' | sed 's/;/; /g')"
    echo
}

bench_exec() {
    local bytes=$((STREAM_MIB * 1024 * 1024)) lines
    echo "== 2. exec round trip and stdout throughput: one running pod per backend (sleep 3600), builtin/qemu alternating, one warm-up each"
    for b in "${BACKENDS[@]}"; do start_pod "$b"; done
    sleep "$SETTLE_SECS"
    echo
    lines="$(exec_rounds exec 0 "$RUNS" true)"
    exec_table "\`ctr task exec … true\` ($RUNS runs)" ms "$lines"
    lines="$(exec_rounds dd4k "$bytes" "$STREAM_RUNS" busybox dd if=/dev/zero bs=4k count=$((bytes / 4096)))"
    exec_table "stdout, dd bs=4k, $STREAM_MIB MiB ($STREAM_RUNS runs)" MB/s "$lines" 1
    lines="$(exec_rounds dd1m "$bytes" "$STREAM_RUNS" busybox dd if=/dev/zero bs=1M count="$STREAM_MIB")"
    exec_table "stdout, dd bs=1M, $STREAM_MIB MiB ($STREAM_RUNS runs)" MB/s "$lines" 1
    save_pod_logs
    remove_containers "$(pod_id builtin)" "$(pod_id qemu)"
}

# The sandbox dirs' logs (VMM, helpers, console) to $BOXLITE_NODE_OUT.
save_pod_logs() {
    local b dir
    for b in "${BACKENDS[@]}"; do
        dir="$STATE_DIR/$(pod_id "$b")"
        [ -d "$dir" ] || continue
        mkdir -p "$OUT/$b"
        find "$dir" -maxdepth 1 -type f -name '*.log' -exec cp {} "$OUT/$b/" \;
    done
}

# --- 3. PSS of one idle pod -----------------------------------------------

# PSS rows of the pod of backend $1: the shim, each VM/helper process, total.
pss_rows() {
    local b="$1" shim vm pid
    shim="$(pids_mentioning "-id $(pod_id "$b")")"
    vm="$(pids_mentioning "$STATE_DIR/$(pod_id "$b")")"
    [ -n "$vm" ] || die "no process mentions $STATE_DIR/$(pod_id "$b")"
    printf '| %s | shim (%s) | %s MiB |\n' "$b" "$(echo $shim | wc -w)" "$(pss_mib $shim)"
    for pid in $vm; do
        printf '| %s | %s | %s MiB |\n' "$b" "$(exe_name "$pid")" "$(pss_mib "$pid")"
    done
    printf '| %s | **total** | **%s MiB** |\n' "$b" "$(pss_mib $shim $vm)"
}

bench_pss() {
    local b
    echo "== 3. PSS of one idle pod (sleep 3600), alone on the node, read ${SETTLE_SECS} s after start"
    echo
    printf '| backend | process | PSS |\n|---|---|---|\n'
    for b in "${BACKENDS[@]}"; do
        start_pod "$b"
        sleep "$SETTLE_SECS"
        pss_rows "$b"
        remove_containers "$(pod_id "$b")"
    done
}

# --- main -----------------------------------------------------------------

cleanup() {
    remove_containers "$(pod_id builtin)" "$(pod_id qemu)"
    use_backend builtin
}

main() {
    preflight
    ensure_node_image
    trap cleanup EXIT
    conditions
    echo "start: $(date -u '+%F %T UTC')"
    echo
    bench_run
    echo
    bench_exec
    bench_pss
    echo
    echo "end: $(date -u '+%F %T UTC'), node load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

main
