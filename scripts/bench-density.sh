#!/usr/bin/env bash
# Benchmark (not a test): pod density. N idle pods at once (`ctr run -d …
# sleep 3600`) for N = 1, 5, 10 on each backend, and what each costs the
# host: PSS of its shim and of every process of its VM, the guest RAM those
# touched, what the guest itself uses, the pod cgroup's memory, and CPU
# while idle. docs/benchmarks.md, "Density and the RuntimeClass overhead",
# records results; k8s/runtimeclass.yaml's overhead comes from them.
#
# In the nested node (docs/testing-nested.md), builtin and qemu (-accel kvm):
#
#   scripts/nested-run.sh --memory 4096 --copy scripts/bench-lib.sh \
#       -- scripts/bench-density.sh [N...]           (default 1 5 10)
#
# On a host without a BoxLite containerd, with a private containerd this
# script starts and removes again (its own config, root, state and socket
# under /tmp/bxd.*; root; busybox-static for the image):
#
#   BOXLITE_SHIM=<dir>/containerd-shim-boxlite-v2 \
#       bash scripts/bench-density.sh --private-containerd [N...]
#
#   boxlite-vsock and boxlite-vmm are taken from the shim's directory, the
#   guest from $BOXLITE_KERNEL / $BOXLITE_INITRAMFS (default build/guest/,
#   then /usr/share/boxlite); the backend defaults to qemu there, `accel`
#   to the config's auto.
#
# Env: BENCH_BACKENDS (default "builtin qemu"; "qemu" with
# --private-containerd), BENCH_GUEST_CONFIG (--private-containerd: more
# [guest] lines of its boxlite.toml, e.g. "memory_headroom_mib = 512"),
# BENCH_SETTLE_SECS (idle time after the last pod started, before anything
# is read; default 10), BENCH_CPU_SECS (the idle CPU window; default 10).
#
# For each backend and N: the backend is set in the BoxLite config
# (`backend = …`, read by every new shim), N pods are started one after the
# other, left alone BENCH_SETTLE_SECS, then, in this order:
# 1. CPU: utime + stime of every shim and VM process over BENCH_CPU_SECS;
# 2. memory: for every pod its shim (pid by `-id ID` in its command line)
#    and its VM's processes: those in the pod's cgroup (ctr's /default/ID;
#    docs/resources.md) and those whose command line or environment mentions the sandbox
#    dir (the two sets must agree; a difference is printed). Per process
#    the PSS (/proc/PID/smaps_rollup) and the PSS of its memfd mappings
#    (/proc/PID/smaps; the guest's RAM, which the VMM and its vhost-user
#    helpers map); per pod the cgroup's memory.current (v2) or
#    memory.usage_in_bytes (v1) and the main lines of its memory.stat;
#    the host's MemAvailable before the first pod and now;
# 3. the guest's own view: `cat /proc/meminfo` through `ctr task exec` in
#    every pod (the guest kernel's meminfo: the container has its own
#    proc mount but no view of its own of /proc/meminfo); guest used =
#    MemTotal - MemAvailable.
# Then the pods are removed. Per backend a table: N, total PSS, PSS per
# pod, guest RAM touched, the host processes' own (PSS - guest RAM), guest
# used, host overhead per pod (PSS per pod - guest used), cgroup memory,
# MemAvailable drop, idle CPU; and the PSS per process kind. The issue's
# target, <= 40 MiB of host overhead per idle pod, is compared with; the
# exit status does not depend on it.
set -euo pipefail
# A failure inside $(…) ends the script too.
shopt -s inherit_errexit
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# nested-run.sh puts this script in /payload/run and --copy files in the
# working directory.
# shellcheck source=bench-lib.sh
if [ -f "$here/bench-lib.sh" ]; then source "$here/bench-lib.sh"; else source ./bench-lib.sh; fi

PRIVATE=0
if [ "${1:-}" = --private-containerd ]; then PRIVATE=1; shift; fi
COUNTS=("$@")
[ "${#COUNTS[@]}" -gt 0 ] || COUNTS=(1 5 10)
SETTLE_SECS="${BENCH_SETTLE_SECS:-10}"
CPU_SECS="${BENCH_CPU_SECS:-10}"
IMAGE=docker.io/library/busybox:boxlite
BOXLITE=io.containerd.boxlite.v2
if [ "$PRIVATE" = 1 ]; then
    read -r -a BACKENDS <<<"${BENCH_BACKENDS:-qemu}"
else
    read -r -a BACKENDS <<<"${BENCH_BACKENDS:-builtin qemu}"
fi
# The issue's target: host memory per idle pod beyond what its guest uses.
TARGET_MIB=40
CONFIG="${BOXLITE_CONFIG:-/etc/boxlite/boxlite.toml}"
STATE_DIR=/run/boxlite
PRIV_DIR=""
PRIV_CONTAINERD=""

# --- set-up and conditions ------------------------------------------------

preflight() {
    local n
    [ "$(id -u)" = 0 ] || die "run as root"
    [ -c /dev/kvm ] || [ "$PRIVATE" = 1 ] || die "no /dev/kvm"
    for n in "${COUNTS[@]}"; do
        [[ "$n" =~ ^[1-9][0-9]?$ ]] || die "N must be 1..99, not $n"
    done
    ctr version >/dev/null 2>&1 || die "containerd does not answer (--private-containerd starts one)"
    grep -q '^backend = ' "$CONFIG" || die "$CONFIG has no 'backend = …' line"
    [ "$PRIVATE" = 1 ] || grep -q '^accel = "kvm"$' "$CONFIG" || die "$CONFIG does not set accel = \"kvm\""
}

ensure_image() {
    ctr image ls -q | grep -qx "$IMAGE" && return
    # The node carries scripts/common.sh on its payload disk.
    local common=/payload/scripts/common.sh
    [ -f "$common" ] || common="$here/common.sh"
    bash -c 'source "$1" && import_busybox_image "$2" >/dev/null' _ "$common" "$IMAGE"
}

# A containerd of our own: config, root, state, socket and the BoxLite
# config under $PRIV_DIR; `ctr` finds it through CONTAINERD_ADDRESS.
start_private_containerd() {
    local shim bindir kernel initramfs i
    shim="${BOXLITE_SHIM:-$(command -v containerd-shim-boxlite-v2 || true)}"
    [ -x "$shim" ] || die "--private-containerd: set BOXLITE_SHIM to the shim binary"
    bindir="$(cd "$(dirname "$shim")" && pwd)"
    kernel="${BOXLITE_KERNEL:-}" initramfs="${BOXLITE_INITRAMFS:-}"
    if [ -z "$kernel" ] && [ -f "$here/../build/guest/vmlinux" ]; then
        kernel="$here/../build/guest/vmlinux" initramfs="$here/../build/guest/initramfs.cpio.gz"
    fi
    kernel="${kernel:-/usr/share/boxlite/vmlinux}" initramfs="${initramfs:-/usr/share/boxlite/initramfs}"
    if [ ! -f "$kernel" ] || [ ! -f "$initramfs" ]; then
        die "no guest kernel/initramfs ($kernel, $initramfs)"
    fi
    # Short: socket paths under it must stay < 108 bytes.
    PRIV_DIR="$(mktemp -d /tmp/bxd.XXXXXX)"
    mkdir -p "$PRIV_DIR/bin"
    ln -s "$(readlink -f "$shim")" "$PRIV_DIR/bin/containerd-shim-boxlite-v2"
    CONFIG="$PRIV_DIR/boxlite.toml"
    STATE_DIR="$PRIV_DIR/run"
    {
        printf '[hypervisor]\nbackend = "%s"\n' "${BACKENDS[0]}"
        [ ! -x "$bindir/boxlite-vsock" ] || printf 'vhost_vsock_binary = "%s"\n' "$bindir/boxlite-vsock"
        [ ! -x "$bindir/boxlite-vmm" ] || printf 'vmm_binary = "%s"\n' "$bindir/boxlite-vmm"
        printf '[guest]\nkernel = "%s"\ninitramfs = "%s"\n' "$(readlink -f "$kernel")" "$(readlink -f "$initramfs")"
        [ -z "${BENCH_GUEST_CONFIG:-}" ] || printf '%s\n' "$BENCH_GUEST_CONFIG"
        printf '[runtime]\nstate_dir = "%s"\n' "$STATE_DIR"
    } >"$CONFIG"
    cat >"$PRIV_DIR/config.toml" <<EOT
version = 2
root = "$PRIV_DIR/root"
state = "$PRIV_DIR/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$PRIV_DIR/c.sock"
[ttrpc]
  address = "$PRIV_DIR/c.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$PRIV_DIR/opt"
EOT
    PATH="$PRIV_DIR/bin:$PATH" BOXLITE_CONFIG="$CONFIG" \
        containerd --config "$PRIV_DIR/config.toml" </dev/null >"$PRIV_DIR/containerd.log" 2>&1 &
    PRIV_CONTAINERD=$!
    export CONTAINERD_ADDRESS="$PRIV_DIR/c.sock"
    for i in $(seq 1 100); do
        ctr version >/dev/null 2>&1 && break
        [ "$i" -lt 100 ] || die "the private containerd did not answer; log: $PRIV_DIR/containerd.log"
        sleep 0.2
    done
    echo "private containerd: pid $PRIV_CONTAINERD, $PRIV_DIR; shim $(readlink -f "$shim")"
}

stop_private_containerd() {
    local m
    [ -n "$PRIV_CONTAINERD" ] || return 0
    kill "$PRIV_CONTAINERD" 2>/dev/null || true
    wait "$PRIV_CONTAINERD" 2>/dev/null || true
    # Nothing should be mounted under it any more; if something is, say so
    # and unmount it before the directory goes.
    while read -r m; do
        echo "warning: $m still mounted; unmounting" >&2
        umount "$m" || umount -l "$m" || true
    done < <(awk -v d="$PRIV_DIR/" 'index($5, d) == 1 {print $5}' /proc/self/mountinfo | sort -r)
    rm -rf "$PRIV_DIR"
    PRIV_CONTAINERD=""
}

# On cgroup v2, the memory controller for ctr's /default/<id> (+memory in
# the subtree_control of / and /default), as the kubelet's pod cgroups have
# it: without it the pod cgroup has no memory.current to read. Only in the
# node (a throwaway machine), not with --private-containerd.
ensure_memory_accounting() {
    local root=/sys/fs/cgroup
    [ "$PRIVATE" = 0 ] && [ -f "$root/cgroup.controllers" ] || return 0
    if grep -qw memory "$root/cgroup.subtree_control" && [ -d "$root/default" ] \
        && grep -qw memory "$root/default/cgroup.subtree_control"; then
        return 0
    fi
    echo "cgroup v2: enabling the memory controller below / and /default for the pods' cgroups"
    echo +memory >"$root/cgroup.subtree_control"
    mkdir -p "$root/default"
    echo +memory >"$root/default/cgroup.subtree_control"
}

# Sets the backend every shim started from now on uses.
use_backend() {
    sed -i "s/^backend = .*/backend = \"$1\"/" "$CONFIG"
}

conditions() {
    echo "machine: $(uname -r), nproc $(nproc), $(awk '/MemTotal/ {printf "%d MiB", $2 / 1024}' /proc/meminfo), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "BoxLite config ($CONFIG): $(grep -v '^#' "$CONFIG" | grep -E '^(backend|accel|vcpus|memory_mib|reserved_memory_mib|memory_headroom_mib) ' | tr '\n' ' ')"
    echo "QEMU: $(qemu-system-x86_64 --version 2>/dev/null | head -n1 || echo none)"
    echo "N: ${COUNTS[*]}; backends: ${BACKENDS[*]}; settle ${SETTLE_SECS} s, CPU window ${CPU_SECS} s"
    echo "processes running (comm, count):"
    ps --ppid 2 -p 2 --deselect --no-headers -o comm | sort | uniq -c | sort -rn | tr '\n' ' ' | sed 's/  */ /g'
    echo
}

# --- measuring ------------------------------------------------------------

# Fixed width within a batch: no id is a prefix of another.
pod_id() { printf 'dens-%02dx-%02d' "$1" "$2"; }

mem_available_kb() { awk '/^MemAvailable:/ {print $2}' /proc/meminfo; }

# The processes of the pods $2.. (state dir $1), one line each:
#   proc ID KIND PID PSS_KB MEMFD_PSS_KB
# KIND is "shim", the executable's name, NAME/child for a child of a
# process of the same name (the jailed boxlite-vmm's VM process under its
# waiting parent; virtiofsd's sandbox child), or kthread:NAME for a kernel
# thread in the pod's cgroup (KVM's kvm-nx-lpage-recovery-PID, no memory
# of its own: PSS 0, its CPU counted). Per pod:
#   cgroup ID DIR USAGE_KB key=KB…      (memory.stat lines, v2 or v1)
# and `warn …` when the pod's cgroup and the processes mentioning its
# sandbox dir differ, `memfd NAME…` with the memfd mappings counted.
pod_processes() {
    python3 - "$@" <<'EOF'
import os, re, sys

state_dir, ids = sys.argv[1], sys.argv[2:]

def read(path, mode="r"):
    try:
        with open(path, mode) as f:
            return f.read()
    except OSError:
        return None

procs = {}
for p in os.listdir("/proc"):
    if not p.isdigit() or int(p) == os.getpid():
        continue
    cmd, stat = read(f"/proc/{p}/cmdline", "rb"), read(f"/proc/{p}/stat")
    if not cmd or stat is None:
        continue
    try:
        exe = os.readlink(f"/proc/{p}/exe").removesuffix(" (deleted)")
    except OSError:
        exe = (read(f"/proc/{p}/comm") or "?").strip()
    # The environment too: every process the runtime spawns for a sandbox
    # has BOXLITE_SANDBOX_DIR=<dir> (QEMU's arguments name only fds).
    env = read(f"/proc/{p}/environ", "rb") or b""
    procs[int(p)] = (
        int(stat.rsplit(")", 1)[1].split()[1]),
        os.path.basename(exe),
        (cmd + b" " + env).replace(b"\0", b" ").decode(errors="replace"),
    )

mounts = [l.split() for l in (read("/proc/mounts") or "").splitlines()]

def memcg_dir(pid):
    lines = [l.split(":", 2) for l in (read(f"/proc/{pid}/cgroup") or "").splitlines()]
    for hid, ctrls, path in lines:
        if "memory" in ctrls.split(","):
            mnt = next(m[1] for m in mounts if m[2] == "cgroup" and "memory" in m[3].split(","))
            return mnt + path
    for hid, ctrls, path in lines:
        if hid == "0":
            mnt = next(m[1] for m in mounts if m[2] == "cgroup2")
            return mnt + path
    return None

def pss(pid):
    total = memfd = 0
    names, in_memfd = set(), False
    for line in (read(f"/proc/{pid}/smaps") or "").splitlines():
        f = line.split()
        if "-" in f[0] and not f[0].endswith(":"):
            in_memfd = len(f) >= 6 and f[5].startswith("/memfd:")
            if in_memfd:
                names.add(f[5])
        elif f[0] == "Pss:":
            total += int(f[1])
            if in_memfd:
                memfd += int(f[1])
    rollup = read(f"/proc/{pid}/smaps_rollup") or ""
    for line in rollup.splitlines():
        if line.startswith("Pss:"):
            total = int(line.split()[1])
    return total, memfd, names

V2_KEYS = ["anon", "file", "shmem", "kernel", "pagetables", "sec_pagetables", "slab", "kernel_stack", "percpu"]
V1_KEYS = ["rss", "cache", "shmem", "mapped_file"]
memfd_names = set()
for pod in ids:
    shim = [p for p, (_, _, c) in procs.items() if f"-id {pod} " in c + " " and "-id" in c]
    mention = {p for p, (_, _, c) in procs.items() if f"{state_dir}/{pod}" in c}
    cg = memcg_dir(min(mention)) if mention else None
    in_cg = set()
    if cg:
        in_cg = {int(x) for x in (read(f"{cg}/cgroup.procs") or "").split()}
    gone = in_cg - set(procs)
    if cg and in_cg - gone != mention:
        print("warn", pod, "cgroup", cg, "has", sorted(in_cg - gone), "; mentioning the sandbox dir:", sorted(mention))
    kthreads = []
    for p in sorted(gone):
        st = dict(l.split(":", 1) for l in (read(f"/proc/{p}/status") or "").splitlines() if ":" in l)
        st = {k: v.strip() for k, v in st.items()}
        ppid = int(st.get("PPid", 0))
        if ppid == 2:
            # A kernel thread KVM starts for the VM and puts in its
            # creator's cgroup (kvm-nx-lpage-recovery-PID): no memory of its
            # own; its CPU counts.
            kthreads.append((p, "kthread:" + re.sub(r"-[0-9]+$", "", st.get("Name", "?"))))
            continue
        print("warn", pod, f"pid {p} in the cgroup has no command line: Name {st.get('Name')},",
              f"State {st.get('State')}, Threads {st.get('Threads')}, PPid {ppid}",
              f"({procs.get(ppid, (0, '?'))[1]})")
    vm = sorted((mention | in_cg) - gone)
    for p in shim:
        t, m, n = pss(p)
        print("proc", pod, "shim", p, t, m)
    for p in vm:
        ppid, exe, _ = procs.get(p, (0, "?", ""))
        kind = exe + "/child" if ppid in vm and procs.get(ppid, (0, None))[1] == exe else exe
        t, m, n = pss(p)
        memfd_names |= n
        print("proc", pod, kind, p, t, m)
    for p, kind in kthreads:
        print("proc", pod, kind, p, 0, 0)
    if cg:
        current, v1 = read(f"{cg}/memory.current"), read(f"{cg}/memory.usage_in_bytes")
        if current is not None:
            usage, keys = int(current) // 1024, V2_KEYS
        elif v1 is not None:
            usage, keys = int(v1) // 1024, V1_KEYS
        else:
            # No memory controller on this cgroup.
            usage, keys = "na", []
        stat = dict(l.split() for l in (read(f"{cg}/memory.stat") or "").splitlines())
        extra = [f"{k}={int(stat[k]) // 1024}" for k in keys if k in stat]
        kmem = read(f"{cg}/memory.kmem.usage_in_bytes")
        if kmem is not None:
            extra.append(f"kmem={int(kmem) // 1024}")
        print("cgroup", pod, cg, usage, *extra)
    else:
        print("warn", pod, "no VM process found")
print("memfd", *sorted(memfd_names))
EOF
}

# MemTotal and MemAvailable (kB) of the guest of pod $1, as the guest
# kernel counts them.
guest_meminfo() {
    ctr task exec --exec-id meminfo "$1" cat /proc/meminfo \
        | awk '/^MemTotal:/ {t = $2} /^MemAvailable:/ {a = $2} END {print t, a}'
}

mib() { python3 -c "print(f'{$1 / 1024:.1f}')"; }

# One batch: N pods of backend $1; prints the details and appends a row to
# SUMMARY[$1] and the per-kind PSS to KINDS[$1].
bench_batch() {
    local b="$1" n="$2" ids=() id k t0 t1 avail0 avail1 lines pids=() c0 c1 s0 s1
    local mc total_kb memfd_kb shim_kb cg_kb used_kb gt ga guest_total_kb=0 guest_used_kb=0
    for k in $(seq 1 "$n"); do ids+=("$(pod_id "$n" "$k")"); done
    use_backend "$b"
    avail0="$(mem_available_kb)"
    t0="$(now_ms)"
    for id in "${ids[@]}"; do
        ctr run -d --runtime "$BOXLITE" "$IMAGE" "$id" sleep 3600 >/dev/null || die "ctr run $id ($b) failed"
    done
    t1="$(now_ms)"
    echo "-- $b, N = $n: $n pods started one after the other in $((t1 - t0)) ms; idle ${SETTLE_SECS} s"
    sleep "$SETTLE_SECS"
    avail1="$(mem_available_kb)"

    lines="$(pod_processes "$STATE_DIR" "${ids[@]}")"
    mapfile -t pids < <(awk '$1 == "proc" {print $4}' <<<"$lines")
    # 1. CPU while idle.
    c0="$(cpu_ms "${pids[@]}")"; s0="$(now_ms)"
    sleep "$CPU_SECS"
    c1="$(cpu_ms "${pids[@]}")"; s1="$(now_ms)"
    mc=$(((c1 - c0) * 1000 / (s1 - s0)))
    # 2. Memory, read after the CPU window (pids as found before it).
    lines="$(pod_processes "$STATE_DIR" "${ids[@]}")"
    grep '^warn' <<<"$lines" || true
    echo "memfd mappings counted as guest RAM: $(awk '$1 == "memfd" {$1 = ""; print}' <<<"$lines")"
    echo "per process (kB): $(awk '$1 == "proc" {printf "%s %s %s pss=%s memfd=%s; ", $2, $3, $4, $5, $6}' <<<"$lines")"
    echo "per pod cgroup (kB): $(awk '$1 == "cgroup" {$1 = ""; printf "%s; ", $0}' <<<"$lines")"
    total_kb="$(awk '$1 == "proc" {s += $5} END {print s + 0}' <<<"$lines")"
    memfd_kb="$(awk '$1 == "proc" {s += $6} END {print s + 0}' <<<"$lines")"
    shim_kb="$(awk '$1 == "proc" && $3 == "shim" {s += $5} END {print s + 0}' <<<"$lines")"
    # "None" (no memory controller on a pod's cgroup) prints as n/a.
    cg_kb="$(awk '$1 == "cgroup" {if ($4 == "na") na = 1; s += $4} END {print na ? "None" : s + 0}' <<<"$lines")"
    # The per-kind PSS, summed over the pods.
    KINDS[$b]+="$(awk -v n="$n" '$1 == "proc" {s[$3] += $5; g[$3] += $6} END {for (k in s) printf "%s %s %s %s\n", n, k, s[k], g[k]}' <<<"$lines")"$'\n'
    # The cgroup's memory.stat lines, summed over the pods.
    echo "cgroup memory.stat per pod (MiB): $(awk -v n="$n" '$1 == "cgroup" {for (i = 5; i <= NF; i++) {split($i, kv, "="); s[kv[1]] += kv[2]; if (!(kv[1] in o)) {o[kv[1]] = ++m; k[m] = kv[1]}}} END {for (i = 1; i <= m; i++) printf "%s %.1f ", k[i], s[k[i]] / n / 1024}' <<<"$lines")"
    # 3. The guest's own view.
    for id in "${ids[@]}"; do
        read -r gt ga <<<"$(guest_meminfo "$id")"
        [ -n "$ga" ] || die "no meminfo from the guest of $id"
        guest_total_kb=$((guest_total_kb + gt))
        guest_used_kb=$((guest_used_kb + gt - ga))
    done
    used_kb=$((guest_used_kb / n))
    echo "guest MemTotal per pod $(mib $((guest_total_kb / n))) MiB, used (MemTotal - MemAvailable) per pod $(mib "$used_kb") MiB"
    echo "idle CPU of all ${n} pods: $mc millicores over $((s1 - s0)) ms"
    save_pod_logs "$b" "$n" "${ids[0]}"
    remove_containers "${ids[@]}"
    # | N | total PSS | PSS/pod | guest RAM touched/pod | host processes'
    # own/pod | guest used/pod | overhead/pod | cgroup/pod | MemAvailable
    # drop/pod | CPU total | CPU/pod |
    SUMMARY[$b]+="$(python3 -c "
n, tot, memfd, used, cg, drop, mc, shim = $n, $total_kb, $memfd_kb, $used_kb, $cg_kb, $avail0 - $avail1, $mc, $shim_kb
m = lambda kb: f'{kb / 1024:.1f}'
over = tot / n - used
cgm = 'n/a' if cg is None else m(cg / n) + ' MiB'
print(f'| {n} | {m(tot)} MiB | **{m(tot / n)} MiB** | {m(memfd / n)} MiB | {m((tot - memfd) / n)} MiB | {m(used)} MiB | **{m(over)} MiB** | {cgm} | {m(drop / n)} MiB | {mc} m | {mc / n:.0f} m |')
print(f'VERDICT N = {n}: host overhead per pod {m(over)} MiB (shim {m(shim / n)}, VM processes {m(tot / n - shim / n)}, of which guest RAM {m(memfd / n)}), target <= $TARGET_MIB MiB:', 'meets it' if over <= $TARGET_MIB * 1024 else 'misses it')
")"$'\n'
    # Let the removed VMs' memory go back before the next batch reads
    # MemAvailable.
    sleep 3
}

# The first pod's logs (VMM, helpers, console) to $BOXLITE_NODE_OUT.
save_pod_logs() {
    local b="$1" n="$2" id="$3" dir="$STATE_DIR/$3"
    [ -n "${BOXLITE_NODE_OUT:-}" ] && [ -d "$dir" ] || return 0
    mkdir -p "$BOXLITE_NODE_OUT/$b-$n"
    find "$dir" -maxdepth 1 -type f -name '*.log' -exec cp {} "$BOXLITE_NODE_OUT/$b-$n/" \;
}

report() {
    local b="$1" n kind kb gkb
    echo
    echo "== $b: N idle pods (sleep 3600); CPU over ${CPU_SECS} s after ${SETTLE_SECS} s idle, memory read after that"
    echo
    printf '| N | total PSS | PSS per pod | guest RAM touched per pod | host processes%s own per pod (PSS − guest RAM) | guest used per pod | host overhead per pod (PSS − guest used) | pod cgroup memory per pod | MemAvailable drop per pod | idle CPU, all pods | idle CPU per pod |\n' "'"
    printf '|---|---|---|---|---|---|---|---|---|---|---|\n'
    grep '^|' <<<"${SUMMARY[$b]}"
    echo
    grep '^VERDICT' <<<"${SUMMARY[$b]}" | sed 's/^VERDICT //'
    echo
    echo "PSS per pod by process (MiB):"
    echo
    printf '| N | process | PSS per pod | of which guest RAM (memfd) |\n|---|---|---|---|\n'
    while read -r n kind kb gkb; do
        [ -n "$n" ] || continue
        printf '| %s | %s | %s MiB | %s MiB |\n' "$n" "$kind" "$(mib $((kb / n)))" "$(mib $((gkb / n)))"
    done < <(sort -k1,1n -k2,2 <<<"${KINDS[$b]}")
}

# --- main -----------------------------------------------------------------

cleanup() {
    local n k ids=()
    for n in "${COUNTS[@]}"; do
        for k in $(seq 1 "$n"); do ids+=("$(pod_id "$n" "$k")"); done
    done
    remove_containers "${ids[@]}"
    if [ "$PRIVATE" = 1 ]; then stop_private_containerd; else use_backend builtin; fi
}

main() {
    local b n
    declare -gA SUMMARY=() KINDS=()
    [ "$(id -u)" = 0 ] || die "run as root"
    if [ "$PRIVATE" = 1 ]; then
        trap cleanup EXIT
        start_private_containerd
    fi
    preflight
    ensure_image
    trap cleanup EXIT
    ensure_memory_accounting
    conditions
    echo "start: $(date -u '+%F %T UTC')"
    for b in "${BACKENDS[@]}"; do
        for n in "${COUNTS[@]}"; do
            echo
            bench_batch "$b" "$n"
        done
    done
    for b in "${BACKENDS[@]}"; do report "$b"; done
    echo
    echo "end: $(date -u '+%F %T UTC'), load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

main
