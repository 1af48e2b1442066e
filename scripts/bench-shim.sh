#!/usr/bin/env bash
# Benchmark (not a test): `ctr run --rm … true` latency with runc and with
# BoxLite on the same host, and the host memory (PSS) of one idle sandbox
# with each. Needs what scripts/setup.sh sets up: containerd with the
# boxlite runtime registered, the installed shim and guest assets, and the
# busybox:boxlite image.
#
#   bash scripts/bench-shim.sh [runs]      (default 10 runs per runtime)
#
# Prints a table per measurement; docs/benchmarks.md records the results.
set -euo pipefail
# shellcheck source=bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"

RUNS="${1:-10}"
IMAGE=docker.io/library/busybox:boxlite
BOXLITE=io.containerd.boxlite.v2
STATE_DIR=/run/boxlite

[ "$(id -u)" = 0 ] || die "run as root"
ctr version >/dev/null 2>&1 || die "containerd does not answer; run scripts/setup.sh first"
ctr image ls -q | grep -qx "$IMAGE" || die "image $IMAGE missing; run scripts/setup.sh first"
command -v runc >/dev/null || die "runc not found (apt-get install runc)"

echo "== ctr run --rm … true: $RUNS runs each, interleaved (one warm-up each first)"
time_run bench-warm-runc >/dev/null
time_run bench-warm-bx --runtime "$BOXLITE" >/dev/null
runc_ms=()
bx_ms=()
for i in $(seq 1 "$RUNS"); do
    runc_ms+=("$(time_run "bench-runc-$i")")
    bx_ms+=("$(time_run "bench-bx-$i" --runtime "$BOXLITE")")
done
read -r rm rmin rmax <<<"$(printf '%s\n' "${runc_ms[@]}" | stats)"
read -r bm bmin bmax <<<"$(printf '%s\n' "${bx_ms[@]}" | stats)"
printf '| runtime | median | min | max |\n|---|---|---|---|\n'
printf '| runc | %s ms | %s ms | %s ms |\n' "$rm" "$rmin" "$rmax"
printf '| boxlite | %s ms | %s ms | %s ms |\n' "$bm" "$bmin" "$bmax"

cleanup_idle() { remove_containers bench-idle-runc bench-idle-bx; }
trap cleanup_idle EXIT
cleanup_idle

echo
echo "== host memory of one idle sandbox (sleep 3600), PSS after 5 s"
ctr run -d "$IMAGE" bench-idle-runc sleep 3600 >/dev/null
ctr run -d --runtime "$BOXLITE" "$IMAGE" bench-idle-bx sleep 3600 >/dev/null
sleep 5
# runc: its shim plus the container's processes (they live on the host).
runc_pids=$(pids_mentioning "-id bench-idle-runc")
runc_pids="$runc_pids $(ctr task ps bench-idle-runc | awk 'NR > 1 {print $1}')"
# BoxLite: its shim plus the VM and helper processes of the sandbox dir
# (the container's processes are inside the VM's memory).
bx_shim=$(pids_mentioning "-id bench-idle-bx")
bx_vm=$(pids_mentioning "$STATE_DIR/bench-idle-bx")
printf '| runtime | processes | PSS |\n|---|---|---|\n'
printf '| runc | shim + container (%s) | %s MiB |\n' "$(echo $runc_pids | wc -w)" "$(pss_mib $runc_pids)"
printf '| boxlite | shim (%s) | %s MiB |\n' "$(echo $bx_shim | wc -w)" "$(pss_mib $bx_shim)"
for pid in $bx_vm; do
    printf '| boxlite | %s | %s MiB |\n' "$(exe_name "$pid")" "$(pss_mib "$pid")"
done
printf '| boxlite | total | %s MiB |\n' "$(pss_mib $bx_shim $bx_vm)"

echo
echo "== CPU of the idle sandboxes over 10 s (millicores)"
r0="$(cpu_ms $runc_pids)"; b0="$(cpu_ms $bx_shim $bx_vm)"
sleep 10
r1="$(cpu_ms $runc_pids)"; b1="$(cpu_ms $bx_shim $bx_vm)"
printf '| runtime | CPU while idle |\n|---|---|\n'
printf '| runc | %s m |\n' $(((r1 - r0) / 10))
printf '| boxlite | %s m |\n' $(((b1 - b0) / 10))
