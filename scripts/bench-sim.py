#!/usr/bin/env python3
"""Simulator speed, before and after (SIMULATION.md M6, issue 22 item 1).

Builds the simulator of a base commit in a scratch worktree (its own target directory), then
runs the same sweep with the base binary and with this tree's, alternating, REPS times each,
and writes reports/sim-speed.md: wall seconds per repetition, the ratio of each pair, guest
operations per wall-second, and both sweeps' coverage (fault families injected, recovery
paths reached, invariants checked), which must match. Each binary sweeps the scenario files
of its own commit (a commit may re-pin a scenario's seed when its random streams change).

Usage: scripts/bench-sim.py [--base COMMIT] [--reps N] [--seeds N] [--out FILE]
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MADSIM = ["--config", "build.rustflags=['--cfg','madsim']"]


def build(tree, target):
    subprocess.run(["cargo", "build", "--release", "-p", "ballot-sim", "--target-dir", target]
                   + MADSIM, cwd=tree, check=True)
    return os.path.join(target, "release", "ballot-sim")


def sweep(binary, tree, seeds, report):
    """One sweep; returns (wall seconds, CPU seconds of the sweep, summary)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    p = subprocess.run([binary, "sweep", "--seeds", str(seeds), "--jobs", "2", "--report", report],
                       cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    with open(os.path.join(report, "summary.json")) as f:
        s = json.load(f)
    if p.returncode not in (0,):
        print(f"note: {binary} exited {p.returncode} ({s.get('violations')} violations)",
              file=sys.stderr)
    return wall, cpu, s


def numbered(names, letter):
    """The names of the form LETTER + number (F13, P4, I18), in numeric order."""
    keep = [n for n in names if n[:1] == letter and n[1:].isdigit()]
    return sorted(keep, key=lambda x: int(x[1:]))


def coverage(s):
    fams = numbered([k for k, v in s["faults_injected"].items() if v > 0], "F")
    paths = numbered([k for k, v in s["recovery_paths"].items() if v > 0], "P")
    checks = numbered(list(s["invariant_checks"]), "I") + numbered(list(s["invariant_checks"]), "R")
    return fams, paths, checks


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="f8da0b8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--out", default=os.path.join(ROOT, "reports", "sim-speed.md"))
    a = ap.parse_args()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    base = subprocess.run(["git", "rev-parse", "--short", a.base], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    wt = tempfile.mkdtemp(prefix="ballot-bench-sim.")
    scratch = tempfile.mkdtemp(prefix="ballot-bench-sim-out.")
    print(f"summaries in {scratch}", file=sys.stderr)
    try:
        subprocess.run(["git", "worktree", "add", "--detach", wt, base], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        old = build(wt, os.path.join(ROOT, "target-sim-base"))
        new = build(ROOT, os.path.join(ROOT, "target-sim"))
        rows = []
        for k in range(a.reps):
            ow, oc, osum = sweep(old, wt, a.seeds, os.path.join(scratch, f"old{k}"))
            nw, nc, nsum = sweep(new, ROOT, a.seeds, os.path.join(scratch, f"new{k}"))
            rows.append((ow, oc, osum, nw, nc, nsum))
            print(f"rep {k + 1}: base {ow:.1f} s, this tree {nw:.1f} s, ratio {ow / nw:.2f}",
                  file=sys.stderr)
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", wt], cwd=ROOT,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ratios = sorted(r[0] / r[3] for r in rows)
    med = ratios[len(ratios) // 2]
    osum, nsum = rows[-1][2], rows[-1][5]
    oc, nc = coverage(osum), coverage(nsum)
    lines = [
        "# Simulator speed (issue 22 item 1, SIMULATION.md M6)",
        "",
        f"`scripts/bench-sim.py --base {a.base} --reps {a.reps} --seeds {a.seeds}`: the README's "
        f"sweep (`sweep --seeds {a.seeds} --jobs 2`, every scenario plus {a.seeds} random seeds) by "
        f"the simulator of `{base}` and of `{head}`, alternating, on {os.cpu_count()} cores.",
        "",
        "| rep | base wall s | base CPU s | base guest ops/s | this wall s | this CPU s | this guest ops/s | wall ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for k, (ow, ocpu, os_, nw, ncpu, ns) in enumerate(rows):
        lines.append(f"| {k + 1} | {ow:.1f} | {ocpu:.1f} | {os_['operations'] / ow:,.0f} | {nw:.1f} | "
                     f"{ncpu:.1f} | {ns['operations'] / nw:,.0f} | {ow / nw:.2f}x |")
    lines += [
        "",
        f"Median wall ratio: **{med:.2f}x** (pairs: {', '.join(f'{r:.2f}' for r in ratios)}).",
        "",
        "## Coverage of the two sweeps (last repetition)",
        "",
        "| | base | this tree |",
        "|---|---|---|",
        f"| runs, violations | {osum['seeds']}, {osum['violations']} | {nsum['seeds']}, {nsum['violations']} |",
        f"| guest operations | {osum['operations']:,} | {nsum['operations']:,} |",
        f"| fault families injected | {len(oc[0])}: {' '.join(oc[0])} | {len(nc[0])}: {' '.join(nc[0])} |",
        f"| recovery paths reached | {len(oc[1])}: {' '.join(oc[1])} | {len(nc[1])}: {' '.join(nc[1])} |",
        f"| invariants checked | {len(oc[2])}: {' '.join(oc[2])} | {len(nc[2])}: {' '.join(nc[2])} |",
        f"| coverage gaps | {', '.join(osum['coverage']['gaps']) or 'none'} | {', '.join(nsum['coverage']['gaps']) or 'none'} |",
        "",
        "The two binaries draw different random runs from the same seeds (the streams became "
        "ChaCha streams, W3), so operation counts differ a little; the coverage must not.",
        "",
    ]
    keep = ""
    if os.path.exists(a.out):
        with open(a.out) as f:
            text = f.read()
        i = text.find("\n## Profile")
        if i >= 0:
            keep = text[i + 1:]
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + ("\n" + keep if keep else ""))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
