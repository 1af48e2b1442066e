# Shared helpers of the benchmark scripts (bench-shim.sh on a host,
# bench-node.sh in the nested node). Source, don't run. Timings and memory
# figures only: nothing here decides pass or fail.

die() { echo "error: $*" >&2; exit 1; }

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

# Prints "median min max" of the numbers on stdin, with $1 decimals
# (default 0).
stats() {
    python3 -c '
import statistics, sys
d = int(sys.argv[1])
v = [float(x) for x in sys.stdin.read().split()]
print(" ".join(f"{x:.{d}f}" for x in (statistics.median(v), min(v), max(v))))' "${1:-0}"
}

# "| label | median | min | max |" of the numbers in $2 (unit $3,
# decimals $4, default 0).
stats_row() {
    local label="$1" values="$2" unit="$3" s med min max
    s="$(printf '%s\n' $values | stats "${4:-0}")"
    read -r med min max <<<"$s"
    printf '| %s | %s %s | %s %s | %s %s |\n' "$label" "$med" "$unit" "$min" "$unit" "$max" "$unit"
}

# Inside the nested node: root, the node's KVM, its containerd answering.
require_node() {
    [ "$(id -u)" = 0 ] || die "run as root"
    [ -c /dev/kvm ] || die "no /dev/kvm"
    ctr version >/dev/null 2>&1 || die "containerd does not answer"
}

# $IMAGE in the node's containerd, imported if missing (the node carries
# scripts/common.sh on its payload disk).
ensure_node_image() {
    ctr image ls -q | grep -qx "$IMAGE" && return
    (source /payload/scripts/common.sh && import_busybox_image "$IMAGE" >/dev/null)
}

# Runs `ctr run --rm [runtime args] $IMAGE id true`; prints milliseconds.
time_run() {
    local id="$1"; shift
    local t0 t1
    t0="$(now_ms)"
    ctr run --rm "$@" "$IMAGE" "$id" true >/dev/null || die "ctr run $id failed"
    t1="$(now_ms)"
    echo $((t1 - t0))
}

# Sum of Pss (kB) of the given pids.
pss_kb() {
    local total=0 pid kb
    for pid in "$@"; do
        kb="$(awk '/^Pss:/ {print $2}' "/proc/$pid/smaps_rollup" 2>/dev/null || echo 0)"
        total=$((total + ${kb:-0}))
    done
    echo "$total"
}

# PSS of the given pids in MiB, one decimal.
pss_mib() {
    python3 -c "print(f'{$(pss_kb "$@")/1024:.1f}')"
}

# Pids whose command line or environment contains $1 (the shim's -id, the
# sandbox dir: every process the runtime spawns for a sandbox has
# BOXLITE_SANDBOX_DIR=<dir>; QEMU's arguments name only fds).
pids_mentioning() {
    local needle="$1" pid
    for pid in $(ls /proc | grep -E '^[0-9]+$'); do
        [ "$pid" = $$ ] && continue
        if { tr '\0' ' ' < "/proc/$pid/cmdline"; tr '\0' ' ' < "/proc/$pid/environ"; } 2>/dev/null \
            | grep -qF -- "$needle"; then
            echo "$pid"
        fi
    done
}

# The executable's base name of a pid.
exe_name() { basename "$(readlink "/proc/$1/exe")"; }

# CPU time (ms) used by the given pids so far: utime + stime from /proc.
cpu_ms() {
    local total=0 pid ticks hz
    hz="$(getconf CLK_TCK)"
    for pid in "$@"; do
        ticks="$(awk '{print $14 + $15}' "/proc/$pid/stat" 2>/dev/null || echo 0)"
        total=$((total + ticks))
    done
    echo $((total * 1000 / hz))
}

# Kills and deletes the containers named in the arguments, quietly.
remove_containers() {
    local id
    for id in "$@"; do ctr task kill -s SIGKILL "$id" >/dev/null 2>&1 || true; done
    sleep 1
    for id in "$@"; do
        ctr task delete -f "$id" >/dev/null 2>&1 || true
        ctr container delete "$id" >/dev/null 2>&1 || true
    done
}
