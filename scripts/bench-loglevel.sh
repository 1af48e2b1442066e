#!/bin/bash
# Runs in the nested node (docs/benchmarks.md, "Guest console log level"):
# boot → agent ready on the builtin backend (boxlite-smoke, one VM at a
# time), the runtime's default (loglevel=5) against the guest kernel's own
# default console level (kernel_cmdline_extra = "loglevel=7"), interleaved.
#
#   scripts/nested-run.sh -- scripts/bench-loglevel.sh [pairs]    # default 8
set -euo pipefail
pairs="${1:-8}"
base=/etc/boxlite/boxlite.toml
cp "$base" /tmp/bench-default.toml
sed 's/^# kernel_cmdline_extra = ""$/kernel_cmdline_extra = "loglevel=7"/' "$base" >/tmp/bench-loglevel7.toml
grep -q '^kernel_cmdline_extra = "loglevel=7"$' /tmp/bench-loglevel7.toml \
    || { echo "bench-loglevel: $base has no '# kernel_cmdline_extra = \"\"' line to set" >&2; exit 1; }
echo "node: $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for i in $(seq "$pairs"); do
    if [ $((i % 2)) = 1 ]; then order="default loglevel7"; else order="loglevel7 default"; fi
    for v in $order; do
        echo "$v: $(boxlite-smoke --config "/tmp/bench-$v.toml" --runs 1 2>&1 | grep '^run 0')"
    done
done
echo "node load after: $(cut -d' ' -f1-3 /proc/loadavg)"
