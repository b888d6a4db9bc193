#!/usr/bin/env python3
"""COLO benchmark (issue 5 item 7): writes reports/bench-colo.md.

1. Checkpoint and failover time on a 1 TiB secondary disk with 1k and 100k dirty clusters:
   `cargo bench -p ballot --bench colo` (in process; see driver/benches/colo.rs).
2. Forwarding overhead on the primary's write throughput versus a lone local disk, with fio
   (nbd engine) against the primary's export, in one run and alternating:
   * ballot: `ballot serve` primary (quorum fifo t=1 over a raw file) measured lone, then after
     the start sequence of REPLICATION.md §2.4 hot-adds `replication0` forwarding over NBD to a
     `ballot serve` secondary (overlays, copy-before-write);
   * reference: qemu-storage-daemon with the same quorum, measured lone, then after hot-adding
     an `nbd` child to a qemu-storage-daemon export of the secondary file (QEMU's COLO commands
     exist only in the system emulator, so this is the same write path without the
     replication filter and without copy-before-write on the far side).

Usage: scripts/bench-colo.sh [REPS]  (default 3; BENCH_COLO_FIO_SECONDS, BENCH_COLO_DIRTY).
Only the standard library; peers from Debian: qemu-utils, fio.
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

from benchlib import Qmp, stop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.path.join(ROOT, "target", "release", "ballot")
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
RUNTIME = int(os.environ.get("BENCH_COLO_FIO_SECONDS", "3"))
DIRTY = os.environ.get("BENCH_COLO_DIRTY", "1000 100000").split()
SIZE = 1 << 30
OUT = os.path.join(ROOT, "reports", "bench-colo.md")

WORKLOADS = [
    ("4k randwrite QD1 IOPS", ["--rw=randwrite", "--bs=4k", "--iodepth=1"], "iops"),
    ("4k randwrite QD32 IOPS", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops"),
    ("1M write QD8 MiB/s", ["--rw=write", "--bs=1M", "--iodepth=8"], "bw"),
]


def start(cmd, sock, qmp):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while not (os.path.exists(sock) and os.path.exists(qmp)):
        if p.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{cmd[0]} did not start: {p.stderr.read().decode()}")
        time.sleep(0.02)
    return p


def fio(sock, d, extra, key):
    out = os.path.join(d, "fio.json")
    subprocess.run(
        ["fio", "--output-format=json", f"--output={out}", "--name=w", "--ioengine=nbd",
         f"--uri=nbd+unix:///colo-disk0?socket={sock}", f"--size={SIZE}",
         f"--runtime={RUNTIME}", "--time_based=1", "--ramp_time=1"] + extra,
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    with open(out) as f:
        j = json.load(f)["jobs"][0]
    if j["error"] != 0:
        raise SystemExit(f"fio error {j['error']}")
    w = j["write"]
    return w["iops"] if key == "iops" else w["bw"] / 1024.0


def sparse(path):
    with open(path, "wb") as f:
        f.truncate(SIZE)


def one_round(kind, d, results):
    """Lone, then forwarding, for one server kind."""
    pimg, simg = os.path.join(d, "primary.raw"), os.path.join(d, "secondary.raw")
    sparse(pimg)
    sparse(simg)
    psock, pqmp = os.path.join(d, f"{kind}-p.sock"), os.path.join(d, f"{kind}-pq.sock")
    ssock, sqmp = os.path.join(d, f"{kind}-s.sock"), os.path.join(d, f"{kind}-sq.sock")
    for x in [psock, pqmp, ssock, sqmp]:
        if os.path.exists(x):
            os.unlink(x)
    exe = [BALLOT, "serve"] if kind == "ballot" else ["qemu-storage-daemon"]
    mon = lambda q: [f"--chardev=socket,path={q},server=on,wait=off,id=m0", "--monitor=chardev=m0"]
    if kind == "ballot":
        sec_args = [
            f"--blockdev=driver=file,node-name=sfile,filename={simg}",
            "--blockdev=driver=raw,node-name=parent0,file=sfile",
            "--blockdev=driver=overlay,node-name=hidden0,backing=parent0",
            "--blockdev=driver=overlay,node-name=active0,backing=hidden0",
            "--blockdev=driver=replication,node-name=childs0,mode=secondary,top-id=colo-disk0,file=active0",
            '--blockdev={"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["childs0"]}',
            f"--nbd-server=addr.type=unix,addr.path={ssock}",
            "--export=type=nbd,id=fwd,node-name=parent0,name=parent0,writable=on",
        ]
    else:
        sec_args = [
            f"--blockdev=driver=file,node-name=sfile,filename={simg}",
            "--blockdev=driver=raw,node-name=parent0,file=sfile",
            f"--nbd-server=addr.type=unix,addr.path={ssock}",
            "--export=type=nbd,id=fwd,node-name=parent0,name=parent0,writable=on",
        ]
    pri_args = [
        f"--blockdev=driver=file,node-name=pfile,filename={pimg}",
        "--blockdev=driver=raw,node-name=plocal,file=pfile",
        '--blockdev={"driver":"quorum","node-name":"colo-disk0","read-pattern":"fifo","vote-threshold":1,"children":["plocal"]}',
        f"--nbd-server=addr.type=unix,addr.path={psock}",
        "--export=type=nbd,id=pvm,node-name=colo-disk0,name=colo-disk0,writable=on",
    ]
    sec = start(exe + sec_args + mon(sqmp), ssock, sqmp)
    pri = start(exe + pri_args + mon(pqmp), psock, pqmp)
    try:
        for name, extra, key in WORKLOADS:
            results.setdefault((name, "lone"), {}).setdefault(kind, []).append(
                fio(psock, d, extra, key))
        sq, pq = Qmp(sqmp), Qmp(pqmp)
        child = {"driver": "nbd", "export": "parent0",
                 "server": {"type": "unix", "path": ssock}}
        if kind == "ballot":
            sq.cmd("xen-set-replication", enable=True, primary=False)
            pq.cmd("blockdev-add", driver="replication", **{"node-name": "replication0"},
                   mode="primary", file=child)
            pq.cmd("x-blockdev-change", parent="colo-disk0", node="replication0")
            pq.cmd("xen-set-replication", enable=True, primary=True)
        else:
            pq.cmd("blockdev-add", **{"node-name": "replication0"}, **child)
            pq.cmd("x-blockdev-change", parent="colo-disk0", node="replication0")
        for name, extra, key in WORKLOADS:
            results.setdefault((name, "forwarding"), {}).setdefault(kind, []).append(
                fio(psock, d, extra, key))
    finally:
        stop(pri)
        stop(sec)


def checkpoint_rows():
    out = subprocess.run(
        ["cargo", "bench", "-q", "-p", "ballot", "--bench", "colo", "--"] + DIRTY,
        cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return [json.loads(l) for l in out.splitlines() if l.startswith("{")]


def fmt(x):
    return f"{x:,.0f}" if x >= 100 else f"{x:,.2f}"


def main():
    for tool in ["qemu-storage-daemon", "fio"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install qemu-utils fio)")
    rows = checkpoint_rows()
    results = {}
    with tempfile.TemporaryDirectory(prefix="ballot-bench-colo-") as d:
        for rep in range(REPS):
            order = ["ballot", "qsd"] if rep % 2 == 0 else ["qsd", "ballot"]
            for kind in order:
                one_round(kind, d, results)
    cpu = platform.processor() or platform.machine()
    lines = [
        "# COLO benchmark",
        "",
        f"Generated by `scripts/bench-colo.sh {REPS}` on {os.cpu_count()} cores ({cpu}).",
        "",
        "## Checkpoint and failover on a 1 TiB secondary disk",
        "",
        "The secondary graph of REPLICATION.md §2.2 in one process (`driver/benches/colo.rs`). N",
        "clusters of 64 KiB are dirtied, spread evenly over the 1 TiB disk: half by SVM writes into",
        "A, half by forwarded writes through S's export, each preserved into H. Checkpoint = the",
        "secondary's `do_checkpoint` (A and H emptied, R27, R51). Failover = `stop(failover)` until",
        "the commit has written every dirty cluster into S and switched to it (R31). With `null-co`",
        "S stores nothing and reads zeroes, so H's preserved clusters are zero clusters and the",
        "commit's writes cost nothing: the row measures ballot's own work. With a sparse 1 TiB",
        "raw file, the forwarded clusters hold data first, so H holds 64 KiB of data per cluster",
        "and the commit writes N x 64 KiB to the file (page cache).",
        "",
        "| S | dirty clusters | in A | in H | checkpoint | failover (commit) | commit rate |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mib = r["dirty"] * 64 / 1024
        lines.append(
            f"| {r['disk']} | {r['dirty']:,} | {r['in_active']:,} | {r['in_hidden']:,} | "
            f"{r['checkpoint_s'] * 1000:.3f} ms | {r['failover_s'] * 1000:.1f} ms | "
            f"{mib / r['failover_s']:,.0f} MiB/s |")
    lines += [""]
    for disk in sorted({r["disk"] for r in rows}):
        rs = sorted((r for r in rows if r["disk"] == disk), key=lambda r: r["dirty"])
        if len(rs) >= 2:
            a, b = rs[0], rs[-1]
            lines.append(
                f"{disk}: {b['dirty'] / a['dirty']:.0f}x the dirty clusters cost "
                f"{b['checkpoint_s'] / a['checkpoint_s']:.0f}x the checkpoint time and "
                f"{b['failover_s'] / a['failover_s']:.0f}x the failover time.")
    lines += [
        "",
        "Neither depends on the disk's size (the overlay map is a B-tree of allocated clusters",
        "only, R42, R51, R52). The file-backed failover at 100 k clusters writes 6.1 GiB into S",
        "and is bound by the kernel's dirty-page writeback, not by the commit loop (compare the",
        "null-co row, which does the same map and lock work without the I/O).",
        "",
        "## Forwarding overhead on the primary's writes",
        "",
        f"fio (nbd engine, {RUNTIME} s per point after 1 s ramp, 1 GiB sparse images) against the",
        "primary's export; `lone` is the primary before the hot add, `forwarding` after it. Each",
        f"cell: median of {REPS} alternating repetitions (min..max).",
        "",
        "| workload | ballot lone | ballot forwarding | ballot fwd/lone | qsd lone | qsd forwarding (nbd child) | qsd fwd/lone | forwarding ballot/qsd |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, _, _ in WORKLOADS:
        bl = results[(name, "lone")]["ballot"]
        bf = results[(name, "forwarding")]["ballot"]
        ql = results[(name, "lone")]["qsd"]
        qf = results[(name, "forwarding")]["qsd"]
        med = statistics.median
        cell = lambda v: f"{fmt(med(v))} ({fmt(min(v))}..{fmt(max(v))})"
        lines.append(
            f"| {name} | {cell(bl)} | {cell(bf)} | {med(bf) / med(bl):.2f} | {cell(ql)} | "
            f"{cell(qf)} | {med(qf) / med(ql):.2f} | {med(bf) / med(qf):.2f} |")
    lines += [
        "",
        "The reference forwards the same writes over NBD without copy-before-write on the far",
        "side; ballot's secondary preserves the old contents of every newly touched cluster into",
        "H before the forwarded write lands (R19), which is the price of the SVM's consistent",
        "view.",
        "",
    ]
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
