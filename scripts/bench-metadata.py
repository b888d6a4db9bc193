#!/usr/bin/env python3
"""The metadata node's cost (HEALING.md H24, issue #18 item 6), written to reports/bench-metadata.md.

A quorum of three `file` children (vote-threshold 2) served over NBD on a unix socket; fio's nbd
engine drives it:

  * 4k random writes at QD32 (H24: with a metadata node at most 10 % fewer IOPS);
  * sequential 1 MiB writes at QD4 (H24: at most 5 % less throughput);
  * the same two with an fsync every 64 writes (a guest that flushes: every flush is a point
    where intent extents may go cold and be cleared).

Each figure is taken for ballot without a metadata node, ballot with one (`metadata=md`, made
by `ballot metadata create --in-sync`, default intent-cold 5 s), and qemu-storage-daemon with
the same command line minus the metadata node (the reference), alternating, REPS times, on the
same images. Medians are reported with ratios.

Only the standard library; peers from Debian: fio, qemu-utils.
Environment: BENCH_MD_BYTES (child size, default 512 MiB), BENCH_FIO_SECONDS (default 10),
BENCH_DIR (where the images go, default a temp dir under /var/tmp: a real disk, not tmpfs),
BENCH_OUT (default reports/bench-metadata.md), BALLOT_BIN (default target/release/ballot).
Argument: REPS (default 3).
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchlib import fio_job, stop, version, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.environ.get("BALLOT_BIN", os.path.join(ROOT, "target", "release", "ballot"))
SIZE = int(os.environ.get("BENCH_MD_BYTES", str(512 << 20)))
RUNTIME = int(os.environ.get("BENCH_FIO_SECONDS", "10"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "reports", "bench-metadata.md"))
MIB = 1 << 20

WORKLOADS = [
    ("4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops"),
    ("1M seq write QD4", ["--rw=write", "--bs=1M", "--iodepth=4"], "bw"),
    ("4k randwrite QD32, fsync/64", ["--rw=randwrite", "--bs=4k", "--iodepth=32", "--fsync=64"], "iops"),
    ("1M seq write QD4, fsync/64", ["--rw=write", "--bs=1M", "--iodepth=4", "--fsync=64"], "bw"),
]
MODES = ["ballot", "ballot-md", "qsd"]


def args(d, mode):
    a = []
    for i in range(3):
        a += ["--blockdev", f"driver=file,node-name=f{i},filename={d}/c{i}.raw"]
    q = {"driver": "quorum", "node-name": "q0", "vote-threshold": 2, "children": ["f0", "f1", "f2"]}
    if mode == "ballot-md":
        a += ["--blockdev", f"driver=file,node-name=md,filename={d}/q.meta"]
        q["metadata"] = "md"
    a += ["--blockdev", json.dumps(q),
          "--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
          "--export", "type=nbd,id=e0,node-name=q0,name=q0,writable=on"]
    return a


def serve(d, mode):
    sock = f"{d}/nbd.sock"
    if os.path.exists(sock):
        os.unlink(sock)
    if mode == "ballot-md":
        if os.path.exists(f"{d}/q.meta"):
            os.unlink(f"{d}/q.meta")
        subprocess.run([BALLOT, "metadata", "create", f"{d}/q.meta", "--size", str(SIZE),
                        "--children", "f0,f1,f2", "--in-sync"], check=True, capture_output=True)
    cmd = (["qemu-storage-daemon"] if mode == "qsd" else [BALLOT, "serve"]) + args(d, mode)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(sock, p, mode)
    return p, sock


def fio(sock, extra, what):
    j = fio_job(sock + ".fio.json", f"nbd+unix:///q0?socket={sock}",
                ["--name=w", f"--size={SIZE}", f"--runtime={RUNTIME}", *extra])
    w = j["write"]
    return w["iops"] if what == "iops" else w["bw_bytes"] / MIB


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    for tool in ["fio", "qemu-storage-daemon"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install fio qemu-utils)")
    d = os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="ballot-bench-md-", dir="/var/tmp")
    os.makedirs(d, exist_ok=True)
    try:
        for i in range(3):
            with open(f"{d}/c{i}.raw", "wb") as f:
                f.truncate(SIZE)
            # Allocated up front, so no mode pays the file system's first writes.
            subprocess.run(["fallocate", "-l", str(SIZE), f"{d}/c{i}.raw"], check=True)
        res = {(w, m): [] for w, _, _ in WORKLOADS for m in MODES}
        for rep in range(reps):
            for name, extra, what in WORKLOADS:
                order = MODES if rep % 2 == 0 else list(reversed(MODES))
                for m in order:
                    p, sock = serve(d, m)
                    try:
                        v = fio(sock, extra, what)
                    finally:
                        stop(p)
                    res[(name, m)].append(v)
                    print(f"rep {rep + 1} {name} {m}: {v:.0f}", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    limit = {"iops": 0.90, "bw": 0.95}
    lines = [
        "# The metadata node's cost (HEALING.md H24)",
        "",
        f"`scripts/bench-metadata.py {reps}`: a quorum of three `file` children (vote-threshold 2, "
        f"{SIZE // MIB} MiB each, preallocated) on {os.uname().sysname} "
        f"({os.cpu_count()} cores), served over NBD on a unix socket; fio's nbd engine, {RUNTIME} s "
        "after 1 s of ramp, each mode started fresh for each figure, the three modes alternating "
        f"(order reversed every other repetition), {reps} repetitions, medians. ballot with a "
        "metadata node uses `metadata=md` on a file made by `ballot metadata create --in-sync` "
        "(intent-cold 5 s, intent-extents 1024); qemu-storage-daemon runs the same command line "
        "without the metadata node.",
        "",
        f"Tools: ballot at commit {subprocess.run(['git', '-C', ROOT, 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()}; "
        f"{version(['qemu-storage-daemon', '--version'])}; {version(['fio', '--version'])}.",
        "",
        "| workload | unit | ballot | ballot + metadata | qemu-storage-daemon | metadata / none | H24 limit | ballot / qsd | ballot + metadata / qsd |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    worst = True
    for name, _, what in WORKLOADS:
        a, b, q = med[(name, "ballot")], med[(name, "ballot-md")], med[(name, "qsd")]
        r = b / a if a else 0.0
        lim = limit[what]
        if "fsync" not in name:
            worst &= r >= lim
        unit = "IOPS" if what == "iops" else "MiB/s"
        lines.append(
            f"| {name} | {unit} | {a:.0f} | {b:.0f} | {q:.0f} | {r:.3f} | "
            f"{'>= %.2f' % lim if 'fsync' not in name else '(none)'} | {a / q if q else 0:.2f} | {b / q if q else 0:.2f} |")
    lines += [
        "",
        "Every repetition (same order as above: ballot, ballot + metadata, qemu-storage-daemon):",
        "",
    ]
    for name, _, _ in WORKLOADS:
        cells = "; ".join(
            f"{m}: " + ", ".join(f"{v:.0f}" for v in res[(name, m)]) for m in MODES)
        lines.append(f"- {name}: {cells}")
    lines += [
        "",
        "H24 " + ("holds" if worst else "is MISSED") + " for the two workloads it names.",
        "",
    ]
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
