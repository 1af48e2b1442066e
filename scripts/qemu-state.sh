#!/usr/bin/env bash
# Prints what a running QEMU and its guest are doing, for a run that has
# stopped making progress (scripts/nested-run.sh calls it when the nested
# node's console goes silent; docs/testing-nested.md, "A frozen node").
#
#   scripts/qemu-state.sh QEMU_PID HMP_SOCKET
#   scripts/qemu-state.sh --symbolize STATE_FILE LABEL=SYMBOLS...
#
# HMP_SOCKET is the unix socket of QEMU's human monitor
# (-monitor unix:PATH,server=on,wait=off). The first form prints the
# monitor's `info status`, `info cpus` and `info registers -a` (or that the
# monitor did not answer: QEMU's main loop is then stuck, e.g. on its big
# lock) and QEMU's threads sampled twice 5 s apart (state, kernel wait
# channel, CPU ticks used in between; QEMU names its vCPU threads with
# -name debug-threads=on): a thread using 500 ticks spins, one in
# futex_wait with 0 waits on a lock. It needs socat and never stops QEMU.
#
# The second form looks up each vCPU's instruction pointer in what the
# first printed (STATE_FILE) in each SYMBOLS file: a /proc/kallsyms copy
# (the nested node saves its own; Debian's System.map is a placeholder) or
# an unstripped ELF kernel (the guests': an emulated SVM CPU shows the
# nested guest's registers while it runs one).
set -u

# The symbol at or below an address. kallsyms and `nm -n` print 16
# lower-case hex digits, as the monitor prints RIP, so comparing the
# strings compares the addresses (awk's numbers are doubles, too coarse for
# 64-bit addresses) and `sort` orders them; the offset comes from the low
# 32 bits. A module's symbol carries its module's name.
symbolize() {
    local rip="$1" entry label file
    shift
    for entry in "$@"; do
        label="${entry%%=*}" file="${entry#*=}"
        [ -r "$file" ] || continue
        { if file -b "$file" | grep -q '^ELF'; then nm -n "$file" 2>/dev/null; else LC_ALL=C sort "$file"; fi; } \
            | awk -v want="$rip" -v label="$label" '
                function low(s,   i, v) { v = 0; s = substr(s, 9)
                    for (i = 1; i <= 8; i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1
                    return v }
                length($1) == 16 && $2 ~ /^[tTwW]$/ {
                    if ($1 <= want) { best = $3 ($4 == "" ? "" : " " $4); at = $1 } else if (best != "") { exit } }
                END { if (best != "" && substr(at, 1, 8) == substr(want, 1, 8) && low(want) - low(at) < 1048576)
                          printf "    %s: %s+0x%x\n", label, best, low(want) - low(at) }'
    done
}

if [ "${1:-}" = --symbolize ]; then
    [ $# -ge 3 ] || { sed -n '8p' "$0" | sed 's/^# *//' >&2; exit 2; }
    state="$2"
    shift 2
    echo "---- vCPU instruction pointers ----"
    n=0
    while read -r rip; do
        echo "CPU#$n RIP=$rip"
        symbolize "$rip" "$@"
        n=$((n + 1))
    done < <(grep -oE '^[RE]IP=[0-9a-f]+' "$state" | cut -d= -f2)
    exit 0
fi

[ $# -eq 2 ] || { sed -n '7p' "$0" | sed 's/^# *//' >&2; exit 2; }
pid="$1" sock="$2"

echo "---- QEMU monitor (pid $pid) ----"
monitor_out="$(printf 'info status\ninfo cpus\ninfo registers -a\n' \
    | timeout 15 socat -t 5 - "UNIX-CONNECT:$sock" 2>&1 \
    | tr -d '\r' | sed 's/\x1b\[[0-9;]*[A-Za-z]//g; s/^(qemu) //')"
if ! grep -qE '^[RE]IP=' <<<"$monitor_out"; then
    echo "the monitor did not answer with registers (QEMU's main loop is stuck?):"
fi
# Without the monitor's banner, its echo of what we typed, and the debug,
# FPU and vector registers.
echo "$monitor_out" | grep -vE '^QEMU .* monitor - type|info |^(DR[0-7]|FCW|FPR|XMM|YMM|ZMM)'

thread_sample() {
    local t stat
    for t in /proc/"$pid"/task/*; do
        stat="$(cat "$t/stat" 2>/dev/null)" || continue
        # After the ")" closing the name: state is field 1, utime 12, stime 13.
        echo "${t##*/} $(awk '{ print $1, $12 + $13 }' <<<"${stat##*) }") $(cat "$t/wchan" 2>/dev/null) $(cat "$t/comm" 2>/dev/null)"
    done
}
echo "---- QEMU's threads (tid, state, wait channel, CPU ticks in 5 s, name) ----"
declare -A before
while read -r tid state ticks rest; do before[$tid]="$ticks"; done < <(thread_sample)
sleep 5
while read -r tid state ticks wchan comm; do
    echo "$tid $state ${wchan:--} $((ticks - ${before[$tid]:-$ticks})) ${comm:-?}"
done < <(thread_sample)
