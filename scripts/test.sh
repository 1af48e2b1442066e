#!/usr/bin/env bash
# The whole test suite (README: "Run the tests"). Run as root on Debian 12.
#
# 1. installs what the tests need (idempotent; see scripts/common.sh),
# 2. checks formatting and clippy (-D warnings),
# 3. builds the guest kernel (cached by its config hash), the static agent and
#    the initramfs, and the nested test host (Debian's cloud kernel, fetched
#    and cached by version; the static boxlite-vmm and test driver),
# 4. runs the unit and host-side tests (no root, KVM or QEMU needed),
# 5. runs the #[ignore]d tests, one at a time: those that need root
#    (network namespaces, mounts) and the VM tests, real guests under QEMU
#    (TCG here), which need root, QEMU, virtiofsd, boxlite-vsock (built here)
#    and the guest assets.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root
cd "$REPO_ROOT"

ensure_apt_packages
ensure_cargo_tools

log "format: cargo fmt --check"
cargo fmt --all --check
log "lint: cargo clippy -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings

build_guest_assets

# Linux under boxlite-vmm runs inside a nested test host (QEMU TCG with an
# emulated SVM CPU; docs/testing-nested.md): its kernel (Debian's, fetched
# and cached by package version), the static VMM and test driver, and its
# initramfs.
log "nested test host: cargo xtask testhost"
testhost_out="$(cargo xtask testhost --guest-initramfs "$BOXLITE_INITRAMFS" | tee_stderr)"
BOXLITE_TESTHOST_KERNEL="$(sed -n 's/^testhost-kernel: //p' <<<"$testhost_out" | tail -n1)"
BOXLITE_TESTHOST_INITRAMFS="$(sed -n 's/^testhost-initramfs: //p' <<<"$testhost_out" | tail -n1)"
export BOXLITE_TESTHOST_KERNEL BOXLITE_TESTHOST_INITRAMFS

# Tests that drive our binaries across crates (the shim under containerd,
# boxlite-vmm from the runtime) find them in target/debug.
log "build: host binaries (debug)"
cargo build --workspace --bins --quiet
# The runtime looks its helper binaries up on PATH (boxlite-vsock for the
# qemu backend, boxlite-vmm): the tests use the ones just built.
export PATH="$REPO_ROOT/target/debug:$PATH"

# Tests that find at run time that they cannot run (say, no VMX/SVM for a
# direct KVM boot) record themselves here (boxlite_tests::report_skip);
# cargo counts them as passed, the summary below does not.
BOXLITE_SKIP_LOG="$(mktemp /tmp/boxlite-skips.XXXXXX)"
export BOXLITE_SKIP_LOG
TEST_LOG="$(mktemp /tmp/boxlite-tests.XXXXXX)"
NOT_RUN_LOG="$(mktemp /tmp/boxlite-not-run.XXXXXX)"
# Failures that are not a test's: a nested node that did not finish.
HARNESS_FAILURES="$(mktemp /tmp/boxlite-harness-failures.XXXXXX)"
trap 'rm -f "$BOXLITE_SKIP_LOG" "$TEST_LOG" "$NOT_RUN_LOG" "$HARNESS_FAILURES"' EXIT

status=0
log "tests: unit and host-side"
cargo test --workspace --no-fail-fast 2>&1 | tee -a "$TEST_LOG" || status=1

log "tests: #[ignore]d (root; VM tests under QEMU, kernel $BOXLITE_KERNEL, initramfs $BOXLITE_INITRAMFS)"
cargo test --workspace --no-fail-fast -- --ignored --test-threads=1 2>&1 | tee -a "$TEST_LOG" || status=1

# The same shim and CRI end-to-end tests on the builtin backend: boxlite-vmm
# under containerd in the nested test node (a Debian 12 node under QEMU TCG
# with an emulated SVM CPU, docs/testing-nested.md), through
# scripts/nested-run.sh. The test binaries are the ones cargo just ran here.
log "tests: shim and CRI end to end on the builtin backend, in the nested node"
e2e_dir="$(mktemp -d /tmp/boxlite-node-e2e.XXXXXX)"
trap 'rm -f "$BOXLITE_SKIP_LOG" "$TEST_LOG" "$NOT_RUN_LOG" "$HARNESS_FAILURES"; rm -rf "$e2e_dir"' EXIT
e2e_names=()
while read -r exe; do
    name="$(basename "$exe")"
    name="${name%-*}"
    cp "$exe" "$e2e_dir/$name"
    e2e_names+=("$name")
done < <(cargo test -p boxlite-tests --test shim_containerd --test cri_pod --no-run --message-format=json 2>/dev/null \
    | grep '"kind":\["test"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
if [ "${#e2e_names[@]}" -ne 2 ]; then
    echo "expected the shim_containerd and cri_pod test binaries, found: ${e2e_names[*]}" | tee -a "$TEST_LOG"
    status=1
else
    copies=()
    for name in "${e2e_names[@]}"; do copies+=(--copy "$e2e_dir/$name"); done
    # --timeout 2400: the node's part takes about 14 minutes; 40 bound a
    # run that hangs, so that it still ends, with its report, inside the
    # CI's 90 minutes.
    set +o pipefail
    BOXLITE_NODE_PROFILE=debug bash scripts/nested-run.sh "${copies[@]}" --out "$e2e_dir/out" \
        --timeout 2400 -- tests/nested/builtin-e2e.sh "${e2e_names[@]}" 2>&1 | tee -a "$TEST_LOG"
    node_status=${PIPESTATUS[0]}
    set -o pipefail
    if [ "$node_status" != 0 ]; then
        status=1
    fi
    if [ "$node_status" = 125 ]; then
        # The node did not finish (nested-run.sh says why): the tests it had
        # not run yet are neither passed nor skipped, so the run fails here
        # as one more failure, whatever the counts above say.
        grep -a '^nested-run: .*(after [0-9]*s)' "$TEST_LOG" | tail -n 1 \
            | sed 's/^nested-run: /the nested node: /; s/; the node.s console.*//' >>"$HARNESS_FAILURES"
    fi
    if [ -s "$e2e_dir/out/skips" ]; then
        sed 's/^/nested node: /' "$e2e_dir/out/skips" >>"$BOXLITE_SKIP_LOG"
    fi
    # Tests the node does not run at all (backend-independent ones,
    # tests/nested/builtin-e2e.sh): skipped, but not among cargo's passed.
    if [ -s "$e2e_dir/out/not-run" ]; then
        sed 's/^/nested node: /' "$e2e_dir/out/not-run" >>"$NOT_RUN_LOG"
    fi
fi

# A CI log is often read from its end: repeat each failed test's own output
# (its panic message and what it dumped, such as the containerd log) here,
# at most 200 lines per test.
if grep -q '^---- .* stdout ----$' "$TEST_LOG"; then
    log "failed tests' output"
    sed 's/\x1b\[[0-9;]*m//g' "$TEST_LOG" | awk '
        /^---- .* stdout ----$/ { inside = 1; n = 0 }
        inside && /^failures:$/ { inside = 0 }
        inside && n++ < 200 { print }'
fi

log "summary"
# One line per failed test with its panic message, so that the end of a
# cut CI log still says what failed and why.
sed 's/\x1b\[[0-9;]*m//g' "$TEST_LOG" | awk '
    /^---- .* stdout ----$/ { name = $2; want = 0; next }
    name != "" && /panicked at/ { want = 1; next }
    want { print "failed: " name ": " substr($0, 1, 300); name = ""; want = 0 }'
read -r passed failed < <(sed 's/\x1b\[[0-9;]*m//g' "$TEST_LOG" | awk '
    /^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed;?$/) p += $i; if ($(i+1) ~ /^failed;?$/) f += $i } }
    END { print p + 0, f + 0 }')
skipped=$(grep -c . "$BOXLITE_SKIP_LOG" || true)
not_run=$(grep -c . "$NOT_RUN_LOG" || true)
if [ "$skipped" -gt 0 ]; then
    echo "skipped at run time (counted by cargo as passed, not here):"
    sed 's/^/  /' "$BOXLITE_SKIP_LOG"
fi
if [ "$not_run" -gt 0 ]; then
    echo "not run in the nested node (backend-independent; run on the host's qemu backend):"
    sed 's/^/  /' "$NOT_RUN_LOG"
fi
harness_failed=$(grep -c . "$HARNESS_FAILURES" || true)
if [ "$harness_failed" -gt 0 ]; then
    sed 's/^/failed: /' "$HARNESS_FAILURES"
fi
echo "$((passed - skipped)) passed, $((failed + harness_failed)) failed, $((skipped + not_run)) skipped"
exit "$status"
