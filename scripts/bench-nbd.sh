#!/usr/bin/env bash
# NBD front-end benchmark: ballot serve vs qemu-storage-daemon, writes reports/bench-nbd.md.
# Usage: scripts/bench-nbd.sh [REPS]   (default 5; BENCH_NBD_BYTES, BENCH_NBD_FIO_SECONDS,
# BENCH_NBD_OUT override the size, the fio runtime and the report path).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ballot --bin ballot
exec python3 scripts/bench-nbd.py "$@"
