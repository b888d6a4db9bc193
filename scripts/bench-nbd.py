#!/usr/bin/env python3
"""NBD front-end benchmark (issue 4 item 8, NBD.md §9): the same three-file quorum, and a single
raw file, served by `ballot serve` and by qemu-storage-daemon with the same command line, driven
by the same clients in one run, alternating which server goes first, for REPS repetitions:

  * nbdcopy write-in: a 1 GiB random file into the export (2 connections x 64 requests, --flush)
  * nbdcopy read-out: the export to null: (2 connections x 64 requests)
  * fio 4k random read, QD32, nbd engine, RUNTIME seconds

Writes reports/bench-nbd.md (or $BENCH_NBD_OUT): per figure, each server's median and the
ratio ballot/qsd (higher is better for ballot) with min/median/max over the repetitions.

Usage: scripts/bench-nbd.sh [REPS] (the wrapper builds the release binary first).
Only the standard library; peers from Debian: qemu-utils, libnbd-bin, fio.
"""

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.path.join(ROOT, "target", "release", "ballot")
GIB = 1 << 30
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
RUNTIME = int(os.environ.get("BENCH_NBD_FIO_SECONDS", "5"))
SIZE = int(os.environ.get("BENCH_NBD_BYTES", str(GIB)))
OUT = os.environ.get("BENCH_NBD_OUT", os.path.join(ROOT, "reports", "bench-nbd.md"))


def server_args(d, sock):
    """qemu-storage-daemon's syntax, which `ballot serve` takes unchanged."""
    args = []
    for i, f in enumerate(["a.raw", "b.raw", "c.raw"]):
        args.append(f"--blockdev=driver=file,node-name=f{i},filename={d}/{f}")
    args.append('--blockdev={"driver":"quorum","node-name":"q0","vote-threshold":2,'
                '"children":["f0","f1","f2"]}')
    args.append(f"--blockdev=driver=file,node-name=r0,filename={d}/single.raw")
    args.append(f"--nbd-server=addr.type=unix,addr.path={sock}")
    args.append("--export=type=nbd,id=e0,node-name=q0,name=quorum,writable=on")
    args.append("--export=type=nbd,id=e1,node-name=r0,name=raw,writable=on")
    return args


def start(kind, d):
    sock = os.path.join(d, f"{kind}.sock")
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = [BALLOT, "serve"] if kind == "ballot" else ["qemu-storage-daemon"]
    p = subprocess.Popen(cmd + server_args(d, sock), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while not os.path.exists(sock):
        if p.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{kind} did not start: {p.stderr.read().decode()}")
        time.sleep(0.02)
    return p, sock


def uri(sock, name):
    return f"nbd+unix:///{name}?socket={sock}"


def timed(cmd):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t


def fio_randread(sock, name, d):
    out = os.path.join(d, "fio.json")
    subprocess.run(
        ["fio", "--output-format=json", f"--output={out}", "--name=randread",
         "--ioengine=nbd", f"--uri={uri(sock, name)}", "--rw=randread", "--bs=4k",
         "--iodepth=32", f"--size={SIZE}", f"--runtime={RUNTIME}", "--time_based=1",
         "--ramp_time=1"],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(out) as f:
        j = json.load(f)["jobs"][0]
    if j["error"] != 0:
        raise SystemExit(f"fio error {j['error']}")
    return j["read"]["iops"]


def one_round(kind, d, src, results):
    p, sock = start(kind, d)
    try:
        for name in ["quorum", "raw"]:
            u = uri(sock, name)
            t = timed(["nbdcopy", "--flush", "--connections=2", "--requests=64", src, u])
            results.setdefault((name, "write-in MiB/s"), {}).setdefault(kind, []).append(
                SIZE / t / (1 << 20))
            t = timed(["nbdcopy", "--connections=2", "--requests=64", u, "null:"])
            results.setdefault((name, "read-out MiB/s"), {}).setdefault(kind, []).append(
                SIZE / t / (1 << 20))
            iops = fio_randread(sock, name, d)
            results.setdefault((name, "4k randread QD32 IOPS"), {}).setdefault(kind, []).append(
                iops)
    finally:
        stop(p)


def main():
    for tool in ["qemu-storage-daemon", "nbdcopy", "fio"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not installed (apt-get install qemu-utils libnbd-bin fio)")
    if not os.path.exists(BALLOT):
        raise SystemExit(f"{BALLOT} missing: run scripts/bench-nbd.sh")
    d = tempfile.mkdtemp(prefix="ballot-bench-nbd-")
    try:
        src = os.path.join(d, "src.bin")
        with open(src, "wb") as fh:
            left = SIZE
            while left:
                n = min(left, 16 << 20)
                fh.write(os.urandom(n))
                left -= n
        # Every target starts fully written, so no server pays for the file system's first
        # allocation of blocks the other then only overwrites.
        for f in ["a.raw", "b.raw", "c.raw", "single.raw"]:
            shutil.copyfile(src, os.path.join(d, f))
        results = {}
        started = time.time()
        for rep in range(REPS):
            order = ["ballot", "qsd"] if rep % 2 == 0 else ["qsd", "ballot"]
            for kind in order:
                one_round(kind, d, src, results)
            print(f"rep {rep + 1}/{REPS} done", file=sys.stderr)
        write_report(results, time.time() - started)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def version(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "?"


def write_report(results, wall):
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    lines = [
        "# NBD front end: `ballot serve` vs qemu-storage-daemon",
        "",
        "Written by `scripts/bench-nbd.sh` (issue 4 item 8, NBD.md §9). Same command line for both",
        "servers (qemu-storage-daemon's syntax), same clients, one run; the servers alternate which",
        f"goes first. {REPS} repetitions; exports of {SIZE >> 20} MiB on unix sockets; the files sit",
        "in the page cache and start fully written (a copy of the source), so this measures the",
        "servers' CPU and protocol path, not the disk.",
        "",
        f"- commit {commit}; {os.cpu_count()} cores; {platform.platform()}",
        f"- {version(['qemu-storage-daemon', '--version'])}; {version(['nbdcopy', '--version'])};"
        f" {version(['fio', '--version'])}",
        "- nbdcopy: `--connections=2 --requests=64` (write-in with `--flush`, read-out to `null:`);"
        f" fio: nbd engine, 4k random read, QD32, {RUNTIME} s after 1 s ramp",
        f"- wall time {wall:.0f} s",
        "",
        "Ratio = ballot / qsd per repetition (both are higher-is-better figures); target ≥ 1.0.",
        "",
        "| export | figure | ballot median | qsd median | ratio min | ratio median | ratio max |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    worst = None
    for (name, fig), by in results.items():
        b, q = by["ballot"], by["qsd"]
        ratios = [x / y for x, y in zip(b, q)]
        med = statistics.median(ratios)
        worst = med if worst is None else min(worst, med)
        lines.append(
            f"| {name} | {fig} | {statistics.median(b):,.0f} | {statistics.median(q):,.0f} | "
            f"{min(ratios):.2f} | {med:.2f} | {max(ratios):.2f} |")
    lines += ["", f"Lowest median ratio: **{worst:.2f}**.", ""]
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
