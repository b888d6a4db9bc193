#!/usr/bin/env bash
# The NBD benchmark: ballot serve vs qemu-storage-daemon, writes reports/bench.md.
# Usage: scripts/bench.sh [REPS]   (default 5; BENCH_BYTES, BENCH_FIO_SECONDS, BENCH_EXPORTS,
# BENCH_OUT override the size, the fio runtime, the exports and the report path).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ballot --bin ballot
exec python3 scripts/bench.py "$@"
