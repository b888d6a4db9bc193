#!/usr/bin/env python3
"""The qcow2 driver against qemu-storage-daemon's (issue 19 item 7), written to reports/bench-qcow2.md.

Two topologies, each served over NBD on a unix socket with the same command line by `ballot serve`
and by qemu-storage-daemon (the reference):

  * quorum3: a quorum (vote-threshold 2) of three qcow2 images, each a `qcow2` node over a `file`
             node; the export is the quorum node q0;
  * single:  one qcow2 image (`file` node f0, `qcow2` node c0); the export is c0.

Images are made by `qemu-img create -f qcow2 FILE SIZE` (default 64 KiB clusters, no backing) for
both servers. fio's nbd engine drives the export:

  * on images filled beforehand (every cluster allocated: `qemu-io -c 'write -P 1 ...'` on one
    image, copied to the others; the same images serve every run of both servers), time-based
    (RUNTIME s after 1 s of ramp):
      1M seq read QD4 and 1M seq write QD4 (MiB/s),
      4k randread QD1 and QD32, 4k randwrite QD1 and QD32 (IOPS);
  * on images created afresh just before each run (so the run allocates), size-limited rather
    than time-based (no ramp; one pass, stopped early if it takes longer than RUNTIME s):
      "1M seq write QD4, first write": one sequential pass over the fresh image, every 1 MiB
        write allocating 16 clusters;
      "4k randwrite QD32, first write": one 4 KiB write into a random 4 KiB block of every
        cluster, the clusters in random order (a fio iolog replayed at QD32, the same order for
        both servers within a repetition), so that every write allocates a cluster (plain fio
        randwrite would allocate on only the first of the 16 writes a 64 KiB cluster receives).
        fio's replay does not wait for the writes still in flight when the log runs out, so the
        log ends with QD32 overwrites of clusters written earlier, which are counted too (32 of
        the FRESH/cluster writes).
    These images are FRESH bytes (default 4 x SIZE) so the pass is long enough to time; after
    each run `qemu-img check` runs on the first image and its verdict is kept for the report.

Each figure is taken with the server started fresh, ballot and qemu-storage-daemon alternating
(order reversed every other repetition), REPS times; medians are reported with the ratio
ballot / qsd (higher is better for both MiB/s and IOPS). Every single figure is listed below the
tables, as bench-metadata.py does (no separate raw-data file).

Only the standard library; peers from Debian: fio, qemu-utils (qemu-img, qemu-io,
qemu-storage-daemon).
Environment: BENCH_QCOW2_BYTES (virtual size of the filled images, default 512 MiB),
BENCH_QCOW2_FRESH_BYTES (virtual size of the fresh images, default 4 x BENCH_QCOW2_BYTES),
BENCH_FIO_SECONDS (default 10), BENCH_DIR (a temp dir is made in it for the images and removed at
the end; default /var/tmp: a real disk, not tmpfs), BENCH_OUT (default reports/bench-qcow2.md),
BALLOT_BIN (default target/release/ballot), BENCH_ONLY (run only the workloads whose name
contains it).
Argument: REPS (default 3).
"""
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import fio_job, stop, version, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.environ.get("BALLOT_BIN", os.path.join(ROOT, "target", "release", "ballot"))
SIZE = int(os.environ.get("BENCH_QCOW2_BYTES", str(512 << 20)))
FRESH = int(os.environ.get("BENCH_QCOW2_FRESH_BYTES", str(4 * SIZE)))
RUNTIME = int(os.environ.get("BENCH_FIO_SECONDS", "10"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "reports", "bench-qcow2.md"))
MIB = 1 << 20
FILL_CHUNK = 64 * MIB
REPLAY_QD = 32

# (name, fio arguments, figure, fio direction, images): "filled" images are reused, "fresh" ones
# are created before each run; "replay" is filled in per run with the iolog of first writes.
WORKLOADS = [
    ("1M seq read QD4", ["--rw=read", "--bs=1M", "--iodepth=4"], "bw", "read", "filled"),
    ("1M seq write QD4", ["--rw=write", "--bs=1M", "--iodepth=4"], "bw", "write", "filled"),
    ("4k randread QD1", ["--rw=randread", "--bs=4k", "--iodepth=1"], "iops", "read", "filled"),
    ("4k randread QD32", ["--rw=randread", "--bs=4k", "--iodepth=32"], "iops", "read", "filled"),
    ("4k randwrite QD1", ["--rw=randwrite", "--bs=4k", "--iodepth=1"], "iops", "write", "filled"),
    ("4k randwrite QD32", ["--rw=randwrite", "--bs=4k", "--iodepth=32"], "iops", "write", "filled"),
    ("1M seq write QD4, first write", ["--rw=write", "--bs=1M", "--iodepth=4"], "bw", "write", "fresh"),
    ("4k randwrite QD32, first write", "replay", "iops", "write", "fresh"),
]
# BENCH_ONLY: a substring of the workload names to run (the others are left out).
if os.environ.get("BENCH_ONLY"):
    WORKLOADS = [w for w in WORKLOADS if os.environ["BENCH_ONLY"] in w[0]]
TOPOLOGIES = [
    ("quorum3", "Quorum of three qcow2 images (vote-threshold 2)", 3, "q0"),
    ("single", "Single qcow2 image", 1, "c0"),
]
MODES = ["ballot", "qsd"]


def image(d, topo, kind, i):
    return f"{d}/{topo}-{kind}-{i}.qcow2"


def create(path, size):
    if os.path.exists(path):
        os.unlink(path)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)], check=True)


def cluster_size(path):
    out = subprocess.run(["qemu-img", "info", "--output=json", path], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)["cluster-size"]


def args(d, topo, n, kind, export):
    """qemu-storage-daemon's syntax, which `ballot serve` takes unchanged."""
    a = []
    for i in range(n):
        a += ["--blockdev", f"driver=file,node-name=f{i},filename={image(d, topo, kind, i)}",
              "--blockdev", f"driver=qcow2,node-name=c{i},file=f{i}"]
    if n > 1:
        a += ["--blockdev", json.dumps({"driver": "quorum", "node-name": "q0", "vote-threshold": 2,
                                        "children": [f"c{i}" for i in range(n)]})]
    a += ["--nbd-server", f"addr.type=unix,addr.path={d}/nbd.sock",
          "--export", f"type=nbd,id=e0,node-name={export},name={export},writable=on"]
    return a


def serve(d, mode, topo, n, kind, export):
    sock = f"{d}/nbd.sock"
    if os.path.exists(sock):
        os.unlink(sock)
    cmd = (["qemu-storage-daemon"] if mode == "qsd" else [BALLOT, "serve"]) + args(d, topo, n, kind, export)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(sock, p, mode)
    return p, sock


def first_write_log(path, rng, cluster):
    """An fio iolog (version 2) of one 4 KiB write into a random block of every cluster of the
    fresh image, the clusters in random order, then REPLAY_QD overwrites of clusters already
    written (fio stops without waiting for the writes in flight when the log runs out)."""
    blocks = cluster // 4096
    offs = [c * cluster + rng.randrange(blocks) * 4096 for c in range(FRESH // cluster)]
    rng.shuffle(offs)
    with open(path, "w") as f:
        f.write("fio version 2 iolog\nnbd add\nnbd open\n")
        for o in offs + offs[:REPLAY_QD]:
            f.write(f"nbd write {o} 4096\n")


def fio(sock, export, extra, what, ddir, kind):
    uri = f"nbd+unix:///{export}?socket={sock}"
    if kind == "fresh":
        # fio_job's time_based and ramp are global options; these job options override them.
        extra = ["--time_based=0", "--ramp_time=0", *extra]
        size = FRESH
    else:
        size = SIZE
    j = fio_job(sock + ".fio.json", uri, ["--name=w", f"--size={size}", f"--runtime={RUNTIME}", *extra])
    r = j[ddir]
    return r["iops"] if what == "iops" else r["bw_bytes"] / MIB


def check(path):
    """qemu-img check's verdict on an image a server has just written: "ok" or what is wrong,
    and how many of its clusters are allocated (all of them once a first-write pass is done)."""
    r = subprocess.run(["qemu-img", "check", "--output=json", path], capture_output=True, text=True)
    try:
        j = json.loads(r.stdout)
    except ValueError:
        return f"qemu-img check exit {r.returncode}: {r.stderr.strip()}", ""
    bad = {k: j[k] for k in ("corruptions", "leaks", "check-errors") if j.get(k)}
    alloc = f"{j.get('allocated-clusters', 0)}/{j.get('total-clusters', '?')} clusters allocated"
    return ("ok" if r.returncode == 0 and not bad else f"qemu-img check exit {r.returncode}: {bad}"), alloc


def git(*a):
    return subprocess.run(["git", "-C", ROOT, *a], capture_output=True, text=True).stdout.strip()


def main():
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    for tool in ["fio", "qemu-storage-daemon", "qemu-img", "qemu-io"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install fio qemu-utils)")
    if not os.access(BALLOT, os.X_OK):
        raise SystemExit(f"{BALLOT} is missing (cargo build --release -p ballot)")
    base = os.environ.get("BENCH_DIR") or "/var/tmp"
    os.makedirs(base, exist_ok=True)
    d = tempfile.mkdtemp(prefix="ballot-bench-qcow2-", dir=base)
    started = time.time()
    res = {(t, w, m): [] for t, _, _, _ in TOPOLOGIES for w, *_ in WORKLOADS for m in MODES}
    checks = {}
    try:
        # One filled image, copied: every cluster allocated, the same bytes on every child.
        src = image(d, "fill", "filled", 0)
        create(src, SIZE)
        cluster = cluster_size(src)
        cmds = []
        for off in range(0, SIZE, FILL_CHUNK):
            cmds += ["-c", f"write -P 1 {off} {min(FILL_CHUNK, SIZE - off)}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *cmds, src], check=True, stdout=subprocess.DEVNULL)
        for topo, _, n, _ in TOPOLOGIES:
            for i in range(n):
                shutil.copyfile(src, image(d, topo, "filled", i))
        os.unlink(src)
        for rep in range(reps):
            rng = random.Random(rep)
            for topo, _, n, export in TOPOLOGIES:
                for name, extra, what, ddir, kind in WORKLOADS:
                    if extra == "replay":
                        first_write_log(f"{d}/first-write.iolog", rng, cluster)
                        extra = [f"--iodepth={REPLAY_QD}", f"--read_iolog={d}/first-write.iolog",
                                 "--replay_no_stall=1"]
                    order = MODES if rep % 2 == 0 else list(reversed(MODES))
                    for m in order:
                        if kind == "fresh":
                            for i in range(n):
                                create(image(d, topo, kind, i), FRESH)
                            # Drain the previous run's write-back, so no run inherits another's
                            # dirty pages. (The second run of a pair is still faster, for reasons
                            # of the file system's: run an even number of repetitions, so each
                            # server runs first equally often.)
                            os.sync()
                        p, sock = serve(d, m, topo, n, kind, export)
                        try:
                            v = fio(sock, export, extra, what, ddir, kind)
                        finally:
                            stop(p)
                        res[(topo, name, m)].append(v)
                        note = ""
                        if kind == "fresh":
                            c, alloc = check(image(d, topo, kind, 0))
                            checks.setdefault((topo, name, m), []).append(c)
                            note = f" (qemu-img check: {c}, {alloc})"
                            for i in range(n):
                                os.unlink(image(d, topo, kind, i))
                        print(f"rep {rep + 1} {topo} {name} {m}: {v:.0f}{note}", flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    elapsed = time.time() - started
    med = {k: statistics.median(v) for k, v in res.items()}
    dirty = " (working tree with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(os.path.getmtime(BALLOT)))
    lines = [
        "# qcow2: ballot against qemu-storage-daemon (issue 19 item 7)",
        "",
        f"`scripts/bench-qcow2.py {reps}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, "
        f"{elapsed / 60:.0f} min, on {os.uname().sysname} ({os.cpu_count()} cores): a quorum of three "
        "qcow2 images (vote-threshold 2) and a single qcow2 image, each a `qcow2` node over a `file` "
        "node, served over NBD on a unix socket by `ballot serve` and by qemu-storage-daemon with the "
        "same command line; images made by `qemu-img create -f qcow2` "
        f"({cluster // 1024} KiB clusters, no backing). fio's nbd engine. The workloads without "
        f"\"first write\" run on {SIZE // MIB} MiB images filled beforehand with qemu-io (every "
        f"cluster allocated; the same images for every run), {RUNTIME} s after 1 s of ramp. The "
        f"\"first write\" workloads run on {FRESH // MIB} MiB images created just before each run, "
        f"one pass without ramp (stopped after {RUNTIME} s if not done), so that every write "
        "allocates: 1 MiB sequential writes (16 clusters each), and one 4 KiB write into a random "
        "block of every cluster, the clusters in random order (an fio iolog replayed at QD32, "
        f"ending with {REPLAY_QD} overwrites because fio's replay does not wait for the writes in "
        "flight when the log runs out). Each server started fresh for each figure, the two "
        f"alternating (order reversed every other repetition), {reps} repetition{'s' if reps != 1 else ''}, medians; "
        "ratio = ballot / qsd, higher is better for MiB/s and IOPS alike.",
        "",
        f"Tools: ballot at commit {git('rev-parse', '--short', 'HEAD')}{dirty}, binary built {built}; "
        f"{version(['qemu-storage-daemon', '--version'])}; {version(['fio', '--version'])}.",
        "",
    ]
    for topo, title, _, _ in TOPOLOGIES:
        lines += [
            f"## {title}",
            "",
            "| workload | unit | ballot | qemu-storage-daemon | ballot / qsd |",
            "|---|---|---|---|---|",
        ]
        for name, _, what, _, _ in WORKLOADS:
            a, q = med[(topo, name, "ballot")], med[(topo, name, "qsd")]
            unit = "IOPS" if what == "iops" else "MiB/s"
            lines.append(f"| {name} | {unit} | {a:.0f} | {q:.0f} | {a / q if q else 0:.2f} |")
        lines.append("")
    lines += ["Every repetition (in repetition order):", ""]
    for topo, _, _, _ in TOPOLOGIES:
        for name, *_ in WORKLOADS:
            cells = "; ".join(
                f"{m}: " + ", ".join(f"{v:.0f}" for v in res[(topo, name, m)]) for m in MODES)
            lines.append(f"- {topo}, {name}: {cells}")
    bad = [f"{t}, {w}, {m}: " + "; ".join(c for c in cs if c != "ok")
           for (t, w, m), cs in checks.items() if any(c != "ok" for c in cs)]
    lines += [
        "",
        "`qemu-img check` on the first image after every first-write run: "
        + ("no errors." if not bad else "ERRORS:"),
    ]
    lines += [f"- {b}" for b in bad]
    lines.append("")
    os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
