#!/usr/bin/env bash
# The simulator's CI output, tested as a CI system would use it (issue 22 item 4;
# docs/simulator.md "Running in CI"):
#   1. `sweep --junit` with a failing run validates against the JUnit schema kept in
#      sim/data/junit/junit.xsd and names the failing run and the line that replays it;
#   2. a sweep run as K shards and merged with `report` gives the unsharded summary: the same
#      runs in the same order with the same trace hashes and outcomes, the same totals and
#      tables (only wall-clock figures may differ).
# Needs `cargo sim` (built here if it is not) and xmllint. Usage: scripts/sim-ci-output.sh [K]
set -euo pipefail
cd "$(dirname "$0")/.."
shards=${1:-3}
tmp=$(mktemp -d /tmp/ballot-sim-ci.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
cargo sim --help >/dev/null 2>&1 || true
sim=target-sim/release/ballot-sim
[ -x "$sim" ] || { echo "sim-ci-output: $sim was not built" >&2; exit 1; }

echo "== JUnit: a sweep with one failing run validates against the JUnit schema"
mkdir -p "$tmp/scen"
cp scenarios/quorum3-overlapping-requests.toml "$tmp/scen/"
# The same run with an expectation it cannot meet: C5 fails it, as a planted bug would.
sed -e 's/^name = .*/name = "ci-expects-too-much"/' \
    -e 's/{ kind = "event", event = "QUORUM_FAILURE", count = 0 }/{ kind = "event", event = "QUORUM_FAILURE", count = 1 }/' \
    scenarios/quorum3-overlapping-requests.toml > "$tmp/scen/ci-expects-too-much.toml"
set +e
"$sim" sweep --seeds 2 --scenarios "$tmp/scen" --report "$tmp/junit-report" \
    --junit "$tmp/junit.xml" > "$tmp/junit.log" 2>&1
code=$?
set -e
[ "$code" -eq 1 ] || { echo "sweep with a failing run exited $code, want 1" >&2; tail -5 "$tmp/junit.log"; exit 1; }
xmllint --noout --schema sim/data/junit/junit.xsd "$tmp/junit.xml"
python3 - "$tmp/junit.xml" <<'EOF'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
cases = root.findall("./testsuite/testcase")
failed = [c for c in cases if c.find("failure") is not None]
assert root.get("tests") == "4" and len(cases) == 4, (root.get("tests"), len(cases))
assert root.get("failures") == "1" and len(failed) == 1, (root.get("failures"), len(failed))
c = failed[0]
f = c.find("failure")
assert c.get("classname") == "ballot-sim.ci-expects-too-much", c.get("classname")
assert c.get("name") == "ci-expects-too-much seed=41", c.get("name")
assert f.get("type") == "C5", f.get("type")
assert "reproduce: cargo sim replay --seed 41 " in f.text and "ci-expects-too-much.toml" in f.text, f.text
print("junit: 4 cases, 1 failure (C5, ci-expects-too-much seed=41) with its reproduce line")
EOF

echo "== shards: a sweep as $shards shards, merged by report, equals the unsharded sweep"
cp scenarios/nbd3-reconnect-resend.toml scenarios/heal-f26-voter-flips.toml "$tmp/scen/"
rm "$tmp/scen/ci-expects-too-much.toml"
# A sweep this small leaves fault families and paths uncovered: exit 4 (I15) is expected.
"$sim" sweep --seeds 12 --scenarios "$tmp/scen" --report "$tmp/whole" > "$tmp/whole.log" ||
    [ $? -eq 4 ] || { tail -5 "$tmp/whole.log"; exit 1; }
parts=()
for i in $(seq 1 "$shards"); do
    "$sim" sweep --seeds 12 --scenarios "$tmp/scen" --shard "$i/$shards" \
        --report "$tmp/shard$i" > "$tmp/shard$i.log"
    parts+=("$tmp/shard$i/summary.json")
done
"$sim" report "${parts[@]}" --out "$tmp/merged" > /dev/null
python3 - "$tmp/whole/summary.json" "$tmp/merged/summary.json" "$shards" <<'EOF'
import json, sys
whole, merged, shards = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[3])
# Wall-clock figures differ from run to run; how the sweep was cut is bookkeeping.
clock = {"wall_s", "guest_ops_per_wall_s", "child_ops_per_wall_s", "seeds_per_minute",
         "median_virtual_to_wall", "jobs", "arguments", "merged_inputs", "commit"}
def runs(s):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in s["runs"]]
assert merged["merged_inputs"] == shards, merged["merged_inputs"]
rw, rm = runs(whole), runs(merged)
assert len(rw) == len(rm) == 15, (len(rw), len(rm))
for a, b in zip(rw, rm):
    assert a == b, f"run {a['index']} differs:\n{a}\n{b}"
keys = (set(whole) | set(merged)) - clock - {"runs"}
diff = [k for k in sorted(keys) if whole.get(k) != merged.get(k)]
assert not diff, f"merged summary differs in {diff}"
print(f"shards: {len(rw)} runs, same order and trace hashes, {len(keys)} summary fields equal")
EOF
echo "sim-ci-output: ok"
