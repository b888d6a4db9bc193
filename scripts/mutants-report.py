#!/usr/bin/env python3
"""Writes reports/mutants.md from the shard outcome lists in reports/mutants/shard-*/.

Score = (caught + timeout) / (caught + missed + timeout); unviable mutants (that do not
compile) are counted apart, as cargo-mutants does. Each missed mutant is listed with its
explanation from reports/mutants/explained.tsv (`mutant<TAB>why`); a missed mutant without one
is marked UNEXPLAINED.
"""
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
DIR = ROOT / "reports" / "mutants"


def lines(p):
    return [l.strip() for l in p.read_text().splitlines() if l.strip()] if p.exists() else []


def main():
    shards = sorted(d for d in DIR.iterdir() if (d / "caught.txt").exists())
    out = {k: [] for k in ("caught", "missed", "timeout", "unviable")}
    for s in shards:
        for k in out:
            out[k] += lines(s / f"{k}.txt")
    explained = {}
    for l in lines(DIR / "explained.tsv"):
        m, _, why = l.partition("\t")
        explained[m] = why
    per = collections.defaultdict(collections.Counter)
    for k, ms in out.items():
        for m in ms:
            per[m.split(":")[0]][k] += 1
    def score(c):
        tested = c["caught"] + c["missed"] + c["timeout"]
        return (c["caught"] + c["timeout"]) / tested if tested else 0.0
    total = collections.Counter()
    for c in per.values():
        total.update(c)
    md = ["# Mutation testing: quorum, replication, overlay", "",
          "cargo-mutants over `driver/src/drivers/{quorum,replication,overlay}.rs`"
          " (`.cargo/mutants.toml`, `scripts/mutants.sh`), killed by the `ballot` crate's own tests"
          " through nextest: its unit tests and the in-process integration tests `config_graph`,"
          " `conformance`, `quorum_table` and `replication` (the tests that start processes, qemu"
          " or NBD peers are left out for speed). Score = (caught + timeout) / (caught + missed +"
          " timeout).",
          "", (DIR / "run.md").read_text().strip() if (DIR / "run.md").exists() else "",
          "", f"Outcome lists: {', '.join(f'`reports/mutants/{d.name}/`' for d in shards)}.", "",
          "| file | caught | timeout | missed | unviable | score |", "|---|---|---|---|---|---|"]
    for f in sorted(per):
        c = per[f]
        md.append(f"| `{f}` | {c['caught']} | {c['timeout']} | {c['missed']} | {c['unviable']} | {score(c):.1%} |")
    md.append(f"| **all** | {total['caught']} | {total['timeout']} | {total['missed']} | {total['unviable']} | **{score(total):.1%}** |")
    md += ["", "## Missed mutants", ""]
    if not out["missed"]:
        md.append("None.")
    else:
        md += ["| mutant | why it survives |", "|---|---|"]
        for m in sorted(out["missed"]):
            md.append(f"| `{m}` | {explained.get(m, '**UNEXPLAINED**')} |")
    (ROOT / "reports" / "mutants.md").write_text("\n".join(md) + "\n")
    print(f"reports/mutants.md: {total['caught']} caught, {total['timeout']} timeout, "
          f"{total['missed']} missed, {total['unviable']} unviable, score {score(total):.1%}")


if __name__ == "__main__":
    main()
