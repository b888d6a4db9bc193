#!/usr/bin/env bash
# The project's test command (README.md, .ci/run): formatting, lints, every test.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== rustfmt"
cargo fmt --all --check

echo "== clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

echo "== tests"
# The QMP test drives the monitor with the qemu.qmp package from PyPI, kept in target/pydeps.
if [ ! -d target/pydeps/qemu/qmp ] && command -v python3 >/dev/null; then
    python3 -m pip install --quiet --disable-pip-version-check --target target/pydeps qemu.qmp \
        || echo "qemu.qmp could not be installed; its test will say so"
fi
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --no-fail-fast
else
    cargo test --workspace --no-fail-fast
fi

echo "== the simulator (cargo sim: --cfg madsim, own target dir): clippy, determinism, sweep"
cargo clippy -p ballot-sim --release --target-dir target-sim \
    --config "build.rustflags=['--cfg','madsim']" -- -D warnings
# The unit tests of the madsim-only modules (the run loop's among them), with the others.
cargo test -p ballot-sim --release --target-dir target-sim \
    --config "build.rustflags=['--cfg','madsim']" --lib
# SIMULATION.md M4: 20 seeds, each twice in this process and twice in separate processes.
cargo sim check-determinism --seeds 20
# M5: every scenario plus 200 random seeds; the report goes to a scratch directory.
cargo sim sweep --seeds 200 --jobs 2 --report "${TMPDIR:-/tmp}/ballot-ci-sweep"
# U10-U12: a sweep's JUnit report validates against the JUnit schema and names a failing run;
# a sweep cut into 3 shards and merged by `report` equals the same sweep unsharded.
scripts/sim-ci-output.sh 3

echo "== planted bugs (SIMULATION.md T1): each still applies to this tree"
# scripts/planted.sh runs them (minutes each); a patch that no longer applies would silently
# test nothing, so the test command checks that much.
for patch in sim/planted/*.patch; do
    git apply --check "$patch" || { echo "planted bug $patch no longer applies"; exit 1; }
done

echo "== power-cut campaign, short (HEALING.md H22, issue #18: root, /dev/fuse and loop devices)"
# 10 SIGKILLs of three nbdkit replicas and ballot with a metadata node under ext4; exit 77 means
# the machine lacks something the campaign needs (it says what), which is a skip, not a failure.
set +e
BALLOT_BIN="${CARGO_TARGET_DIR:-target}/debug/ballot" python3 scripts/powercut.py --cuts 10 \
    --modes ballot-md --size $((64 << 20)) --seed 1 --out "${TMPDIR:-/tmp}/ballot-ci-powercut.md"
rc=$?
set -e
if [ "$rc" -eq 77 ]; then
    echo "power-cut campaign skipped on this machine"
elif [ "$rc" -ne 0 ]; then
    echo "power-cut campaign failed (exit $rc)"; exit 1
fi

echo "== benchmark smoke run (quick; report to a scratch file)"
BENCH_QUORUM_OUT="${TMPDIR:-/tmp}/bench-quorum-smoke.md" \
    cargo bench -p ballot --bench quorum_read -- --quick >/dev/null
echo "all checks passed"
