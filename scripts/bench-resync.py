#!/usr/bin/env python3
"""The resync benchmark (HEALING.md, issue #17 item 7), written to reports/bench-resync.md.

Two figures, each alternating ballot and its reference in one run, REPS times:

  * idle resync of a SIZE child over NBD: a quorum (`vote-threshold=1`) over one nbdkit
    `memory` replica holding SIZE bytes of pattern data; an empty nbdkit `memory` replica is
    hot-added (HEALING.md H8: every granule out of sync) and `x-quorum-resync` copies it; the
    time from the command to `BLOCK_JOB_COMPLETED`, against `nbdcopy` copying the same bytes
    between the same kind of servers (fresh target each time). Target: >= 0.8x nbdcopy.
  * guest 4k random reads at QD32 (fio, nbd engine, RUNTIME s) on the quorum's export while a
    resync of an empty hot-added replica runs, against the same without a resync. Target:
    >= 0.8x.

Only the standard library; peers from Debian: libnbd-bin (nbdcopy), nbdkit, fio.
Environment: BENCH_RESYNC_BYTES (default 1 GiB), BENCH_FIO_SECONDS (default 10),
BENCH_RESYNC_INFLIGHT (ballot's resync-inflight, default 32 = the quorum's default),
BENCH_OUT (default reports/bench-resync.md), BALLOT_BIN (default target/release/ballot).
Argument: REPS (default 3); or `--once resync|nbdcopy`: one copy set up from nothing, its
MiB/s printed (for a whole-process A/B timer comparing two ballot builds, or ballot and nbdcopy).
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import Qmp, fio_job, stop, version, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.environ.get("BALLOT_BIN", os.path.join(ROOT, "target", "release", "ballot"))
SIZE = int(os.environ.get("BENCH_RESYNC_BYTES", str(1 << 30)))
RUNTIME = int(os.environ.get("BENCH_FIO_SECONDS", "10"))
INFLIGHT = int(os.environ.get("BENCH_RESYNC_INFLIGHT", "32"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "reports", "bench-resync.md"))
MIB = 1 << 20


def nbdkit(d, name, *plugin):
    s = os.path.join(d, f"{name}.sock")
    if os.path.exists(s):
        os.unlink(s)
    p = subprocess.Popen(["nbdkit", "--foreground", "--exit-with-parent", "--unix", s, *plugin],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(s, p, f"nbdkit {name}")
    return p, s


def uri(sock):
    return f"nbd+unix:///?socket={sock}"


def source(d):
    """An nbdkit memory replica filled with pattern data."""
    p, s = nbdkit(d, "src", "memory", f"size={SIZE}")
    pat, ps = nbdkit(d, "pattern", "pattern", f"size={SIZE}")
    subprocess.run(["nbdcopy", uri(ps), uri(s)], check=True)
    stop(pat)
    return p, s


def serve(d, src_sock):
    nbd = os.path.join(d, "ballot.sock")
    qmp = os.path.join(d, "ballot.qmp")
    for f in (nbd, qmp):
        if os.path.exists(f):
            os.unlink(f)
    args = [BALLOT, "serve",
            f"--blockdev=driver=nbd,node-name=n0,server.type=unix,server.path={src_sock}",
            '--blockdev={"driver":"quorum","node-name":"q0","vote-threshold":1,'
            f'"children":["n0"],"resync":"manual","resync-inflight":{INFLIGHT}}}',
            f"--nbd-server=addr.type=unix,addr.path={nbd}",
            "--export=type=nbd,id=e0,node-name=q0,name=q0,writable=on",
            f"--chardev=socket,id=m0,path={qmp},server=on,wait=off", "--monitor=chardev=m0"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(nbd, p, "ballot serve")
    wait_for(qmp, p, "ballot serve QMP")
    return p, nbd, Qmp(qmp)


def hot_add_empty(q, d, name):
    dp, ds = nbdkit(d, name, "memory", f"size={SIZE}")
    q.cmd("blockdev-add", driver="nbd", server={"type": "unix", "path": ds},
          **{"node-name": name})
    q.cmd("x-blockdev-change", parent="q0", node=name)
    return dp, ds


def resync_seconds(d, src_sock):
    p, _, q = serve(d, src_sock)
    dp, ds = hot_add_empty(q, d, "n1")
    t = time.perf_counter()
    q.cmd("x-quorum-resync", **{"node-name": "q0"})
    done = q.wait_event("BLOCK_JOB_COMPLETED", 600)
    secs = time.perf_counter() - t
    data = done["data"]
    if data.get("error") or data["offset"] != SIZE:
        raise SystemExit(f"resync did not copy everything: {data}")
    # The copy is the source, byte for byte.
    a = subprocess.run(f"nbdcopy '{uri(src_sock)}' - | sha256sum", shell=True,
                       capture_output=True, check=True).stdout
    b = subprocess.run(f"nbdcopy '{uri(ds)}' - | sha256sum", shell=True,
                       capture_output=True, check=True).stdout
    if a != b:
        raise SystemExit("the resynced replica differs from the source")
    stop(p)
    stop(dp)
    return secs


def nbdcopy_seconds(d, src_sock):
    dp, ds = nbdkit(d, "dst", "memory", f"size={SIZE}")
    t = time.perf_counter()
    subprocess.run(["nbdcopy", uri(src_sock), uri(ds)], check=True)
    secs = time.perf_counter() - t
    stop(dp)
    return secs


def fio_iops(nbd_sock):
    j = fio_job(nbd_sock + ".fio.json", f"nbd+unix:///q0?socket={nbd_sock}",
                ["--name=randread", "--rw=randread", "--bs=4k", "--iodepth=32", f"--size={SIZE}",
                 f"--runtime={RUNTIME}"])
    return j["read"]["iops"]


def randread_iops(d, src_sock, during_resync):
    p, nbd, q = serve(d, src_sock)
    extra = None
    if during_resync:
        extra = hot_add_empty(q, d, "n1")
        q.cmd("x-quorum-resync", **{"node-name": "q0"})
    iops = fio_iops(nbd)
    if during_resync:
        jobs = q.cmd("query-jobs")
        if not jobs or jobs[0]["status"] not in ("running", "paused"):
            raise SystemExit(f"the resync was not running during fio: {jobs}")
    stop(p)
    if extra:
        stop(extra[0])
    return iops


def once(what):
    """One copy, set up from nothing, for a whole-process A/B timer: `--once resync` (the
    ballot binary in BALLOT_BIN) or `--once nbdcopy`. Prints the copy's own seconds."""
    d = tempfile.mkdtemp(prefix="ballot-bench-resync.")
    src, src_sock = source(d)
    try:
        secs = resync_seconds(d, src_sock) if what == "resync" else nbdcopy_seconds(d, src_sock)
    finally:
        stop(src)
        shutil.rmtree(d, ignore_errors=True)
    print(f"{what} {SIZE / MIB / secs:.1f} MiB/s ({secs:.3f} s)")


def main():
    for tool in ["nbdcopy", "nbdkit", "fio"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is missing (apt-get install libnbd-bin nbdkit fio)")
    if len(sys.argv) > 2 and sys.argv[1] == "--once":
        return once(sys.argv[2])
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    d = tempfile.mkdtemp(prefix="ballot-bench-resync.")
    src, src_sock = source(d)
    res = {"resync s": [], "nbdcopy s": [], "randread IOPS": [], "randread during resync IOPS": []}
    try:
        for _ in range(reps):
            res["nbdcopy s"].append(nbdcopy_seconds(d, src_sock))
            res["resync s"].append(resync_seconds(d, src_sock))
            res["randread IOPS"].append(randread_iops(d, src_sock, False))
            res["randread during resync IOPS"].append(randread_iops(d, src_sock, True))
    finally:
        stop(src)
        shutil.rmtree(d, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    mibs = lambda s: SIZE / MIB / s
    copy_ratio = med["nbdcopy s"] / med["resync s"]
    read_ratio = med["randread during resync IOPS"] / med["randread IOPS"]
    rows = [
        ("idle resync MiB/s (ballot)", [mibs(s) for s in res["resync s"]]),
        ("nbdcopy MiB/s (reference)", [mibs(s) for s in res["nbdcopy s"]]),
        ("4k randread QD32 IOPS, no resync", res["randread IOPS"]),
        ("4k randread QD32 IOPS, during a resync", res["randread during resync IOPS"]),
    ]
    lines = [
        "# Resync benchmark (issue #17, HEALING.md H10–H15)",
        "",
        f"`scripts/bench-resync.sh {reps}`: {reps} repetitions, ballot and its reference alternating "
        f"in one run; {SIZE // MIB} MiB child; `resync-inflight={INFLIGHT}`; fio {RUNTIME} s after 1 s "
        f"ramp. Replicas: nbdkit `memory` over unix sockets ({version(['nbdkit', '--version'])}; "
        f"{version(['nbdcopy', '--version'])}; {version(['fio', '--version'])}); "
        f"{os.cpu_count()} cores.",
        "",
        "| figure | min | median | max |",
        "|---|---|---|---|",
    ]
    for name, v in rows:
        lines.append(f"| {name} | {min(v):.1f} | {statistics.median(v):.1f} | {max(v):.1f} |")
    lines += [
        "",
        "| target | ratio (medians) | met |",
        "|---|---|---|",
        f"| idle resync >= 0.8x nbdcopy | {copy_ratio:.2f}x | {'yes' if copy_ratio >= 0.8 else 'no'} |",
        f"| guest IOPS during resync >= 0.8x without | {read_ratio:.2f}x | {'yes' if read_ratio >= 0.8 else 'no'} |",
        "",
        "The resync compares before it copies (HEALING.md H8, H10): each granule of the target is "
        "read, found different and written; nbdcopy only reads the source and writes the target. "
        "During guest I/O the resync is held to `resync-min-speed` (8 MiB/s, H15), which is why the "
        "guest's IOPS barely move.",
        "",
    ]
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
