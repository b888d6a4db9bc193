#!/usr/bin/env bash
# Mutation testing of the quorum, replication and overlay modules (issue 6) with cargo-mutants,
# configured in .cargo/mutants.toml. The run is split into SHARDS shards (default 8) so it can
# be done a shard at a time; each shard's outcome lists go to reports/mutants/shard-K/ and
# `scripts/mutants-report.py` turns all of them into reports/mutants.md.
#
#   scripts/mutants.sh 0        # shard 0 of 8
#   SHARDS=4 scripts/mutants.sh 3
#   scripts/mutants.sh all      # every shard in turn
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null || cargo install cargo-mutants --locked
SHARDS=${SHARDS:-8}
run_shard() {
    local k=$1 out=reports/mutants/shard-$1
    mkdir -p "$out"
    cargo mutants --no-shuffle --shard "$k/$SHARDS" --output "target/mutants-$k" \
        --timeout-multiplier 3 || true
    for f in caught missed timeout unviable; do
        cp "target/mutants-$k/mutants.out/$f.txt" "$out/$f.txt"
    done
    echo "shard $k/$SHARDS: $(wc -l <"$out/caught.txt") caught, $(wc -l <"$out/missed.txt") missed, $(wc -l <"$out/timeout.txt") timeout, $(wc -l <"$out/unviable.txt") unviable"
}
if [ "${1:-all}" = all ]; then
    # A whole run replaces every earlier outcome list (explained.tsv and run.md stay).
    find reports/mutants -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
    for k in $(seq 0 $((SHARDS - 1))); do run_shard "$k"; done
else
    run_shard "$1"
fi
python3 scripts/mutants-report.py
