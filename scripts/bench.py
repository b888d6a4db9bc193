#!/usr/bin/env python3
"""The NBD benchmark (issue 7 item 2, issue 21 items 1-2; NBD.md §9): `ballot serve` against
qemu-storage-daemon with the same command line (qemu-storage-daemon's syntax, which ballot takes
unchanged), and against reference NBD servers for the single-file and null exports, in one run.

Transports (BENCH_TRANSPORTS, default "unix,tcp"): every server under measurement listens either
on a unix socket in the run's temporary directory or on TCP 127.0.0.1 (a free port chosen per
server start). The NBD replicas below always sit on unix sockets.

Exports (BENCH_EXPORTS, default all five; "quorum3-nbd" stands for both quorum3-nbd variants):

  * quorum3-file:       quorum (vote-threshold 2) of three raw files
  * quorum3-nbd-nbdkit: quorum (vote-threshold 2) of three NBD replicas, each an
                        `nbdkit memory size=SIZE` server
  * quorum3-nbd-ballot: quorum (vote-threshold 2) of three NBD replicas, each a separate
                        `ballot serve` exporting a raw file (`--blockdev driver=file`,
                        `--nbd-server addr.type=unix`, `--export ...,writable=on`)
  * file:               a single raw file
  * null:               `driver=null-co,size=SIZE,read-zeroes=on`

The replicas are started once, filled with the source data, and shared by every server and both
transports. Servers, each started and stopped (SIGTERM, benchlib.stop) by this script once per
repetition and transport, serving these exports:

  * ballot, qsd:  every selected export, from one command line (`server_args`)
  * qemu-nbd:     file only: `qemu-nbd -f raw -x file -t --shared=8 --cache=writeback
                  --aio=io_uring` (multi-conn is advertised when --shared > 1)
  * nbdkit-file:  file only: `nbdkit file file=FILE` with the plugin's defaults
                  (cache=default, fadvise=normal, thread model parallel, 16 threads)
  * nbdkit-null:  null only: `nbdkit null size=SIZE`, the protocol's ceiling

Figures per transport, export and server (all higher-is-better):

  * seq write --flush: `nbdcopy --flush --connections=2 --requests=64 SRC URI`, SRC a SIZE file
                       of random bytes, MiB/s
  * seq write:         the same without --flush (the data may still be dirty in the page cache)
  * seq read:          `nbdcopy --no-extents --connections=2 --requests=64 URI null:` (every byte
                       read: the null exports report all zero, which nbdcopy would skip)
  * fio 4k randread and randwrite, QD1 and QD32 (nbd engine, RUNTIME s after 1 s ramp), IOPS

With each figure, the server's CPU seconds per GiB moved: utime+stime of the server process from
/proc/PID/stat (all its threads, in 1/SC_CLK_TCK s ticks) read just before and after the client
ran, divided by the GiB the client moved: SIZE for nbdcopy; for fio its io_bytes over the
measured runtime, scaled up by (runtime + 1 s ramp) / runtime, since the CPU reading includes the
ramp. For the quorum3-nbd exports the three replicas' CPU is measured the same way and reported
separately (it is not in the server's figure).

REPS repetitions (argument, default 4: even, since position effects biased odd counts before);
within each repetition every transport and every server runs once, the order of both reversed
every other repetition; `sync` before every figure so no figure pays for another's write-back.
Ratios are taken within one repetition (ballot / qsd; for file ballot / the better of qemu-nbd
and nbdkit-file in that repetition; for null ballot / nbdkit-null), then min/median/max.

Writes reports/bench.md (or $BENCH_OUT): per transport and export each server's median (min-max)
and the ratios; the CPU s/GiB tables with the ratio ballot quorum3-* / ballot file for seq read;
each server's peak RSS; the issue 21 targets with their verdicts. Everything from the line
`## Profile` on in an existing report is kept: that part is written by hand.

Usage: scripts/bench.sh [REPS] (the wrapper builds the release binary first).
Environment: BENCH_BYTES (export size, default 1 GiB), BENCH_FIO_SECONDS (default 5),
BENCH_EXPORTS, BENCH_TRANSPORTS (comma lists), BENCH_OUT. Only the standard library; peers from
Debian: qemu-utils (qemu-storage-daemon, qemu-nbd), libnbd-bin (nbdcopy), nbdkit, fio. Servers
bind only 127.0.0.1 or unix sockets in a temporary directory; everything started is stopped and
the directory removed at the end, also on error, Ctrl-C or SIGTERM.
"""

import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import fio_job, free_port, stop, version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.path.join(ROOT, "target", "release", "ballot")
GIB = 1 << 30
MIB = 1 << 20
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 4
RUNTIME = int(os.environ.get("BENCH_FIO_SECONDS", "5"))
RAMP = 1  # benchlib.fio_job's --ramp_time
SIZE = int(os.environ.get("BENCH_BYTES", str(GIB)))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "reports", "bench.md"))
PROFILE_MARK = "## Profile"
CLK_TCK = os.sysconf("SC_CLK_TCK")

ALL_EXPORTS = ["quorum3-file", "quorum3-nbd-nbdkit", "quorum3-nbd-ballot", "file", "null"]
QUORUM_EXPORTS = ["quorum3-file", "quorum3-nbd-nbdkit", "quorum3-nbd-ballot"]
NBD_REPLICATED = ["quorum3-nbd-nbdkit", "quorum3-nbd-ballot"]
ALL_TRANSPORTS = ["unix", "tcp"]

# Which exports each server serves; ballot and qsd are the servers under test.
SERVER_EXPORTS = {
    "ballot": ALL_EXPORTS,
    "qsd": ALL_EXPORTS,
    "qemu-nbd": ["file"],
    "nbdkit-file": ["file"],
    "nbdkit-null": ["null"],
}
# The references an export's ballot figure is also divided by (the better one per repetition).
REFERENCES = {"file": ["qemu-nbd", "nbdkit-file"], "null": ["nbdkit-null"]}
QEMU_NBD_OPTS = ["--shared=8", "--cache=writeback", "--aio=io_uring"]

WRITE_FLUSH = "seq write --flush MiB/s"
WRITE = "seq write MiB/s"
READ = "seq read MiB/s"
FIGURES = [
    (WRITE_FLUSH, ("write", True)),
    (WRITE, ("write", False)),
    (READ, ("read",)),
    ("4k randread QD1 IOPS", ("fio", "randread", 1)),
    ("4k randread QD32 IOPS", ("fio", "randread", 32)),
    ("4k randwrite QD1 IOPS", ("fio", "randwrite", 1)),
    ("4k randwrite QD32 IOPS", ("fio", "randwrite", 32)),
]
FIGURE_NAMES = [f for f, _ in FIGURES]

# Issue 21's targets on ballot / qsd: (exports, transports or None for all, figures, at least).
QSD_TARGETS = [
    (NBD_REPLICATED, None, [WRITE_FLUSH, WRITE, READ], 1.5),
    (NBD_REPLICATED, None, ["4k randread QD32 IOPS", "4k randwrite QD32 IOPS"], 2.0),
    (["quorum3-file"], ["tcp"], [WRITE], 1.3),
]
# ... on ballot / reference (best of the references), every figure.
REF_TARGETS = {"file": 1.0, "null": 0.9}
# ... on ballot's CPU per GiB of seq read, a quorum3 export against the single file, at most.
CPU_TARGET = 1.5


def env_list(var, known, aliases=None):
    """A comma list from the environment (default: all of `known`), aliases expanded."""
    raw = os.environ.get(var)
    items = [x.strip() for x in raw.split(",") if x.strip()] if raw else list(known)
    out = []
    for x in items:
        for y in (aliases or {}).get(x, [x]):
            if y not in known:
                raise SystemExit(f"{var}: unknown value {y!r} (known: {', '.join(known)})")
            if y not in out:
                out.append(y)
    return [k for k in known if k in out]


EXPORTS = env_list("BENCH_EXPORTS", ALL_EXPORTS, {"quorum3-nbd": NBD_REPLICATED})
TRANSPORTS = env_list("BENCH_TRANSPORTS", ALL_TRANSPORTS)
SERVERS = [s for s in SERVER_EXPORTS if any(e in EXPORTS for e in SERVER_EXPORTS[s])]


# ---------------------------------------------------------------------------------------------
# Processes


class Setup:
    """The run's temporary directory, source file, replicas and every process started."""

    def __init__(self, d):
        self.d = d
        self.src = os.path.join(d, "src.bin")
        self.replicas = {}  # export -> [(Popen, socket path)]
        self.live = []  # every Popen started, for the final clean-up

    def spawn(self, cmd, what):
        log = open(os.path.join(self.d, f"{what}.log"), "ab")
        try:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=log)
        finally:
            log.close()
        self.live.append(p)
        return p

    def stop(self, p):
        if p.poll() is None:
            stop(p)
        if p in self.live:
            self.live.remove(p)

    def stop_all(self):
        for p in list(self.live):
            self.stop(p)

    def log_tail(self, what):
        try:
            with open(os.path.join(self.d, f"{what}.log"), errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""


def wait_ready(setup, p, listen, what):
    """Waits up to 20 s until the server accepts connections at `listen` (a unix socket path
    or a TCP port on 127.0.0.1); fails with its log if it exits or does not come up."""
    deadline = time.time() + 20
    while True:
        try:
            if isinstance(listen, int):
                socket.create_connection(("127.0.0.1", listen), 0.2).close()
                return
            if os.path.exists(listen):
                return
        except OSError:
            pass
        if p.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{what} did not start: {setup.log_tail(what)}")
        time.sleep(0.02)


def cpu_seconds(pids):
    """utime + stime of the processes (all their threads, live and exited), seconds."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / CLK_TCK


def peak_rss_mib(p):
    try:
        with open(f"/proc/{p.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def replica_blockdevs(prefix, quorum, exp, socks):
    args = [f"--blockdev=driver=nbd,node-name={prefix}{i},server.type=unix,server.path={s}"
            f"{',export=' + exp if exp else ''}" for i, s in enumerate(socks)]
    children = ",".join(f'"{prefix}{i}"' for i in range(len(socks)))
    args.append(f'--blockdev={{"driver":"quorum","node-name":"{quorum}","vote-threshold":2,'
                f'"children":[{children}]}}')
    return args


def server_args(d, listen, replicas):
    """The command line of both servers under test (qemu-storage-daemon's syntax, which
    `ballot serve` takes unchanged): every selected export, listening on `listen`."""
    args = []
    if "quorum3-file" in EXPORTS:
        for i, f in enumerate(["a.raw", "b.raw", "c.raw"]):
            args.append(f"--blockdev=driver=file,node-name=f{i},filename={d}/{f}")
        args.append('--blockdev={"driver":"quorum","node-name":"qf","vote-threshold":2,'
                    '"children":["f0","f1","f2"]}')
    if "quorum3-nbd-nbdkit" in EXPORTS:
        args += replica_blockdevs("n", "qn", "", replicas["quorum3-nbd-nbdkit"])
    if "quorum3-nbd-ballot" in EXPORTS:
        args += replica_blockdevs("m", "qm", "r", replicas["quorum3-nbd-ballot"])
    if "file" in EXPORTS:
        args.append(f"--blockdev=driver=file,node-name=s0,filename={d}/single.raw")
    if "null" in EXPORTS:
        args.append(f"--blockdev=driver=null-co,node-name=z0,size={SIZE},read-zeroes=on")
    if isinstance(listen, int):
        args.append(f"--nbd-server=addr.type=inet,addr.host=127.0.0.1,addr.port={listen}")
    else:
        args.append(f"--nbd-server=addr.type=unix,addr.path={listen}")
    nodes = {"quorum3-file": "qf", "quorum3-nbd-nbdkit": "qn", "quorum3-nbd-ballot": "qm",
             "file": "s0", "null": "z0"}
    for i, name in enumerate(EXPORTS):
        args.append(f"--export=type=nbd,id=e{i},node-name={nodes[name]},name={name},"
                    "writable=on")
    return args


def server_cmd(kind, d, listen, replicas):
    """The command line of server `kind` listening on `listen` (unix path or TCP port)."""
    tcp = isinstance(listen, int)
    if kind in ("ballot", "qsd"):
        exe = [BALLOT, "serve"] if kind == "ballot" else ["qemu-storage-daemon"]
        return exe + server_args(d, listen, replicas)
    if kind == "qemu-nbd":
        where = ["-b", "127.0.0.1", "-p", str(listen)] if tcp else ["-k", listen]
        return ["qemu-nbd", "-f", "raw", "-x", "file", "-t", *where, *QEMU_NBD_OPTS,
                f"{d}/single.raw"]
    where = ["-i", "127.0.0.1", "-p", str(listen)] if tcp else ["--unix", listen]
    nbdkit = ["nbdkit", "--foreground", "--exit-with-parent", *where]
    if kind == "nbdkit-file":
        return nbdkit + ["file", f"file={d}/single.raw"]
    if kind == "nbdkit-null":
        return nbdkit + ["null", f"size={SIZE}"]
    raise ValueError(kind)


class Server:
    def __init__(self, setup, kind, transport):
        self.kind = kind
        self.what = f"{kind}-{transport}"
        if transport == "tcp":
            self.listen = free_port()
        else:
            self.listen = os.path.join(setup.d, f"{self.what}.sock")
            if os.path.exists(self.listen):
                os.unlink(self.listen)
        replicas = {e: [s for _, s in r] for e, r in setup.replicas.items()}
        self.p = setup.spawn(server_cmd(kind, setup.d, self.listen, replicas), self.what)
        wait_ready(setup, self.p, self.listen, self.what)

    def uri(self, name):
        if isinstance(self.listen, int):
            return f"nbd://127.0.0.1:{self.listen}/{name}"
        return f"nbd+unix:///{name}?socket={self.listen}"


def unix_uri(sock, name=""):
    return f"nbd+unix:///{name}?socket={sock}"


def start_replicas(setup):
    """The three nbdkit memory and/or three `ballot serve` replicas, filled with the source."""
    d = setup.d
    if "quorum3-nbd-nbdkit" in EXPORTS:
        reps = []
        for i in range(3):
            s = os.path.join(d, f"nbdkit-replica{i}.sock")
            p = setup.spawn(["nbdkit", "--foreground", "--exit-with-parent", "--unix", s,
                             "memory", f"size={SIZE}"], f"nbdkit-replica{i}")
            wait_ready(setup, p, s, f"nbdkit-replica{i}")
            reps.append((p, s))
            nbdcopy(["--connections=2", "--requests=64", setup.src, unix_uri(s)])
        setup.replicas["quorum3-nbd-nbdkit"] = reps
    if "quorum3-nbd-ballot" in EXPORTS:
        reps = []
        for i in range(3):
            s = os.path.join(d, f"ballot-replica{i}.sock")
            p = setup.spawn([BALLOT, "serve",
                             f"--blockdev=driver=file,node-name=f,filename={d}/r{i}.raw",
                             f"--nbd-server=addr.type=unix,addr.path={s}",
                             "--export=type=nbd,id=e,node-name=f,name=r,writable=on"],
                            f"ballot-replica{i}")
            wait_ready(setup, p, s, f"ballot-replica{i}")
            reps.append((p, s))
        setup.replicas["quorum3-nbd-ballot"] = reps


def make_files(setup):
    """The source of random bytes, and every file an export reads, each a full copy of it, so
    no server pays for the file system's first allocation of blocks another only overwrites."""
    with open(setup.src, "wb") as fh:
        left = SIZE
        while left:
            n = min(left, 16 * MIB)
            fh.write(os.urandom(n))
            left -= n
    files = []
    if "quorum3-file" in EXPORTS:
        files += ["a.raw", "b.raw", "c.raw"]
    if "quorum3-nbd-ballot" in EXPORTS:
        files += ["r0.raw", "r1.raw", "r2.raw"]
    if "file" in EXPORTS:
        files += ["single.raw"]
    for f in files:
        shutil.copyfile(setup.src, os.path.join(setup.d, f))


# ---------------------------------------------------------------------------------------------
# Clients


def settle():
    """Writes back what earlier figures left dirty, so no figure pays for another's writeback."""
    os.sync()


def nbdcopy(args):
    r = subprocess.run(["nbdcopy", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise SystemExit(f"nbdcopy {' '.join(args)} failed: {r.stderr.decode()}")


def run_client(spec, u, setup):
    """Runs one figure's client against `u`: returns (figure value, GiB moved)."""
    if spec[0] == "fio":
        _, rw, qd = spec
        j = fio_job(os.path.join(setup.d, "fio.json"), u,
                    [f"--name={rw}", f"--rw={rw}", "--bs=4k", f"--iodepth={qd}",
                     f"--size={SIZE}", f"--runtime={RUNTIME}"], what=f"fio {rw} QD{qd} on {u}")
        r = j["read" if rw == "randread" else "write"]
        ms = max(r["runtime"], 1)
        return r["iops"], r["io_bytes"] * (ms + RAMP * 1000) / ms / GIB
    if spec[0] == "write":
        flush = ["--flush"] if spec[1] else []
        args = [*flush, "--connections=2", "--requests=64", setup.src, u]
    else:
        args = ["--no-extents", "--connections=2", "--requests=64", u, "null:"]
    t = time.perf_counter()
    nbdcopy(args)
    return SIZE / (time.perf_counter() - t) / MIB, SIZE / GIB


class Results:
    """Per (transport, export, figure): server -> values in repetition order, for the figure,
    the server's CPU s/GiB and (quorum3-nbd exports) the replicas' CPU s/GiB."""

    def __init__(self):
        self.value, self.cpu, self.replica_cpu, self.rss = {}, {}, {}, {}

    @staticmethod
    def _add(table, key, kind, v):
        table.setdefault(key, {}).setdefault(kind, []).append(v)

    def add(self, key, kind, value, cpu, replica_cpu):
        self._add(self.value, key, kind, value)
        self._add(self.cpu, key, kind, cpu)
        if replica_cpu is not None:
            self._add(self.replica_cpu, key, kind, replica_cpu)


def run_export(server, transport, name, setup, res):
    u = server.uri(name)
    replica_pids = [p.pid for p, _ in setup.replicas.get(name, [])]
    for fig, spec in FIGURES:
        settle()
        c0, r0 = cpu_seconds([server.p.pid]), cpu_seconds(replica_pids)
        value, gib = run_client(spec, u, setup)
        c1, r1 = cpu_seconds([server.p.pid]), cpu_seconds(replica_pids)
        gib = max(gib, 1e-9)
        res.add((transport, name, fig), server.kind, value, (c1 - c0) / gib,
                (r1 - r0) / gib if replica_pids else None)


def one_round(kind, transport, setup, res):
    """Starts server `kind` on `transport`, measures all its selected exports, stops it."""
    server = Server(setup, kind, transport)
    try:
        for name in EXPORTS:
            if name in SERVER_EXPORTS[kind]:
                run_export(server, transport, name, setup, res)
        res.rss.setdefault(kind, []).append(peak_rss_mib(server.p))
    finally:
        setup.stop(server.p)


def check_tools():
    for tool in ["qemu-storage-daemon", "qemu-nbd", "nbdcopy", "nbdkit", "fio"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not installed "
                             "(apt-get install qemu-utils libnbd-bin nbdkit fio)")
    if not os.path.exists(BALLOT):
        raise SystemExit(f"{BALLOT} missing: run scripts/bench.sh")
    if REPS < 1:
        raise SystemExit("REPS must be at least 1")


def on_sigterm(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def main():
    check_tools()
    signal.signal(signal.SIGTERM, on_sigterm)
    setup = Setup(tempfile.mkdtemp(prefix="ballot-bench-"))
    try:
        make_files(setup)
        start_replicas(setup)
        res = Results()
        started = time.time()
        for rep in range(REPS):
            flip = rep % 2 == 1
            for transport in TRANSPORTS[::-1] if flip else TRANSPORTS:
                for kind in SERVERS[::-1] if flip else SERVERS:
                    one_round(kind, transport, setup, res)
                    print(f"rep {rep + 1}/{REPS} {transport} {kind} done "
                          f"({time.time() - started:.0f} s)", file=sys.stderr, flush=True)
        write_report(res, time.time() - started)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        setup.stop_all()
        shutil.rmtree(setup.d, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Report


def fmt(v):
    return f"{v:,.0f}"


def cell(values, f=fmt):
    """median (min-max), the median bold."""
    return f"**{f(statistics.median(values))}** ({f(min(values))}–{f(max(values))})"


def bare(fig):
    """A figure's name without its unit."""
    return fig.rsplit(" ", 1)[0]


def ratio_cell(values):
    return cell(values, lambda v: f"{v:.2f}")


def ratios(res, key, over):
    """ballot / `over` within each repetition; `over` a list of servers: their best."""
    by = res.value[key]
    refs = zip(*(by[s] for s in over))
    return [b / max(r) for b, r in zip(by["ballot"], refs)]


def cpu_ratios(res, transport, quorum):
    """ballot's CPU s/GiB of seq read, quorum export / single file, within each repetition."""
    q = res.cpu[(transport, quorum, READ)]["ballot"]
    f = res.cpu[(transport, "file", READ)]["ballot"]
    return [a / b if b else float("nan") for a, b in zip(q, f)]


def kept_profile_section():
    try:
        with open(OUT) as f:
            text = f.read()
    except OSError:
        return None
    i = text.find("\n" + PROFILE_MARK)
    return text[i + 1:] if i >= 0 else None


def plugin_thread_model(plugin):
    out = subprocess.run(["nbdkit", "--dump-plugin", plugin], capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        if line.startswith("thread_model="):
            return line.split("=", 1)[1]
    return "?"


def header_lines(wall):
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    example = {e: [f"DIR/{'nbdkit' if e.endswith('nbdkit') else 'ballot'}-replica{i}.sock"
                   for i in range(3)] for e in NBD_REPLICATED}
    cmd = " ".join(server_cmd("qsd", "DIR", "DIR/SERVER.sock", example)[1:])
    lines = [
        "# `ballot serve` vs qemu-storage-daemon, qemu-nbd and nbdkit",
        "",
        "Written by `scripts/bench.sh` (issue 7 item 2, issue 21 items 1-2; NBD.md §9). The same",
        "command line for ballot and qemu-storage-daemon (qsd), the same clients, one run; within",
        "each repetition every transport and every server runs once, the order reversed every",
        f"other repetition. {REPS} repetition{'s' if REPS != 1 else ''}; exports of"
        f" {SIZE // MIB} MiB. The files sit in the",
        "page cache and start fully written (a copy of the source), so this measures the servers'",
        "CPU and protocol path, not a disk; `sync` runs before every figure.",
        "",
        f"- commit {commit}{' (with uncommitted changes)' if dirty else ''}; "
        f"{os.cpu_count()} cores; {platform.platform()}",
        f"- {version([BALLOT, '--version'])}; {version(['qemu-storage-daemon', '--version'])};"
        f" {version(['qemu-nbd', '--version'])}; {version(['nbdkit', '--version'])};"
        f" {version(['nbdcopy', '--version'])}; {version(['fio', '--version'])}",
        f"- transports: {', '.join(TRANSPORTS)} (unix: a socket in the run's temporary"
        " directory; tcp: 127.0.0.1, a free port per server start); the NBD replicas are always"
        " on unix sockets",
        f"- ballot and qsd, every export: `{cmd}` (over TCP `--nbd-server="
        "addr.type=inet,addr.host=127.0.0.1,addr.port=PORT`)",
        "- quorum3-nbd-nbdkit replicas: three `nbdkit memory size=SIZE`; quorum3-nbd-ballot"
        " replicas: three `ballot serve --blockdev=driver=file,node-name=f,filename=DIR/rI.raw"
        " --nbd-server=addr.type=unix,addr.path=SOCK"
        " --export=type=nbd,id=e,node-name=f,name=r,writable=on`; both sets shared by every"
        " server and transport",
        f"- file references: `qemu-nbd -f raw -x file -t {' '.join(QEMU_NBD_OPTS)} -k SOCK"
        " DIR/single.raw` (over TCP `-b 127.0.0.1 -p PORT`): --shared above 1 so that it"
        " advertises multi-conn and nbdcopy opens its two connections, the page cache"
        " (writeback) and io_uring, which completes reads of cached pages without a thread"
        " hand-off (aio=threads, its default, was not measured against it);"
        " `nbdkit --foreground --unix SOCK file file=DIR/single.raw` (over TCP"
        " `-i 127.0.0.1 -p PORT`) with the plugin's defaults: cache=default (page cache),"
        f" fadvise=normal, thread model {plugin_thread_model('file')}, 16 threads, multi-conn",
        f"- null reference: `nbdkit --unix SOCK null size={SIZE}` (thread model"
        f" {plugin_thread_model('null')}), the protocol's ceiling",
        "- seq write --flush: `nbdcopy --flush --connections=2 --requests=64 SRC URI`; seq write:"
        " the same without --flush; seq read: `nbdcopy --no-extents --connections=2"
        " --requests=64 URI null:` (--no-extents: every byte is read, also from the null exports,"
        " which report all zero); 4k random: fio nbd engine, QD1 and QD32,"
        f" {RUNTIME} s after {RAMP} s ramp",
        f"- wall time {wall:.0f} s",
        "",
        "Cells: median (min–max) over the repetitions. Ratios are taken within one repetition,"
        " then median (min–max): ballot / qsd; for file ballot / the better of qemu-nbd and"
        " nbdkit-file in that repetition; for null ballot / nbdkit-null. Every figure is"
        " higher-is-better.",
        "",
    ]
    return lines


def throughput_lines(res):
    lines = []
    for t in TRANSPORTS:
        lines += [f"## Throughput over {t}", ""]
        for name in EXPORTS:
            refs = REFERENCES.get(name, [])
            cols = ["ballot", "qsd", *refs]
            ref_col = ([f"ballot / {'best of ' + ' and '.join(refs) if len(refs) > 1 else refs[0]}"]
                       if refs else [])
            lines += [f"### {t}: {name}", "",
                      "| " + " | ".join(["figure", *cols, "ballot / qsd", *ref_col]) + " |",
                      "|---|" + "---:|" * (len(cols) + 1 + len(ref_col))]
            for fig in FIGURE_NAMES:
                key = (t, name, fig)
                row = [cell(res.value[key][s]) for s in cols]
                row.append(ratio_cell(ratios(res, key, ["qsd"])))
                if refs:
                    row.append(ratio_cell(ratios(res, key, refs)))
                lines.append(f"| {fig} | " + " | ".join(row) + " |")
            lines.append("")
    return lines


def cpu_lines(res):
    lines = [
        "## Server CPU seconds per GiB served",
        "",
        "utime + stime of the server process (all threads; /proc/PID/stat, 1/"
        f"{CLK_TCK} s ticks) over the client's run, divided by the GiB it moved (nbdcopy: the"
        " export's size; fio: io_bytes scaled by (runtime + ramp) / runtime); median over the"
        " repetitions, lower is better. For the quorum3-nbd exports the three replicas' CPU is"
        " not in the server's figure; it is given separately as \"+R rep.\", the replicas"
        " together per GiB the client moved.",
        "",
    ]
    servers = SERVERS
    for t in TRANSPORTS:
        lines += [f"### {t}", "", "| export | figure | " + " | ".join(servers) + " |",
                  "|---|---|" + "---:|" * len(servers)]
        for name in EXPORTS:
            for fig in FIGURE_NAMES:
                key = (t, name, fig)
                row = []
                for s in servers:
                    v = res.cpu[key].get(s)
                    if not v:
                        row.append("")
                        continue
                    text = f"{statistics.median(v):.3f}"
                    rv = res.replica_cpu.get(key, {}).get(s)
                    if rv:
                        text += f" (+{statistics.median(rv):.3f} rep.)"
                    row.append(text)
                lines.append(f"| {name} | {bare(fig)} | " + " | ".join(row) + " |")
        lines.append("")
    if "file" in EXPORTS and any(q in EXPORTS for q in QUORUM_EXPORTS):
        lines += ["Seq read, CPU per GiB of a quorum3 export / that of the single file, within"
                  " each repetition (replicas not included):", "",
                  "| transport | export | ballot | qsd |", "|---|---|---:|---:|"]
        for t in TRANSPORTS:
            for q in QUORUM_EXPORTS:
                if q not in EXPORTS:
                    continue
                qs = res.cpu[(t, q, READ)]["qsd"]
                fs = res.cpu[(t, "file", READ)]["qsd"]
                qsd = [a / b if b else float("nan") for a, b in zip(qs, fs)]
                lines.append(f"| {t} | {q} | {ratio_cell(cpu_ratios(res, t, q))} | "
                             f"{ratio_cell(qsd)} |")
        lines.append("")
    return lines


def rss_lines(res):
    lines = ["Peak resident memory of the server process over one start (all its exports, one"
             " transport), MiB:", "", "| server | exports | min | median | max |",
             "|---|---|---:|---:|---:|"]
    for kind in SERVERS:
        v = res.rss.get(kind, [])
        if v:
            ex = ", ".join(e for e in EXPORTS if e in SERVER_EXPORTS[kind])
            lines.append(f"| {kind} | {ex} | {min(v):.0f} | {statistics.median(v):.0f} | "
                         f"{max(v):.0f} |")
    return lines + [""]


def verdict(got, want, at_most=False):
    ok = got <= want if at_most else got >= want
    return "met" if ok else "**not met**"


def target_lines(res):
    rows = []
    for exports, transports, figs, want in QSD_TARGETS:
        for name in exports:
            for t in TRANSPORTS:
                if name not in EXPORTS or (transports and t not in transports):
                    continue
                for fig in figs:
                    got = statistics.median(ratios(res, (t, name, fig), ["qsd"]))
                    rows.append((f"{name} {fig}: ballot ≥ {want}× qsd", t, f"{got:.2f}×",
                                 verdict(got, want)))
    for name, want in REF_TARGETS.items():
        if name not in EXPORTS:
            continue
        refs = REFERENCES[name]
        who = "best of " + " and ".join(refs) if len(refs) > 1 else refs[0]
        for t in TRANSPORTS:
            for fig in FIGURE_NAMES:
                got = statistics.median(ratios(res, (t, name, fig), refs))
                rows.append((f"{name} {fig}: ballot ≥ {want}× {who}", t, f"{got:.2f}×",
                             verdict(got, want)))
    if "file" in EXPORTS:
        for q in QUORUM_EXPORTS:
            if q not in EXPORTS:
                continue
            for t in TRANSPORTS:
                got = statistics.median(cpu_ratios(res, t, q))
                note = " (replicas not included)" if q in NBD_REPLICATED else ""
                rows.append((f"ballot CPU/GiB of {q} seq read ≤ {CPU_TARGET}× that of file{note}",
                             t, f"{got:.2f}×", verdict(got, CPU_TARGET, at_most=True)))
    met = sum(1 for r in rows if r[3] == "met")
    lines = ["## Targets (issue 21)", "",
             f"{met} of {len(rows)} met. Measured: the median of the per-repetition ratios.", "",
             "| target | transport | measured | verdict |", "|---|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return lines + [""]


def write_report(res, wall):
    lines = header_lines(wall) + throughput_lines(res) + cpu_lines(res) + rss_lines(res)
    lines += target_lines(res)
    kept = kept_profile_section()
    if kept:
        lines += [kept.rstrip("\n"), ""]
    os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
    with open(OUT, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
