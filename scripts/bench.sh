#!/usr/bin/env bash
# The NBD benchmark: ballot serve vs qemu-storage-daemon (and qemu-nbd, nbdkit file and nbdkit null
# for the single-file and null exports), over unix sockets and TCP; writes reports/bench.md.
# Usage: scripts/bench.sh [REPS]   (default 4; BENCH_BYTES, BENCH_FIO_SECONDS, BENCH_EXPORTS,
# BENCH_TRANSPORTS, BENCH_OUT override the size, the fio runtime, the exports, the transports and
# the report path; see scripts/bench.py).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ballot --bin ballot
exec python3 scripts/bench.py "$@"
