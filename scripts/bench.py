#!/usr/bin/env python3
"""The NBD benchmark (issue 7 item 2; NBD.md §9): `ballot serve` vs qemu-storage-daemon with the
same command line, the same clients, in one run, the servers alternating which goes first, for
REPS repetitions (>= 5 for the report), on three exports:

  * quorum3-file: a quorum (vote-threshold 2) of three raw files
  * quorum3-nbd:  a quorum (vote-threshold 2) of three NBD replicas, each an `nbdkit memory`
                  server on a unix socket (the same three replicas for both servers)
  * file:         a single raw file

and six figures per export:

  * seq write: nbdcopy of a SIZE random file into the export (--flush)
  * seq read:  nbdcopy of the export to null:
  * fio 4k random read and write (nbd engine), QD1 and QD32, RUNTIME seconds after 1 s ramp

Writes reports/bench.md (or $BENCH_OUT): per figure each server's min/median/max, the ratio
ballot/qsd per repetition (min/median/max), each server's peak RSS, and the issue's targets with
their verdicts. Everything from the line `## Profile` on in an existing report is kept: that part
is written by hand (what profiling found, what was changed, what it gained).

Usage: scripts/bench.sh [REPS] (the wrapper builds the release binary first).
Environment: BENCH_BYTES (export size, default 1 GiB), BENCH_FIO_SECONDS (default 5),
BENCH_EXPORTS (comma list, default all three), BENCH_OUT.
Only the standard library; peers from Debian: qemu-utils, libnbd-bin, nbdkit, fio.
"""

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import fio_job, stop, version, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.path.join(ROOT, "target", "release", "ballot")
GIB = 1 << 30
MIB = 1 << 20
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
RUNTIME = int(os.environ.get("BENCH_FIO_SECONDS", "5"))
SIZE = int(os.environ.get("BENCH_BYTES", str(GIB)))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "reports", "bench.md"))
ALL_EXPORTS = ["quorum3-file", "quorum3-nbd", "file"]
EXPORTS = [e for e in os.environ.get("BENCH_EXPORTS", ",".join(ALL_EXPORTS)).split(",") if e]
SERVERS = ["ballot", "qsd"]
PROFILE_MARK = "## Profile"

FIGURES = [
    ("seq write MiB/s", None),
    ("seq read MiB/s", None),
    ("4k randread QD1 IOPS", ("randread", 1)),
    ("4k randread QD32 IOPS", ("randread", 32)),
    ("4k randwrite QD1 IOPS", ("randwrite", 1)),
    ("4k randwrite QD32 IOPS", ("randwrite", 32)),
]

# The "done when", as (export, figure, ratio to qsd) and one ballot-to-ballot bound.
TARGETS = [
    ("quorum3-file", "seq read MiB/s", 1.5),
    ("quorum3-file", "seq write MiB/s", 1.2),
    ("quorum3-file", "4k randread QD32 IOPS", 1.5),
]
SELF_TARGET = ("quorum3-file", "file", "seq read MiB/s", 0.9)


def server_args(d, sock, replicas):
    """qemu-storage-daemon's syntax, which `ballot serve` takes unchanged."""
    args = []
    for i, f in enumerate(["a.raw", "b.raw", "c.raw"]):
        args.append(f"--blockdev=driver=file,node-name=f{i},filename={d}/{f}")
    args.append('--blockdev={"driver":"quorum","node-name":"qf","vote-threshold":2,'
                '"children":["f0","f1","f2"]}')
    for i, r in enumerate(replicas):
        args.append(f"--blockdev=driver=nbd,node-name=n{i},server.type=unix,server.path={r}")
    if replicas:
        args.append('--blockdev={"driver":"quorum","node-name":"qn","vote-threshold":2,'
                    '"children":["n0","n1","n2"]}')
    args.append(f"--blockdev=driver=file,node-name=s0,filename={d}/single.raw")
    args.append(f"--nbd-server=addr.type=unix,addr.path={sock}")
    args.append("--export=type=nbd,id=e0,node-name=qf,name=quorum3-file,writable=on")
    if replicas:
        args.append("--export=type=nbd,id=e1,node-name=qn,name=quorum3-nbd,writable=on")
    args.append("--export=type=nbd,id=e2,node-name=s0,name=file,writable=on")
    return args


def start(kind, d, replicas):
    sock = os.path.join(d, f"{kind}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = [BALLOT, "serve"] if kind == "ballot" else ["qemu-storage-daemon"]
    p = subprocess.Popen(cmd + server_args(d, sock, replicas), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    wait_for(sock, p, kind)
    return p, sock


def start_replicas(d):
    procs, socks = [], []
    for i in range(3):
        s = os.path.join(d, f"replica{i}.sock")
        p = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--unix", s,
                              "memory", f"size={SIZE}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(p)
        wait_for(s, p, f"nbdkit replica {i}")
        socks.append(s)
    return procs, socks


def uri(sock, name):
    return f"nbd+unix:///{name}?socket={sock}"


def settle():
    """Writes back what earlier figures left dirty, so no figure pays for another's writeback."""
    os.sync()


def timed(cmd):
    settle()
    t = time.perf_counter()
    r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr.decode()}")
    return time.perf_counter() - t


def fio(sock, name, d, rw, qd):
    settle()
    j = fio_job(os.path.join(d, "fio.json"), uri(sock, name),
                [f"--name={rw}", f"--rw={rw}", "--bs=4k", f"--iodepth={qd}", f"--size={SIZE}",
                 f"--runtime={RUNTIME}"], what=f"fio {rw} QD{qd} on {name}")
    return j["read" if rw == "randread" else "write"]["iops"]


def peak_rss_mib(p):
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def one_round(kind, d, src, replicas, results, rss):
    p, sock = start(kind, d, replicas)
    try:
        for name in EXPORTS:
            u = uri(sock, name)
            add = lambda fig, v: results.setdefault((name, fig), {}).setdefault(kind, []).append(v)
            t = timed(["nbdcopy", "--flush", "--connections=2", "--requests=64", src, u])
            add("seq write MiB/s", SIZE / t / MIB)
            t = timed(["nbdcopy", "--connections=2", "--requests=64", u, "null:"])
            add("seq read MiB/s", SIZE / t / MIB)
            for fig, spec in FIGURES:
                if spec is not None:
                    add(fig, fio(sock, name, d, *spec))
        rss.setdefault(kind, []).append(peak_rss_mib(p))
    finally:
        stop(p)


def main():
    for tool in ["qemu-storage-daemon", "nbdcopy", "nbdkit", "fio"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not installed "
                             "(apt-get install qemu-utils libnbd-bin nbdkit fio)")
    if not os.path.exists(BALLOT):
        raise SystemExit(f"{BALLOT} missing: run scripts/bench.sh")
    bad = [e for e in EXPORTS if e not in ALL_EXPORTS]
    if bad:
        raise SystemExit(f"BENCH_EXPORTS: unknown export {bad[0]!r} (known: {ALL_EXPORTS})")
    d = tempfile.mkdtemp(prefix="ballot-bench-")
    replica_procs = []
    try:
        src = os.path.join(d, "src.bin")
        with open(src, "wb") as fh:
            left = SIZE
            while left:
                n = min(left, 16 * MIB)
                fh.write(os.urandom(n))
                left -= n
        # Every target starts fully written, so no server pays for the file system's first
        # allocation of blocks the other then only overwrites.
        for f in ["a.raw", "b.raw", "c.raw", "single.raw"]:
            shutil.copyfile(src, os.path.join(d, f))
        replicas = []
        if "quorum3-nbd" in EXPORTS:
            replica_procs, replicas = start_replicas(d)
            for r in replicas:
                timed(["nbdcopy", "--connections=2", "--requests=64", src, uri(r, "")])
        results, rss = {}, {}
        started = time.time()
        for rep in range(REPS):
            order = SERVERS if rep % 2 == 0 else SERVERS[::-1]
            for kind in order:
                one_round(kind, d, src, replicas, results, rss)
            print(f"rep {rep + 1}/{REPS} done ({time.time() - started:.0f} s)", file=sys.stderr)
        write_report(results, rss, time.time() - started)
    finally:
        for p in replica_procs:
            stop(p)
        shutil.rmtree(d, ignore_errors=True)


def fmt(v):
    return f"{v:,.0f}"


def kept_profile_section():
    try:
        with open(OUT) as f:
            text = f.read()
    except OSError:
        return None
    i = text.find("\n" + PROFILE_MARK)
    return text[i + 1:] if i >= 0 else None


def write_report(results, rss, wall):
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    lines = [
        "# `ballot serve` vs qemu-storage-daemon",
        "",
        "Written by `scripts/bench.sh` (issue 7 item 2; NBD.md §9). The same command line for both",
        "servers (qemu-storage-daemon's syntax), the same clients, one run; the servers alternate",
        f"which goes first. {REPS} repetitions; exports of {SIZE // MIB} MiB on a unix socket. The",
        "files sit in the page cache and start fully written (a copy of the source), so this",
        "measures the servers' CPU and protocol path, not a disk. The NBD replicas are three",
        "`nbdkit memory` servers on unix sockets, shared by both servers.",
        "",
        f"- commit {commit}{' (with uncommitted changes)' if dirty else ''}; "
        f"{os.cpu_count()} cores; {platform.platform()}",
        f"- {version(['qemu-storage-daemon', '--version'])}; {version(['nbdcopy', '--version'])};"
        f" {version(['nbdkit', '--version'])}; {version(['fio', '--version'])}",
        f"- seq write: `nbdcopy --flush --connections=2 --requests=64 SRC URI`; seq read:"
        f" `nbdcopy --connections=2 --requests=64 URI null:`; 4k random: fio nbd engine,"
        f" {RUNTIME} s after 1 s ramp",
        f"- wall time {wall:.0f} s",
        "",
        "Ratio = ballot / qsd within one repetition (all figures are higher-is-better).",
        "",
        "| export | figure | ballot min / median / max | qsd min / median / max | "
        "ratio min | ratio median | ratio max |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    medians = {}
    for name in EXPORTS:
        for fig, _ in FIGURES:
            by = results[(name, fig)]
            b, q = by["ballot"], by["qsd"]
            ratios = [x / y for x, y in zip(b, q)]
            medians[(name, fig)] = (statistics.median(b), statistics.median(q),
                                    statistics.median(ratios))
            lines.append(
                f"| {name} | {fig} | {fmt(min(b))} / **{fmt(statistics.median(b))}** / "
                f"{fmt(max(b))} | {fmt(min(q))} / **{fmt(statistics.median(q))}** / "
                f"{fmt(max(q))} | {min(ratios):.2f} | **{statistics.median(ratios):.2f}** | "
                f"{max(ratios):.2f} |")
    lines += [
        "",
        "Peak resident memory of the server process over one repetition (all exports), MiB:",
        "",
        "| server | min | median | max |",
        "|---|---:|---:|---:|",
    ]
    for kind in SERVERS:
        v = rss.get(kind, [])
        if v:
            lines.append(f"| {kind} | {min(v):.0f} | {statistics.median(v):.0f} | {max(v):.0f} |")
    lines += ["", "## Targets (issue 7)", "", "| target | measured (median) | verdict |",
              "|---|---:|---|"]
    for name, fig, want in TARGETS:
        if (name, fig) in medians:
            got = medians[(name, fig)][2]
            lines.append(f"| {name} {fig}: ballot ≥ {want}× qsd | {got:.2f}× | "
                         f"{'met' if got >= want else '**not met**'} |")
    a, b, fig, want = SELF_TARGET
    if (a, fig) in medians and (b, fig) in medians:
        got = medians[(a, fig)][0] / medians[(b, fig)][0]
        lines.append(f"| ballot {a} {fig} within {100 - want * 100:.0f} % of ballot {b} | "
                     f"{got:.2f}× | {'met' if got >= want else '**not met**'} |")
    lines.append("")
    kept = kept_profile_section()
    if kept:
        lines += [kept.rstrip("\n"), ""]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
