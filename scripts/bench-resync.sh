#!/usr/bin/env bash
# The resync benchmark (issue #17): ballot resync vs nbdcopy, guest reads during a resync.
# Usage: scripts/bench-resync.sh [REPS]   (writes reports/bench-resync.md; see the .py for knobs)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -p ballot --bin ballot
exec python3 scripts/bench-resync.py "$@"
