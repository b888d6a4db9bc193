#!/usr/bin/env bash
# COLO benchmark: checkpoint/failover on a 1 TiB secondary and the forwarding overhead, with
# qemu-storage-daemon as the reference; writes reports/bench-colo.md.
# Usage: scripts/bench-colo.sh [REPS]   (default 3; BENCH_COLO_FIO_SECONDS, BENCH_COLO_DIRTY)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ballot --bin ballot
exec python3 scripts/bench-colo.py "$@"
