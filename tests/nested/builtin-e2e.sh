#!/bin/bash
# The end-to-end tests on the builtin backend, inside the nested test node
# (scripts/nested-run.sh runs this; scripts/test.sh copies in the test
# binaries): the same shim and CRI test binaries that run on the qemu
# backend on the host, with BOXLITE_TEST_BACKEND=builtin, against the
# BoxLite the node installed (docs/testing-nested.md). Prints cargo's
# summary lines; exits non-zero if any test binary failed.
set -u
export BOXLITE_TEST_BACKEND=builtin
export BOXLITE_SHIM=/usr/local/bin/containerd-shim-boxlite-v2
export BOXLITE_KERNEL=/usr/share/boxlite/vmlinux
export BOXLITE_INITRAMFS=/usr/share/boxlite/initramfs
# Test images copied in beside the binaries (--copy of a
# /var/cache/boxlite/images/<hash> directory) are found here: the node has
# no Debian mirror to build them from.
export BOXLITE_IMAGE_CACHE="${BOXLITE_IMAGE_CACHE:-$PWD}"
# Tests that find they cannot run here record it (boxlite_tests::report_skip);
# scripts/test.sh counts these lines as skipped.
export BOXLITE_SKIP_LOG="$BOXLITE_NODE_OUT/skips"
: >"$BOXLITE_SKIP_LOG"
echo "node: $(uname -r), $(nproc) CPUs, $(awk '/MemTotal/ {print $2 / 1024 " MiB"}' /proc/meminfo); /dev/kvm: $(ls -l /dev/kvm)"
status=0
for t in "$@"; do
    echo "==> $t (builtin backend, in the nested node)"
    "./$t" --ignored --test-threads=1 || status=1
done
exit "$status"
