#!/usr/bin/env bash
# Benchmark (not a test), inside the nested node (docs/testing-nested.md):
# sandboxes restored from a template against booted ones, on the builtin
# backend (docs/templates.md). docs/benchmarks.md, "Templates", records
# results.
#
#   scripts/nested-run.sh --memory 6144 --copy scripts/bench-lib.sh \
#       -- scripts/bench-templates.sh [runs] [pods]     (default 10 and 10)
#
# Env: BENCH_SETTLE_SECS (idle time before PSS is read, default 20).
#
# 1. `ctr run --rm IMAGE id true`: runc, BoxLite booted (templates off)
#    and BoxLite from its template; one warm-up each (the template's is
#    the boot that captures it), then `runs` rounds, each running all
#    three (order rotated).
# 2. PSS of `pods` idle pods (`sleep 3600`), booted, then from the
#    template: started one after the other, read BENCH_SETTLE_SECS after
#    the last, summed over the shims and every process of each sandbox.
#
# Templates are switched by editing `enabled = …` of `[templates]` in the
# BoxLite config before each sandbox is created: every new shim reads it.
set -euo pipefail
shopt -s inherit_errexit
here="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source=bench-lib.sh
if [ -f "$here/bench-lib.sh" ]; then source "$here/bench-lib.sh"; else source ./bench-lib.sh; fi

RUNS="${1:-10}"
PODS="${2:-10}"
SETTLE_SECS="${BENCH_SETTLE_SECS:-20}"
IMAGE=docker.io/library/busybox:boxlite
BOXLITE=io.containerd.boxlite.v2
CONFIG=/etc/boxlite/boxlite.toml
STATE_DIR=/run/boxlite

preflight() {
    require_node
    grep -q '^backend = "builtin"$' "$CONFIG" || die "$CONFIG does not set backend = \"builtin\""
    grep -qE '^#? ?enabled = ' "$CONFIG" || die "$CONFIG has no '[templates] enabled' line"
    ensure_node_image
}

# Sets `[templates] enabled` for every shim started from now on.
use_templates() {
    sed -i -E "s/^#? ?enabled = .*/enabled = $1/" "$CONFIG"
}

run_once() {
    local how="$1" id="$2"
    case "$how" in
        runc) time_run "$id" ;;
        booted) use_templates false; time_run "$id" --runtime "$BOXLITE" ;;
        template) use_templates true; time_run "$id" --runtime "$BOXLITE" ;;
    esac
}

bench_run() {
    local order=(runc booted template) how i k
    declare -A ms=()
    echo "== 1. ctr run --rm … true: $RUNS rounds, runc/booted/template interleaved (order rotated), one warm-up each"
    for how in "${order[@]}"; do run_once "$how" "warm-$how" >/dev/null; done
    ls -l /var/lib/boxlite/templates/ | sed 's/^/  templates: /'
    for i in $(seq 1 "$RUNS"); do
        for k in 0 1 2; do
            how="${order[$(((i + k) % 3))]}"
            ms[$how]+=" $(run_once "$how" "run-$how-$i")"
        done
    done
    echo
    printf '| `ctr run --rm … true` (%s runs) | median | min | max |\n|---|---|---|---|\n' "$RUNS"
    stats_row runc "${ms[runc]}" ms
    stats_row "BoxLite, booted" "${ms[booted]}" ms
    stats_row "BoxLite, from its template" "${ms[template]}" ms
    echo
    echo "all runs (ms): runc:${ms[runc]}; booted:${ms[booted]}; template:${ms[template]}"
}

pod_ids() { for i in $(seq 1 "$PODS"); do echo "pss-$1-$i"; done; }

# Total PSS (MiB) of the pods of kind $1: their shims and every process
# whose command line or environment names a sandbox directory of theirs.
pods_pss() {
    local pids="" id
    for id in $(pod_ids "$1"); do
        pids+=" $(pids_mentioning "-id $id") $(pids_mentioning "$STATE_DIR/$id")"
    done
    pss_mib $pids
}

bench_pss() {
    local how id total
    echo "== 2. PSS of $PODS idle pods (sleep 3600), started one after the other, read ${SETTLE_SECS} s after the last"
    echo
    printf '| %s idle pods | total PSS | per pod |\n|---|---|---|\n' "$PODS"
    for how in booted template; do
        [ "$how" = booted ] && use_templates false || use_templates true
        for id in $(pod_ids "$how"); do
            ctr run -d --runtime "$BOXLITE" "$IMAGE" "$id" sleep 3600 >/dev/null || die "starting $id failed"
        done
        sleep "$SETTLE_SECS"
        total="$(pods_pss "$how")"
        printf '| %s | %s MiB | %s MiB |\n' "$how" "$total" "$(python3 -c "print(f'{$total / $PODS:.1f}')")"
        # shellcheck disable=SC2046
        remove_containers $(pod_ids "$how")
    done
}

cleanup() {
    # shellcheck disable=SC2046
    remove_containers $(pod_ids booted) $(pod_ids template)
    use_templates true
}

main() {
    preflight
    trap cleanup EXIT
    echo "node: $(uname -r), nproc $(nproc), $(awk '/MemTotal/ {printf "%d MiB", $2 / 1024}' /proc/meminfo)"
    echo "BoxLite config: $(grep -v '^#' "$CONFIG" | grep -E '^(backend|accel|vcpus|memory_mib|enabled) ' | tr '\n' ' ')"
    echo "start: $(date -u '+%F %T UTC')"
    echo
    bench_run
    echo
    bench_pss
    echo
    echo "end: $(date -u '+%F %T UTC'), node load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

main
