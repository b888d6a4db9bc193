#!/usr/bin/env bash
# Testing the tester (SIMULATION.md T1): applies each planted bug in sim/planted/ to a scratch
# worktree, builds the simulator there, runs the patch's scenario, then random seeds until the
# first failure (at most SEEDS, default 1000), and records which seed and invariant caught it.
# Both must fail with one of the invariants the patch lists.
# Writes reports/planted.md, or reports/planted-GLOB.md for a subset.
# Usage: scripts/planted.sh [SEEDS] [GLOB]   (e.g. scripts/planted.sh 1000 'colo-*')
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
seeds=${1:-1000}
glob=${2:-*}
wt=$(mktemp -d /tmp/ballot-planted.XXXXXX)
trap 'git -C "$root" worktree remove --force "$wt" >/dev/null 2>&1 || true' EXIT
git worktree add --detach "$wt" HEAD >/dev/null
export CARGO_TARGET_DIR="$root/target-planted"
if [ "$glob" = "*" ]; then out="$root/reports/planted.md"; else out="$root/reports/planted-${glob//[^a-z0-9]/}.md"; fi
{
  echo "# Planted bugs (SIMULATION.md T1)"
  echo
  echo "Each patch in \`sim/planted/\` is applied alone to commit \`$(git rev-parse --short HEAD)\`; the simulator"
  echo "runs the patch's scenario, then random seeds 1..$seeds until the first failure."
  echo
  echo "| plant | must be caught by | scenario verdict | first failing random seed | rule | seeds run |"
  echo "|---|---|---|---|---|---|"
} > "$out"
status=0
for patch in sim/planted/$glob.patch; do
  name=$(basename "$patch" .patch)
  want=$(sed -n 's/^# must be caught by: //p' "$patch")
  scen=$(sed -n 's/^# scenario: //p' "$patch")
  git -C "$wt" checkout -q -- .
  git -C "$wt" apply "$root/$patch"
  sv=$(cd "$wt" && cargo sim run "$scen" 2>/dev/null | grep -E '^(PASS|FAIL)' | head -1 | cut -c1-60 || true)
  rm -rf "$wt/empty-scenarios" && mkdir -p "$wt/empty-scenarios"
  log=$(cd "$wt" && cargo sim sweep --seeds "$seeds" --scenarios empty-scenarios --until-fail --report "$wt/reports/planted-$name" 2>/dev/null || true)
  first=$(printf '%s\n' "$log" | grep -E '^\[ *[0-9]+\].*FAIL' | head -1 || true)
  seed=$(printf '%s\n' "$first" | sed -n 's/.*seed=\([0-9]*\).*/\1/p')
  rule=$(printf '%s\n' "$first" | sed -n 's/.* FAIL \([ICR][0-9]*\).*/\1/p')
  ran=$(printf '%s\n' "$log" | grep -cE '^\[ *[0-9]+\]' || true)
  echo "| $name | $want | ${sv:-?} | ${seed:-none} | ${rule:--} | $ran |" >> "$out"
  echo "$name: scenario: ${sv:-?}; random: seed ${seed:-none} rule ${rule:--} after $ran run(s)"
  # The scenario must fail, and the random sweep within the seed limit, each with one of the
  # listed invariants.
  srule=$(printf '%s\n' "$sv" | sed -n 's/^FAIL \([ICR][0-9]*\).*/\1/p')
  if [ -z "$srule" ] || ! printf ' %s ' "$want" | grep -q " ${srule} "; then
    echo "  NOT CAUGHT by its scenario as required (want one of: $want)"; status=1
  fi
  if [ -z "$seed" ] || ! printf ' %s ' "$want" | grep -q " ${rule} "; then
    echo "  NOT CAUGHT by the random sweep as required (want one of: $want)"; status=1
  fi
done
git -C "$wt" checkout -q -- .
echo "wrote $out"
exit $status
