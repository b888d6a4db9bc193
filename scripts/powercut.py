#!/usr/bin/env python3
"""Power-cut campaign (HEALING.md §5, issue #18): ext4 over a quorum of three NBD replicas that
lose their unflushed writes when killed, everything killed at a random instant, restarted,
checked. Writes reports/powercut.md.

Stack, per mode (all servers on unix sockets in a temp dir under /tmp):

    nbdkit --foreground --unix rI.sock --filter=cache file rI.img cache=writeback   (I = 0, 1, 2)
    quorum server on q.sock exporting node `q` (vote-threshold 2 over r0, r1, r2):
        ballot      `ballot serve` with three driver=nbd children
        ballot-md   the same plus a metadata node (`ballot metadata create`, "metadata":"meta")
        qsd         qemu-storage-daemon with the same --blockdev/--nbd-server/--export line
    nbdfuse FUSE/nbd nbd+unix:///q?socket=q.sock ; losetup --find --show FUSE/nbd ;
    mkfs.ext4 once per campaign ; mount

A writer (this script run with --writer, a subprocess) loops over steps: create a file of
pseudo-random content (4 KiB - 1 MiB), overwrite a range of one or append to one, rename one,
delete one; fsyncs the file and the directory, and only then appends the step's acknowledgement
to a log on the host (outside the ext4), fsynced. At a uniformly random instant 0.5-4 s into the
writing the three nbdkit replicas and the quorum server get SIGKILL together (one killpg(2) on
the process group they share). Teardown: writer killed, `umount -l` the ext4, `losetup -d`, unmount the FUSE mount,
nbdfuse waited for. Then the same processes are restarted with the same command lines, nbdfuse
and losetup again, and:

    mount (replays the journal) -> every acknowledged file checked (SHA-256 of its newest
    acknowledged version) -> umount -> e2fsck -fn (exit 0 = clean) -> [ballot-md: wait until
    query-jobs has no running job and x-query-quorum-out-of-sync says every child in-sync]
    -> the three replicas read through their own nbdkit and compared per 64 KiB granule
    -> mount again, the writer continues with new step numbers (next cut).

The step that was in flight at the cut (begun, never acknowledged) may be applied, not applied
or partly applied; its file is checked against "old or new" where that is decidable, then the
state found is recorded in the log ("adopt") and the writer carries on from it.

Usage: scripts/powercut.py [--cuts N] [--modes ballot,ballot-md,qsd] [--out FILE]
                           [--size BYTES] [--seed S] [--keep]
Environment: BALLOT_BIN (default target/release/ballot). Needs root, /dev/fuse, loop devices,
nbdkit (cache filter), nbdfuse, nbdcopy (or python3 `nbd`), losetup, mkfs.ext4, e2fsck, mount,
umount, qemu-storage-daemon (qsd mode). Exit 77 when something is missing (printed), 1 when an
acknowledged step was lost, e2fsck failed or a campaign aborted in a ballot mode, or ballot-md
left replicas differing after its recovery; qsd's figures are reported, never a failure.
"""
import argparse
import atexit
import datetime
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Qmp, version  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.environ.get("BALLOT_BIN", os.path.join(ROOT, "target", "release", "ballot"))
MIB = 1 << 20
GRANULE = 64 * 1024
CHUNK = 4 * MIB
MODES = ("ballot", "ballot-md", "qsd")
CUT_MIN_S, CUT_MAX_S = 0.5, 4.0
RECOVERY_TIMEOUT_S = 120
MAX_FILE = 4 * MIB


def log(msg):
    print(f"[powercut {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------
# The acknowledgement log: JSON lines on the host. {"step":N,"op":...} is written (and fsynced)
# before step N touches the ext4, {"ack":N} after its file and directory fsyncs returned;
# {"adopt":{name: sha|null}} is the checker's record of what it found for files whose state is
# not fixed by an acknowledgement (the step in flight at a cut, losses); {"cut":K} marks a cut.


def content(seed, step, n):
    return hashlib.shake_256(f"{seed}:{step}".encode()).digest(n)


def sha(b):
    return hashlib.sha256(b).hexdigest()


def replay(path):
    """{"model","pending","next","acked","removed"}: model maps a file name to {"sha","size",
    "step"} for its newest acknowledged (or adopted) version; pending is the begun,
    unacknowledged step; removed maps a name an acknowledged delete or rename took away to
    that step."""
    model, pending, next_step, acked, removed = {}, None, 1, 0, {}
    if not os.path.exists(path):
        return {"model": model, "pending": pending, "next": next_step, "acked": acked, "removed": removed}
    with open(path, "rb") as f:
        data = f.read()
    for line in data.split(b"\n"):
        if not line:
            continue
        r = json.loads(line)
        if "op" in r:
            pending = r
            next_step = max(next_step, r["step"] + 1)
        elif "ack" in r:
            if pending is None or pending["step"] != r["ack"]:
                raise SystemExit(f"{path}: ack {r['ack']} without its step")
            p, pending = pending, None
            acked += 1
            if p["op"] in ("create", "overwrite", "append"):
                model[p["name"]] = {"sha": p["sha"], "size": p["size"], "step": p["step"]}
            elif p["op"] == "rename":
                model[p["to"]] = model.pop(p["name"])
                removed[p["name"]] = p["step"]
            elif p["op"] == "delete":
                model.pop(p["name"], None)
                removed[p["name"]] = p["step"]
        elif "adopt" in r:
            pending = None
            for name, v in r["adopt"].items():
                if v is None:
                    model.pop(name, None)
                else:
                    model[name] = {"sha": v["sha"], "size": v["size"], "step": f"adopted@cut{r['cut']}"}
    return {"model": model, "pending": pending, "next": next_step, "acked": acked, "removed": removed}


def fix_tail(path):
    """Drops a torn last line (the writer was killed while appending it)."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())


def append_record(path, rec):
    with open(path, "ab") as f:
        f.write((json.dumps(rec) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# The writer (a subprocess: `powercut.py --writer FS ACKLOG SEED BUDGET`).


def writer_main(fs, acklog, seed, budget):
    st = replay(acklog)
    model, pending, step = st["model"], st["pending"], st["next"]
    if pending is not None:
        raise SystemExit("writer: the log has an unresolved step in flight")
    logf = open(acklog, "ab")

    def rec(obj):
        logf.write((json.dumps(obj) + "\n").encode())
        logf.flush()
        os.fsync(logf.fileno())

    rng = random.Random(f"{seed}/writer/{step}")
    dfd = os.open(fs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        while True:
            names = sorted(model)
            total = sum(e["size"] for e in model.values())
            r = rng.random()
            if names and total > budget:
                op = "delete"
            elif not names or r < 0.5:
                op = "create"
            elif r < 0.65:
                op = "overwrite"
            elif r < 0.80:
                op = "append"
            elif r < 0.92:
                op = "rename"
            else:
                op = "delete"
            n = int(4096 * 256 ** rng.random())
            data = content(seed, step, n)
            name = f"step-{step}" if op == "create" else rng.choice(names)
            if op == "append" and model[name]["size"] + n > MAX_FILE:
                op = "overwrite"
            r = {"step": step, "op": op, "name": name}
            old = None
            if op in ("overwrite", "append"):
                with open(os.path.join(fs, name), "rb") as f:
                    old = f.read()
                if sha(old) != model[name]["sha"]:
                    rec({"anomaly": f"step {step}: {name} does not hold its recorded content "
                                    "before being modified"})
                    sys.exit(3)
                off = len(old) if op == "append" else rng.randrange(0, len(old) + 1)
                new = old[:off] + data + old[off + n:]
                r.update(old=model[name]["sha"], off=off, len=n, sha=sha(new), size=len(new))
            elif op == "create":
                r.update(sha=sha(data), size=n)
            elif op == "rename":
                r.update(to=f"step-{step}", sha=model[name]["sha"])
            else:
                r.update(sha=model[name]["sha"])
            rec(r)
            path = os.path.join(fs, name)
            if op in ("create", "overwrite", "append"):
                flags = os.O_WRONLY | (os.O_CREAT | os.O_EXCL if op == "create" else 0)
                fd = os.open(path, flags, 0o644)
                try:
                    pos = r["off"] if op != "create" else 0
                    view = memoryview(data)
                    while view:
                        w = os.pwrite(fd, view, pos)
                        view, pos = view[w:], pos + w
                    os.fsync(fd)
                finally:
                    os.close(fd)
                model[name] = {"sha": r["sha"], "size": r["size"], "step": step}
            elif op == "rename":
                os.rename(path, os.path.join(fs, r["to"]))
                model[r["to"]] = model.pop(name)
            else:
                os.unlink(path)
                model.pop(name)
            os.fsync(dfd)
            rec({"ack": step})
            step += 1
    except OSError as e:
        print(f"writer: step {step}: {e}", file=sys.stderr, flush=True)
        sys.exit(0)


# --------------------------------------------------------------------------------------------
# Processes, mounts and loop devices: every one is registered so that cleanup() (finally,
# atexit, SIGTERM/SIGHUP/SIGINT) leaves nothing mounted or running.

SETPRIV = shutil.which("setpriv")


def in_group(group):
    """Popen arguments putting the child in process group `group` (0: a new one)."""
    if sys.version_info >= (3, 11):
        return {"process_group": group}
    return {"preexec_fn": lambda: os.setpgid(0, group)}


def spawn(cmd, logpath, env=None, group=0):
    """Starts `cmd` in process group `group` (0: a new one; either way not the terminal's, so
    Ctrl-C reaches only this script), stdout and stderr appended to `logpath`; with setpriv it
    also dies if this script is SIGKILLed."""
    wrapped = [SETPRIV, "--pdeathsig", "KILL", "--"] + cmd if SETPRIV else cmd
    with open(logpath, "ab") as lf:
        lf.write(f"--- {time.strftime('%H:%M:%S')} {shlex.join(cmd)}\n".encode())
        lf.flush()
        return subprocess.Popen(wrapped, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, **in_group(group))


def tail(path, n=15):
    try:
        with open(path, "rb") as f:
            return "\n".join(f.read().decode(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def wait_path(path, p, what, logpath, timeout=20):
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if p.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"{what} did not start (exit {p.poll()}):\n{tail(logpath)}")
        time.sleep(0.01)


def run(cmd, timeout=120, check=False):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def kill_wait(p, sig=signal.SIGKILL, timeout=10):
    if p is None or p.poll() is not None:
        return
    try:
        os.kill(p.pid, sig)
    except ProcessLookupError:
        pass
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        if sig != signal.SIGKILL:
            kill_wait(p)


def is_mounted(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def loop_busy(dev):
    name = os.path.basename(dev)
    return os.path.exists(f"/sys/block/{name}/loop/backing_file")


ACTIVE = []


def cleanup_all():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for c in list(ACTIVE):
        c.cleanup()


def on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# --------------------------------------------------------------------------------------------
# One mode's campaign.


class Campaign:
    def __init__(self, mode, args):
        self.mode, self.args = mode, args
        self.size = args.size
        self.seed = f"{args.seed}/{mode}"
        self.rng = random.Random(self.seed)
        self.d = tempfile.mkdtemp(prefix=f"powercut-{mode}-", dir="/tmp")
        j = lambda *p: os.path.join(self.d, *p)  # noqa: E731
        self.imgs = [j(f"r{i}.img") for i in range(3)]
        self.socks = [j(f"r{i}.sock") for i in range(3)]
        self.pids = [j(f"r{i}.pid") for i in range(3)]
        self.qsock, self.qmp_path, self.meta = j("q.sock"), j("qmp.sock"), j("q.meta")
        self.fuse_dir, self.fs, self.ack = j("fuse"), j("fs"), j("ack.log")
        self.fuse_file, self.fuse_pid = os.path.join(self.fuse_dir, "nbd"), j("nbdfuse.pid")
        self.logs = j("logs")
        for p in (self.fuse_dir, self.fs, self.logs):
            os.mkdir(p)
        self.replicas, self.server, self.nbdfuse, self.writer = [], None, None, None
        self.qmp, self.loop, self.watch = None, None, None
        self.cuts, self.notes, self.aborted = [], [], None
        self.initial_sync_s = None
        self.budget = self.size // 8
        ACTIVE.append(self)

    # command lines ----------------------------------------------------------------------

    def replica_cmd(self, i):
        return ["nbdkit", "--foreground", "--unix", self.socks[i], "-P", self.pids[i],
                "--filter=cache", "file", self.imgs[i], "cache=writeback"]

    def server_cmd(self):
        q = {"driver": "quorum", "node-name": "q", "vote-threshold": 2, "children": ["r0", "r1", "r2"]}
        args = []
        for i in range(3):
            args += ["--blockdev", f"driver=nbd,node-name=r{i},server.type=unix,server.path={self.socks[i]}"]
        if self.mode == "ballot-md":
            args += ["--blockdev", f"driver=file,node-name=meta,filename={self.meta}"]
            q["metadata"] = "meta"
        args += ["--blockdev", json.dumps(q, separators=(",", ":")),
                 "--nbd-server", f"addr.type=unix,addr.path={self.qsock}",
                 "--export", "type=nbd,id=e,node-name=q,name=q,writable=on",
                 "--chardev", f"socket,path={self.qmp_path},server=on,wait=off,id=m0",
                 "--monitor", "chardev=m0"]
        if self.mode == "qsd":
            return ["qemu-storage-daemon"] + args
        return [BALLOT, "serve"] + args

    def nbdfuse_cmd(self):
        return ["nbdfuse", "-P", self.fuse_pid, self.fuse_file, f"nbd+unix:///q?socket={self.qsock}"]

    def commands(self):
        """The command lines, with this campaign's directory shown as $DIR."""
        cmds = [self.replica_cmd(0)]
        if self.mode == "ballot-md":
            cmds.append([BALLOT, "metadata", "create", self.meta, "--size", str(self.size),
                         "--children", "r0,r1,r2"])
        cmds += [self.server_cmd(), self.nbdfuse_cmd(), ["losetup", "--find", "--show", self.fuse_file],
                 ["mkfs.ext4"] + MKFS_OPTS + ["LOOP"], ["mount", "-t", "ext4", "LOOP", self.fs],
                 ["e2fsck", "-fn", "LOOP"]]
        return [shlex.join(c).replace(self.d, "$DIR") for c in cmds]

    # processes ----------------------------------------------------------------------------

    def start(self):
        """Replicas, then the quorum server (ready: its export socket exists and QMP answers).
        Returns the seconds from the first spawn to ready."""
        t0 = time.perf_counter()
        env = dict(os.environ, TMPDIR=self.d)
        self.replicas = []
        for i in range(3):
            for f in (self.socks[i], self.pids[i]):
                if os.path.exists(f):
                    os.unlink(f)
            # The four servers share one process group (r0's), so that the cut is one killpg(2).
            group = self.replicas[0].pid if self.replicas else 0
            self.replicas.append(spawn(self.replica_cmd(i), os.path.join(self.logs, f"r{i}.log"), env, group))
        for i, p in enumerate(self.replicas):
            wait_path(self.pids[i], p, f"nbdkit r{i}", os.path.join(self.logs, f"r{i}.log"))
        for f in (self.qsock, self.qmp_path):
            if os.path.exists(f):
                os.unlink(f)
        slog = os.path.join(self.logs, "server.log")
        self.server = spawn(self.server_cmd(), slog, group=self.replicas[0].pid)
        wait_path(self.qsock, self.server, f"{self.mode} server", slog)
        wait_path(self.qmp_path, self.server, f"{self.mode} QMP", slog)
        self.qmp = Qmp(self.qmp_path)
        return time.perf_counter() - t0, t0

    def start_watch(self, t0):
        """ballot-md: a thread polling QMP until no job runs and every child is in-sync."""
        self.watch = {"done": None, "error": None, "polls": 0, "jobs_seen": set(), "last": None}
        w, qmp = self.watch, self.qmp

        def poll():
            try:
                deadline = t0 + RECOVERY_TIMEOUT_S
                while time.perf_counter() < deadline:
                    jobs = qmp.cmd("query-jobs")
                    oos = qmp.cmd("x-query-quorum-out-of-sync", **{"node-name": "q"})
                    w["polls"] += 1
                    w["last"] = oos
                    for j in jobs:
                        w["jobs_seen"].add(f"{j.get('id')}:{j.get('type')}")
                    running = [j for j in jobs if j.get("status") not in ("concluded", "null")]
                    if not running and all(c.get("state") == "in-sync" for c in oos):
                        w["done"] = time.perf_counter() - t0
                        return
                    time.sleep(0.05)
                w["error"] = f"not recovered within {RECOVERY_TIMEOUT_S} s: {json.dumps(w['last'])[:600]}"
            except BaseException as e:  # noqa: BLE001 (SystemExit from Qmp included)
                w["error"] = f"QMP: {e}"

        w["thread"] = threading.Thread(target=poll, daemon=True)
        w["thread"].start()

    def wait_watch(self):
        self.watch["thread"].join(RECOVERY_TIMEOUT_S + 10)
        return self.watch

    def attach(self):
        """nbdfuse + a loop device on its file."""
        if os.path.exists(self.fuse_pid):
            os.unlink(self.fuse_pid)
        flog = os.path.join(self.logs, "nbdfuse.log")
        self.nbdfuse = spawn(self.nbdfuse_cmd(), flog)
        wait_path(self.fuse_pid, self.nbdfuse, "nbdfuse", flog)
        self.loop = run(["losetup", "--find", "--show", self.fuse_file], check=True).stdout.strip()
        run(["blockdev", "--flushbufs", self.loop])

    def mount(self):
        r = run(["mount", "-t", "ext4", self.loop, self.fs], timeout=120)
        return r.returncode == 0, r.stderr.strip()

    def umount(self):
        try:
            r = run(["umount", self.fs], timeout=120)
            if r.returncode == 0:
                return
        except subprocess.TimeoutExpired:
            pass
        run(["umount", "-l", self.fs])

    def detach(self, lazy):
        """Unmounts the ext4 (lazily after a cut), detaches the loop device, unmounts the FUSE
        file, waits for nbdfuse to exit and the loop device to be released."""
        if is_mounted(self.fs):
            if lazy:
                run(["umount", "-l", self.fs])
            else:
                self.umount()
        if self.loop:
            run(["losetup", "-d", self.loop])
        if is_mounted(self.fuse_dir):
            fm = shutil.which("fusermount3") or shutil.which("fusermount")
            r = run([fm, "-u", self.fuse_dir]) if fm and not lazy else None
            if r is None or r.returncode != 0:
                run(["umount", "-l", self.fuse_dir])
        if self.nbdfuse is not None:
            try:
                self.nbdfuse.wait(10)
            except subprocess.TimeoutExpired:
                kill_wait(self.nbdfuse)  # aborts the FUSE connection: pending I/O fails
        if self.loop:
            deadline = time.time() + 20
            while loop_busy(self.loop):
                if time.time() > deadline:
                    raise RuntimeError(f"{self.loop} still attached 20 s after losetup -d")
                time.sleep(0.02)
        self.loop, self.nbdfuse = None, None

    def start_writer(self):
        wlog = os.path.join(self.logs, "writer.log")
        with open(wlog, "ab") as lf:
            self.writer = subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "--writer", self.fs, self.ack, self.seed,
                 str(self.budget)], stdout=lf, stderr=lf, stdin=subprocess.DEVNULL, **in_group(0))

    def cut(self):
        """SIGKILL the three replicas and the quorum server together: one killpg(2) on the
        process group they share (a loop of four kill(2) calls let the first victims run on the
        other core before the last signal: 0.6-3 ms between the first and the last). Returns
        the microseconds the call took and the microseconds until all four were reaped."""
        procs = self.replicas + [self.server]
        pgid = self.replicas[0].pid
        if any(os.getpgid(p.pid) != pgid for p in procs):
            raise RuntimeError("the servers are not in one process group")
        t0 = time.perf_counter_ns()
        os.killpg(pgid, signal.SIGKILL)
        call_us = (time.perf_counter_ns() - t0) / 1000
        for p in procs:
            p.wait()
        reaped_us = (time.perf_counter_ns() - t0) / 1000
        self.replicas, self.server = [], None
        if self.qmp is not None:
            try:
                self.qmp.s.close()
            except OSError:
                pass
            self.qmp = None
        return call_us, reaped_us

    def stop_servers(self):
        """Clean stop (SIGTERM: ballot drains and flushes; SIGKILL after 30 s)."""
        for p in [self.server] + self.replicas:
            kill_wait(p, signal.SIGTERM, 30)
        self.server, self.replicas = None, []

    def cleanup(self):
        """Leaves nothing mounted or running; idempotent."""
        if self not in ACTIVE:
            return
        try:
            kill_wait(self.writer)
            if is_mounted(self.fs):
                run(["umount", "-l", self.fs])
            if self.loop:
                run(["losetup", "-d", self.loop])
            if is_mounted(self.fuse_dir):
                run(["umount", "-l", self.fuse_dir])
            kill_wait(self.nbdfuse, signal.SIGTERM, 5)
            for p in [self.server] + self.replicas:
                kill_wait(p, signal.SIGTERM, 10)
            if self.loop:
                deadline = time.time() + 10
                while loop_busy(self.loop) and time.time() < deadline:
                    time.sleep(0.05)
        finally:
            ACTIVE.remove(self)
            if self.args.keep or self.failed():
                log(f"{self.mode}: kept {self.d}")
            elif not is_mounted(self.fs) and not is_mounted(self.fuse_dir):
                shutil.rmtree(self.d, ignore_errors=True)

    # checks -------------------------------------------------------------------------------

    def check_fs(self, k):
        """Every file's newest acknowledged version, the step in flight at the cut, strays."""
        st = replay(self.ack)
        model, pending, acked = st["model"], st["pending"], st["acked"]
        cache = {}

        def actual(name):
            if name not in cache:
                try:
                    with open(os.path.join(self.fs, name), "rb") as f:
                        b = f.read()
                    cache[name] = {"sha": sha(b), "size": len(b)}
                except FileNotFoundError:
                    cache[name] = None
            return cache[name]

        involved = set()
        if pending:
            involved = {pending["name"]} | ({pending["to"]} if "to" in pending else set())
        lost, checked = [], 0
        for name, e in sorted(model.items()):
            if name in involved:
                continue
            checked += 1
            a = actual(name)
            if a is None or a["sha"] != e["sha"]:
                lost.append({"file": name, "step": e["step"], "expected": e, "found": a})
        outcome = None
        if pending:
            op, name = pending["op"], pending["name"]
            a = actual(name)
            if op == "create":
                outcome = ("not applied" if a is None else "applied" if a["sha"] == pending["sha"]
                           else "partly applied")
            elif op in ("overwrite", "append"):
                checked += 1
                if a is None:
                    lost.append({"file": name, "step": model[name]["step"], "expected": model[name],
                                 "found": None, "while": f"step {pending['step']} {op} in flight"})
                    outcome = "file gone"
                else:
                    outcome = ("not applied" if a["sha"] == pending["old"] else "applied"
                               if a["sha"] == pending["sha"] else "partly applied")
            elif op == "rename":
                checked += 1
                b = actual(pending["to"])
                if a is not None and b is None and a["sha"] == pending["sha"]:
                    outcome = "not applied"
                elif a is None and b is not None and b["sha"] == pending["sha"]:
                    outcome = "applied"
                else:
                    outcome = "inconsistent"
                    lost.append({"file": name, "step": model[name]["step"], "expected": model[name],
                                 "found": {"old name": a, "new name": b},
                                 "while": f"step {pending['step']} rename in flight"})
            else:
                checked += 1
                if a is None:
                    outcome = "applied"
                elif a["sha"] == pending["sha"]:
                    outcome = "not applied"
                else:
                    outcome = "inconsistent"
                    lost.append({"file": name, "step": model[name]["step"], "expected": model[name],
                                 "found": a, "while": f"step {pending['step']} delete in flight"})
            outcome = f"{op} {outcome}"
        on_disk = set(os.listdir(self.fs)) - {"lost+found"}
        strays = sorted(on_disk - set(model) - involved)
        for name in strays:
            # A name an acknowledged delete or rename removed is back: that step is lost.
            lost.append({"file": name, "step": st["removed"].get(name, "none (a name no step made)"),
                         "expected": None, "found": actual(name)})
        adopt = {n: actual(n) for n in sorted(involved | {x["file"] for x in lost} | set(strays))}
        append_record(self.ack, {"adopt": adopt, "cut": k, "pending": pending and pending["step"],
                                 "lost": [x["file"] for x in lost]})
        return {"acked_total": acked, "checked_files": checked, "lost": lost, "inflight": outcome,
                "strays": strays}

    def fsck(self):
        r = run(["e2fsck", "-fn", self.loop], timeout=300)
        return r.returncode, (r.stdout + r.stderr).strip()

    def compare(self):
        """The 64 KiB granules on which the replicas (read through their own nbdkit) differ:
        {granule index: the replica the other two outvote ("r0".."r2"), or "all" (3 versions)}."""
        diff = {}
        try:
            import nbd  # noqa: PLC0415 (optional: python3-libnbd)
            hs = []
            for s in self.socks:
                h = nbd.NBD()
                h.connect_unix(s)
                hs.append(h)
            readers = [(lambda n, off, h=h: h.pread(n, off)) for h in hs]
            procs = []
        except ImportError:
            procs = [subprocess.Popen(["nbdcopy", f"nbd+unix:///?socket={s}", "-"], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE) for s in self.socks]
            readers = [(lambda n, off, p=p: p.stdout.read(n)) for p in procs]
        try:
            for off in range(0, self.size, CHUNK):
                n = min(CHUNK, self.size - off)
                bufs = [rd(n, off) for rd in readers]
                if any(len(b) != n for b in bufs):
                    raise RuntimeError(f"short read of the replicas at {off}: {[len(b) for b in bufs]}")
                if bufs[0] == bufs[1] == bufs[2]:
                    continue
                for g in range(0, n, GRANULE):
                    a, b, c = (x[g:g + GRANULE] for x in bufs)
                    if not (a == b == c):
                        diff[(off + g) // GRANULE] = ("r2" if a == b else "r1" if a == c
                                                      else "r0" if b == c else "all")
        finally:
            for p in procs:
                p.stdout.close()
                kill_wait(p, signal.SIGTERM, 10)
        return diff

    def failed(self):
        if self.mode == "qsd":
            return False
        return bool(self.aborted) or any(
            c.get("lost") or c.get("fsck_rc") or not c.get("mount_ok", True)
            or (self.mode == "ballot-md" and (c.get("differ") or c.get("recovery_error")))
            for c in self.cuts)

    # the campaign ---------------------------------------------------------------------------

    def run(self):
        for img in self.imgs:
            with open(img, "wb") as f:
                f.truncate(self.size)
        if self.mode == "ballot-md":
            run([BALLOT, "metadata", "create", self.meta, "--size", str(self.size), "--children", "r0,r1,r2"],
                check=True)
        _, t0 = self.start()
        if self.mode == "ballot-md":
            self.start_watch(t0)
            w = self.wait_watch()
            if w["error"]:
                raise RuntimeError(f"initial sync: {w['error']}")
            self.initial_sync_s = w["done"]
        self.attach()
        run(["mkfs.ext4"] + MKFS_OPTS + [self.loop], check=True, timeout=300)
        ok, err = self.mount()
        if not ok:
            raise RuntimeError(f"mount after mkfs failed: {err}")
        open(self.ack, "wb").close()
        prev_acked = 0
        for k in range(1, self.args.cuts + 1):
            c = {"cut": k}
            self.cuts.append(c)
            # write, then cut
            delay = self.rng.uniform(CUT_MIN_S, CUT_MAX_S)
            t_w = time.perf_counter()
            self.start_writer()
            time.sleep(max(0.0, t_w + delay - time.perf_counter()))
            writer_alive = self.writer.poll() is None
            c["delay_s"] = delay
            c["kill_call_us"], c["kill_reaped_us"] = self.cut()
            t_cut = time.perf_counter()
            kill_wait(self.writer)
            c["writer_alive_at_cut"] = writer_alive
            c["writer_rc"] = self.writer.returncode
            if not writer_alive:
                c["writer_log"] = tail(os.path.join(self.logs, "writer.log"), 3)
                log(f"{self.mode} cut {k}: the writer had stopped before the cut "
                    f"(exit {c['writer_rc']}): {c['writer_log']}")
            append_record_safe(self.ack, {"cut": k, "delay_s": round(delay, 3)})
            # teardown
            self.detach(lazy=True)
            c["teardown_s"] = time.perf_counter() - t_cut
            # restart
            c["restart_s"], t0 = self.start()
            if self.mode == "ballot-md":
                self.start_watch(t0)
            self.attach()
            t = time.perf_counter()
            c["mount_ok"], merr = self.mount()
            c["mount_s"] = time.perf_counter() - t
            if not c["mount_ok"]:
                c["mount_error"] = merr
                c["fsck_rc"], c["fsck_out"] = self.fsck()
                log(f"{self.mode} cut {k}: mount failed: {merr}; e2fsck -fn exit {c['fsck_rc']}")
                r = run(["e2fsck", "-fy", self.loop], timeout=300)
                c["repair"] = f"e2fsck -fy exit {r.returncode}"
                ok, err = self.mount()
                if not ok:
                    raise RuntimeError(f"cut {k}: mount failed after e2fsck -fy: {err}")
            t = time.perf_counter()
            chk = self.check_fs(k)
            c["check_s"] = time.perf_counter() - t
            c["acked_new"] = chk["acked_total"] - prev_acked
            prev_acked = chk["acked_total"]
            c.update(checked_files=chk["checked_files"], lost=chk["lost"], inflight=chk["inflight"],
                     strays=chk["strays"], acked_total=chk["acked_total"])
            self.umount()
            if c["mount_ok"]:
                t = time.perf_counter()
                c["fsck_rc"], out = self.fsck()
                c["fsck_s"] = time.perf_counter() - t
                if c["fsck_rc"]:
                    c["fsck_out"] = out
            if self.mode == "ballot-md":
                w = self.wait_watch()
                c["recovery_s"] = w["done"]
                c["jobs_seen"] = sorted(w["jobs_seen"])
                if w["error"]:
                    c["recovery_error"] = w["error"]
            t = time.perf_counter()
            diff = self.compare()
            c["compare_s"] = time.perf_counter() - t
            c["differ"] = len(diff)
            c["differ_granules"] = sorted(diff.items())
            c["cut_s"] = time.perf_counter() - t_w
            self.progress(c)
            if c["lost"] and self.mode != "qsd":
                log(f"{self.mode} cut {k}: LOST {json.dumps(c['lost'])[:2000]}")
            if k < self.args.cuts:
                ok, err = self.mount()
                if not ok:
                    raise RuntimeError(f"cut {k}: mount for the next segment failed: {err}")
        self.detach(lazy=False)
        self.stop_servers()

    def progress(self, c):
        rec = f", recovery {c['recovery_s']:.2f} s" if c.get("recovery_s") is not None else ""
        log(f"{self.mode} cut {c['cut']}/{self.args.cuts}: at {c['delay_s']:.2f} s, "
            f"{c['acked_new']} steps acked, in flight: {c['inflight']}, lost {len(c['lost'])}, "
            f"e2fsck {c.get('fsck_rc')}, differing granules {c['differ']}{rec}, "
            f"{c['cut_s']:.1f} s")


def append_record_safe(path, rec):
    fix_tail(path)
    append_record(path, rec)


MKFS_OPTS = ["-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard"]


# --------------------------------------------------------------------------------------------
# Requirements, support probe, report.


def requirements(modes):
    missing = []
    if os.geteuid() != 0:
        missing.append("root (mount, losetup and FUSE need it)")
    if not os.path.exists("/dev/fuse"):
        missing.append("/dev/fuse")
    tools = ["nbdkit", "nbdfuse", "losetup", "blockdev", "mkfs.ext4", "e2fsck", "mount", "umount"]
    try:
        import nbd  # noqa: F401,PLC0415
    except ImportError:
        tools.append("nbdcopy")
    if "qsd" in modes:
        tools.append("qemu-storage-daemon")
    missing += [t for t in tools if shutil.which(t) is None]
    if shutil.which("losetup") and os.geteuid() == 0:
        r = run(["losetup", "-f"])
        if r.returncode != 0:
            missing.append(f"a free loop device (losetup -f: {r.stderr.strip()})")
    if shutil.which("nbdkit"):
        r = run(["nbdkit", "-U", "-", "--filter=cache", "memory", "1M", "--run", "true"])
        if r.returncode != 0:
            missing.append(f"nbdkit's cache filter ({r.stderr.strip()})")
    if any(m.startswith("ballot") for m in modes) and not os.access(BALLOT, os.X_OK):
        missing.append(f"the ballot binary {BALLOT} (set BALLOT_BIN or cargo build --release)")
    return missing


def metadata_support():
    """None when this binary supports a quorum's metadata node, else why not."""
    r = run([BALLOT, "metadata", "--help"])
    if r.returncode != 0:
        return f"`ballot metadata --help` exits {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[0]}"
    d = tempfile.mkdtemp(prefix="powercut-probe-", dir="/tmp")
    try:
        for i in range(3):
            with open(os.path.join(d, f"f{i}"), "wb") as f:
                f.truncate(MIB)
        meta = os.path.join(d, "q.meta")
        r = run([BALLOT, "metadata", "create", meta, "--size", str(MIB), "--children", "f0,f1,f2"])
        if r.returncode != 0:
            return f"`ballot metadata create` exits {r.returncode}: {r.stderr.strip()}"
        q = {"driver": "quorum", "node-name": "q", "vote-threshold": 2, "children": ["f0", "f1", "f2"],
             "metadata": "meta"}
        args = [BALLOT, "check"]
        for i in range(3):
            args += ["--blockdev", f"driver=file,node-name=f{i},filename={os.path.join(d, f'f{i}')}"]
        args += ["--blockdev", f"driver=file,node-name=meta,filename={meta}", "--blockdev", json.dumps(q)]
        r = run(args)
        if r.returncode != 0:
            return f"`ballot check` refuses a quorum with \"metadata\": {r.stderr.strip()}"
        return None
    finally:
        shutil.rmtree(d, ignore_errors=True)


def first_line(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except (OSError, IndexError):
        return "?"


def ballot_identity():
    try:
        h = hashlib.sha256()
        with open(BALLOT, "rb") as f:
            for b in iter(lambda: f.read(MIB), b""):
                h.update(b)
        mtime = datetime.datetime.fromtimestamp(os.path.getmtime(BALLOT)).strftime("%Y-%m-%d %H:%M")
        return f"`{BALLOT}` (sha256 {h.hexdigest()[:16]}, built {mtime})"
    except OSError:
        return f"`{BALLOT}` (unreadable)"


def git_head():
    r = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    d = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                       capture_output=True, text=True)
    return (r.stdout.strip() or "?") + (" (uncommitted changes in the tree)" if d.stdout.strip() else "")


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_s(x):
    return "–" if x is None else f"{x:.2f} s"


def summarize(c):
    cuts = [k for k in c.cuts if "checked_files" in k]  # restarted and checked
    lost = [x for k in cuts for x in k.get("lost", [])]
    steps_lost = {(x["file"], str(x["step"])) for x in lost}
    union = set()
    for k in cuts:
        union |= {tuple(x) for x in k.get("differ_granules", [])}
    rec = [k.get("recovery_s") for k in cuts] if c.mode == "ballot-md" else [k.get("restart_s") for k in cuts]
    return {
        "cuts": len(cuts),
        "acked": sum(k.get("acked_new", 0) for k in cuts),
        "files": sum(k.get("checked_files", 0) for k in cuts),
        "lost": len(steps_lost),
        "fsck": sum(1 for k in c.cuts if k.get("fsck_rc") or not k.get("mount_ok", True)),
        "differing_cuts": sum(1 for k in cuts if k.get("differ")),
        "differ_sum": sum(k.get("differ", 0) for k in cuts),
        "differ_union": len({g for g, _ in union}),
        "differ_distinct": sorted(union),
        "differ_last": cuts[-1].get("differ", 0) if cuts else 0,
        "recovery": med(rec),
        "per_cut": med([k.get("cut_s") for k in cuts]),
        "strays": sum(len(k.get("strays", [])) for k in cuts),
    }


def write_report(path, args, results, unsupported, wall, argv):
    L = []
    w = L.append
    w("# Power-cut campaign: ext4 on a quorum of three NBD replicas, everything SIGKILLed")
    w("")
    w(f"Written by `scripts/powercut.py` on {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; "
      f"tree at {git_head()}; kernel {platform.release()}; seed `{args.seed}`; {args.cuts} cuts per mode; "
      f"replicas of {args.size // MIB} MiB; wall time {wall / 60:.1f} min.")
    w("")
    w("Each cut: a writer creates, overwrites, appends to, renames and deletes files on ext4 "
      "(contents 4 KiB–1 MiB, log-uniform; each step fsyncs the file and the directory, then "
      "appends the step and the SHA-256 of the file's expected content to a log on the host, "
      "fsynced). At a uniformly random instant 0.5–4 s into the writing the three `nbdkit` "
      "replicas (cache filter in writeback mode: every write not yet flushed is lost) and the "
      "quorum server get SIGKILL together (one `killpg(2)` on the process group they share). Then: writer "
      "killed, `umount -l`, `losetup -d`, the FUSE mount unmounted and nbdfuse waited for; the "
      "same processes restarted with the same command lines; nbdfuse + losetup; **mount** (replays "
      "the journal) → **every acknowledged file checked** (its newest acknowledged version, by "
      "SHA-256) → umount → **`e2fsck -fn`** (exit 0 = clean) → for `ballot-md` wait until "
      "`query-jobs` shows no running job and `x-query-quorum-out-of-sync` every child `in-sync` → "
      "**the three replicas compared** (read through their own nbdkit, per 64 KiB granule) → "
      "mount again; the next cut continues on the same images, file system and log.")
    if getattr(args, "interrupted", False):
        w("")
        w("**Interrupted** before the end: the figures cover the cuts done so far.")
    w("")
    w("## Results")
    w("")
    w("| mode | cuts | acked steps checked | acked steps lost | e2fsck failures | cuts with replicas "
      "differing | differing granules (sum over cuts / distinct / after the last cut) | median "
      "recovery time | median time per cut |")
    w("|---|---|---|---|---|---|---|---|---|")
    for m in args.modes:
        if m in unsupported:
            w(f"| `{m}` | not supported by this binary | | | | | | | |")
            continue
        c = results.get(m)
        if c is None:
            w(f"| `{m}` | not run | | | | | | | |")
            continue
        s = summarize(c)
        ab = " (aborted)" if c.aborted else ""
        w(f"| `{m}` | {s['cuts']}{ab} | {s['acked']} | {s['lost']} | {s['fsck']} | "
          f"{s['differing_cuts']} | {s['differ_sum']} / {s['differ_union']} / {s['differ_last']} | "
          f"{fmt_s(s['recovery'])} | {fmt_s(s['per_cut'])} |")
    w("")
    w("*acked steps checked*: steps acknowledged before each cut, each checked at the next restart "
      "through its file's newest acknowledged version (files compared: "
      + ", ".join(f"{m} {summarize(results[m])['files']}" for m in args.modes if m in results)
      + "). *lost*: files whose newest acknowledged version was not there, counted once per "
      "(file, step). *e2fsck failures*: `e2fsck -fn` exit ≠ 0 after mount + umount, or a mount that "
      "failed. *recovery time*: `ballot-md` from spawning the restarted replicas to no running job "
      "and every child `in-sync`; the other modes do not heal, so theirs is spawn → export socket "
      "and QMP ready. A granule counts as differing when any two replicas differ on it; without "
      "healing, differences stay until ext4 overwrites them, so the same granule may count at "
      "several cuts (the sum) — *distinct* counts each once.")
    w("")
    w("## Per mode")
    for m in args.modes:
        w("")
        w(f"### `{m}`")
        w("")
        if m in unsupported:
            w(f"Not supported by this binary: {unsupported[m]}.")
            continue
        c = results.get(m)
        if c is None:
            w("Not run.")
            continue
        s = summarize(c)
        if c.aborted:
            w(f"**Aborted after {s['cuts']} cuts:** {c.aborted}")
            w("")
        w("Command lines (`$DIR` is the campaign's temp dir; `LOOP` the loop device):")
        w("")
        w("```")
        for line in c.commands():
            w(line)
        w("```")
        w("")
        inflight = {}
        for k in c.cuts:
            if k.get("inflight"):
                inflight[k["inflight"]] = inflight.get(k["inflight"], 0) + 1
        tms = {f: med([k.get(f) for k in c.cuts]) for f in
               ("teardown_s", "restart_s", "mount_s", "check_s", "fsck_s", "compare_s", "delay_s")}
        kcall = med([k.get("kill_call_us") for k in c.cuts])
        kreap = med([k.get("kill_reaped_us") for k in c.cuts])
        w(f"- Steps acknowledged: {s['acked']} over {s['cuts']} cuts (median "
          f"{med([k.get('acked_new') for k in c.cuts]) or 0:.0f} per cut); the step in flight at the "
          f"cut: " + (", ".join(f"{v}× {n}" for n, v in sorted(inflight.items())) or "none") + ".")
        w(f"- Median phase times: writing {fmt_s(tms['delay_s'])}, teardown {fmt_s(tms['teardown_s'])}, "
          f"restart to serving {fmt_s(tms['restart_s'])}, mount {fmt_s(tms['mount_s'])}, check "
          f"{fmt_s(tms['check_s'])}, e2fsck {fmt_s(tms['fsck_s'])}, replica compare "
          f"{fmt_s(tms['compare_s'])}. The cut is one `killpg(SIGKILL)`: the kernel posts the four "
          f"signals within that one call; it returned after a median {kcall or 0:.0f} µs (the "
          f"caller is preempted by the dying processes) and all four were reaped "
          f"{kreap or 0:.0f} µs after it was made.")
        early = [k for k in c.cuts if "writer_alive_at_cut" in k and not k["writer_alive_at_cut"]]
        if early:
            w(f"- The writer had stopped before the cut in {len(early)} cuts (cut "
              + ", ".join(f"{k['cut']}: exit {k.get('writer_rc')}, {k.get('writer_log', '')!r}" for k in early[:5])
              + ").")
        if s["strays"]:
            w(f"- Files on the ext4 that no step accounts for: {s['strays']} (listed per cut below).")
        if s["differ_distinct"]:
            odd = {}
            for _, who in s["differ_distinct"]:
                odd[who] = odd.get(who, 0) + 1
            w(f"- Differing granules (offset in MiB, and the replica the other two outvote; `all` = "
              f"three versions, no majority): "
              + ", ".join(f"{g * GRANULE / MIB:g} ({who})" for g, who in s["differ_distinct"][:30])
              + (" …" if len(s["differ_distinct"]) > 30 else "")
              + "; per replica: " + ", ".join(f"{k} {v}" for k, v in sorted(odd.items())) + ".")
        if c.initial_sync_s is not None:
            w(f"- The metadata node was created without `--in-sync`, so the first open compared the "
              f"whole disk: {c.initial_sync_s:.2f} s before mkfs.")
        if m == "ballot-md":
            jobs = sorted({j for k in c.cuts for j in k.get("jobs_seen", [])})
            w(f"- Jobs seen in `query-jobs` during recoveries: {', '.join(jobs) or 'none'}.")
        for n in c.notes:
            w(f"- {n}")
        bad = [k for k in c.cuts if k.get("lost") or k.get("fsck_rc") or not k.get("mount_ok", True)
               or k.get("recovery_error") or (m == "ballot-md" and k.get("differ"))]
        if bad:
            w("")
            w("Failures:")
            for k in bad:
                w("")
                w(f"- cut {k['cut']} (at {k['delay_s']:.3f} s, in flight: {k.get('inflight')}):")
                if not k.get("mount_ok", True):
                    w(f"  mount failed: `{k.get('mount_error')}`; {k.get('repair')}")
                if k.get("recovery_error"):
                    w(f"  recovery: {k['recovery_error']}")
                for x in k.get("lost", []):
                    w(f"  lost: `{json.dumps(x)}`")
                if k.get("fsck_rc"):
                    w(f"  e2fsck -fn exit {k['fsck_rc']}:")
                    w("")
                    w("  ```")
                    for line in k.get("fsck_out", "").splitlines()[:40]:
                        w(f"  {line}")
                    w("  ```")
                if m == "ballot-md" and k.get("differ"):
                    g = ", ".join(f"{x * GRANULE / MIB:g} MiB ({who})" for x, who in k["differ_granules"][:20])
                    w(f"  {k['differ']} granules differ after recovery, first: {g}")
        w("")
        w("<details><summary>Per cut</summary>")
        w("")
        w("| cut | cut at | steps acked | in flight | files checked | lost | e2fsck | "
          "differing granules | restart | recovery | time |")
        w("|---|---|---|---|---|---|---|---|---|---|---|")
        for k in c.cuts:
            if "cut_s" not in k:
                continue
            w(f"| {k['cut']} | {k['delay_s']:.2f} s | {k.get('acked_new')} | "
              f"{k.get('inflight') or '–'} | {k.get('checked_files')} | {len(k.get('lost', []))} | "
              f"{'mount failed' if not k.get('mount_ok', True) else k.get('fsck_rc')} | {k.get('differ')} | "
              f"{fmt_s(k.get('restart_s'))} | {fmt_s(k.get('recovery_s'))} | {fmt_s(k.get('cut_s'))} |")
        w("")
        w("</details>")
    w("")
    w("## Tools")
    w("")
    w(f"- ballot: {ballot_identity()}")
    for cmd in (["nbdkit", "--version"], ["qemu-storage-daemon", "--version"], ["nbdfuse", "--version"],
                ["nbdcopy", "--version"], ["mkfs.ext4", "-V"], ["e2fsck", "-V"], ["losetup", "--version"]):
        if shutil.which(cmd[0]):
            w(f"- `{shlex.join(cmd)}`: {first_line(cmd)}")
    try:
        import nbd  # noqa: F401,PLC0415
        w("- replicas compared with the python `nbd` module (pread through each nbdkit)")
    except ImportError:
        w("- replicas compared with `nbdcopy nbd+unix:///?socket=rI.sock -` (through each nbdkit, "
          "which serves its cache over its file)")
    w(f"- mkfs: `mkfs.ext4 {' '.join(MKFS_OPTS)}` (no lazy init, no discard: nothing writes in the "
      "background); ext4 mounted with the defaults (data=ordered)")
    w("")
    w("## Notes")
    w("")
    w("- qemu-storage-daemon takes the same `--blockdev`/`--nbd-server`/`--export`/`--chardev`/"
      "`--monitor` arguments as `ballot serve` unchanged (the nbd children's "
      "`driver=nbd,server.type=unix,server.path=...` included); only the binary differs.")
    w("- The storage side is cut, the client side is not: the ext4, the loop device and nbdfuse run "
      "in this host's kernel, which survives; they see I/O errors and are torn down, which discards "
      "what the kernel had not written, as a client power cut would. The ack log and, for "
      "`ballot-md`, the metadata file `q.meta` live on the host's own file system, whose page "
      "cache survives a SIGKILL: for the metadata node this is a process crash, not a power cut "
      "of its disk (the nbdkit replicas do lose their unflushed writes).")
    w("- The writer is not killed with the servers: it runs on until a write or fsync fails, so "
      "the step \"in flight\" is the one that got the I/O error (a step whose fsyncs returned "
      "before the cut is acknowledged even if its log line is written just after). It was never "
      "acknowledged: it may be applied, not applied or partly applied (an in-place overwrite or "
      "append the journal committed part of), all allowed; a rename or delete in flight must "
      "leave the file whole under exactly one name, or gone (delete). What was found is written "
      "to the log and the writer continues from it.")
    w("- Seeded: the cut instants and the writer's choices and contents; what a cut catches "
      "depends on timing, so two runs with one seed differ in their figures.")
    w("- Without a metadata node neither `ballot` nor qsd knows after a restart which granules the "
      "cut left different, so differences stay until the file system rewrites those blocks; "
      "reads still vote 2 of 3.")
    w("")
    w("## How to reproduce")
    w("")
    w("```")
    w(f"sudo BALLOT_BIN={BALLOT} python3 scripts/powercut.py {' '.join(shlex.quote(a) for a in argv)}")
    w("```")
    w("")
    w("Exit 77 = the machine lacks a requirement (printed); 1 = an acknowledged step lost, an "
      "e2fsck failure or an aborted campaign in a ballot mode, or replicas differing after "
      "`ballot-md`'s recovery.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--writer":
        fs, acklog, seed, budget = sys.argv[2:6]
        writer_main(fs, acklog, seed, int(budget))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cuts", type=int, default=100)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=os.path.join(ROOT, "reports", "powercut.md"))
    ap.add_argument("--size", type=int, default=256 * MIB)
    ap.add_argument("--seed", default=None)
    ap.add_argument("--keep", action="store_true", help="keep each campaign's temp dir")
    args = ap.parse_args()
    argv = sys.argv[1:]
    if args.seed is None:
        args.seed = str(random.SystemRandom().randrange(1 << 32))
        argv = argv + ["--seed", args.seed]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad or args.cuts < 1 or args.size < 64 * MIB or args.size % GRANULE:
        ap.error(f"modes are {','.join(MODES)}; --cuts >= 1; --size >= 64 MiB, a multiple of 64 KiB")
    missing = requirements(args.modes)
    if missing:
        print("powercut: skipped, this machine lacks:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 77
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, on_signal)  # SIGINT too: a background job starts with it ignored
    atexit.register(cleanup_all)
    log(f"seed {args.seed}, {args.cuts} cuts per mode, modes {','.join(args.modes)}, ballot {BALLOT}")
    unsupported = {}
    if "ballot-md" in args.modes:
        why = metadata_support()
        if why:
            unsupported["ballot-md"] = why
            log(f"ballot-md: not supported by this binary: {why}")
    results, failed, interrupted = {}, False, False
    t_start = time.time()
    try:
        for m in args.modes:
            if m in unsupported:
                continue
            c = Campaign(m, args)
            results[m] = c
            log(f"{m}: campaign in {c.d}")
            try:
                c.run()
            except (Exception, SystemExit) as e:  # noqa: BLE001 (reported, then the next mode)
                c.aborted = f"{type(e).__name__}: {e}"
                log(f"{m}: ABORTED: {c.aborted}\n{traceback.format_exc()}")
            finally:
                c.cleanup()
                write_report(args.out, args, results, unsupported, time.time() - t_start, argv)
            if c.failed():
                failed = True
    except KeyboardInterrupt as e:
        log(f"interrupted ({e or 'SIGINT'}): cleaning up")
        interrupted = args.interrupted = True
    finally:
        cleanup_all()
    write_report(args.out, args, results, unsupported, time.time() - t_start, argv)
    for m, c in results.items():
        s = summarize(c)
        log(f"{m}: {s['cuts']} cuts, {s['acked']} acked steps checked, {s['lost']} lost, "
            f"{s['fsck']} e2fsck failures, {s['differing_cuts']} cuts with differing replicas "
            f"({s['differ_sum']} granules), median recovery {fmt_s(s['recovery'])}, "
            f"median per cut {fmt_s(s['per_cut'])}" + (f", ABORTED: {c.aborted}" if c.aborted else ""))
    log(f"report: {args.out}")
    return 130 if interrupted else 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
