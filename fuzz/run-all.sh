#!/usr/bin/env bash
# Runs every fuzz target for SECONDS each (default 60), JOBS at a time (default: the core
# count), on stable Rust (`-s none`: no sanitizer). Each target's corpus grows in
# fuzz/corpus/<target>/; a crash lands in fuzz/artifacts/<target>/ and makes this script exit 1.
# A log per target, with libFuzzer's final stats, goes to fuzz/logs/<target>.log, and
# fuzz/logs/summary.tsv gets one line per target run (replacing its previous one): seconds,
# executions, corpus files, crashes. fuzz/report.py turns it into reports/fuzz.md.
#
#   fuzz/run-all.sh 600          # ten minutes per target
#   JOBS=1 fuzz/run-all.sh 30 quorum_vote nbd_server
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_PER_TARGET=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    mapfile -t TARGETS < <(cargo fuzz list)
fi
JOBS=${JOBS:-$(nproc)}
cargo fuzz build -s none >/dev/null
mkdir -p logs
run_one() {
    local t=$1
    mkdir -p "corpus/$t" "artifacts/$t"
    local rc=0
    cargo fuzz run -s none "$t" "corpus/$t" -- \
        -max_total_time="$SECONDS_PER_TARGET" -rss_limit_mb=2048 -timeout=20 \
        -print_final_stats=1 >"logs/$t.log" 2>&1 || rc=$?
    local execs files crashes
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "logs/$t.log" | grep -o '[0-9]*$' || echo 0)
    files=$(find "corpus/$t" -type f | wc -l)
    crashes=$(find "artifacts/$t" -type f | wc -l)
    printf '%s\t%s\t%s\t%s\t%s\n' "$t" "$SECONDS_PER_TARGET" "${execs:-0}" "$files" "$crashes" >>logs/summary.tsv
    echo "$t: ${execs:-0} executions, $files corpus files, $crashes crashes (exit $rc)"
    return "$rc"
}
export -f run_one
export SECONDS_PER_TARGET
# Keep the rows of targets not run this time.
touch logs/summary.tsv
for t in "${TARGETS[@]}"; do
    grep -v "^$t	" logs/summary.tsv >logs/summary.tmp || true
    mv logs/summary.tmp logs/summary.tsv
done
status=0
printf '%s\n' "${TARGETS[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}' || status=1
exit "$status"
