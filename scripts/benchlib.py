"""Helpers shared by the benchmark scripts (bench.py, bench-colo.py, bench-resync.py)."""

import json
import os
import signal
import socket
import subprocess
import time


def stop(p):
    """SIGTERM a server this script started (it drains and exits), SIGKILL after 30 s."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def wait_for(path, p, what):
    """Waits up to 20 s for `path` to exist; fails with the process's stderr if `p` exits."""
    deadline = time.time() + 20
    while not os.path.exists(path):
        if p.poll() is not None or time.time() > deadline:
            err = p.stderr.read().decode() if p.stderr else ""
            raise SystemExit(f"{what} did not start: {err}")
        time.sleep(0.02)


def version(cmd):
    """The first line a tool prints for `cmd`, or "?"."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        return "?"


def fio_job(out, uri, args, what="fio"):
    """Runs one time-based fio job (nbd engine, 1 s ramp) on `uri` with the extra `args`, its
    JSON report written to `out`; returns the job's result. Exits naming `what` if fio fails."""
    r = subprocess.run(
        ["fio", "--output-format=json", f"--output={out}", "--ioengine=nbd", f"--uri={uri}",
         "--time_based=1", "--ramp_time=1", "--randrepeat=0", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if r.returncode != 0:
        raise SystemExit(f"{what} failed: {r.stderr.decode()}")
    with open(out) as f:
        j = json.load(f)["jobs"][0]
    if j["error"] != 0:
        raise SystemExit(f"{what}: error {j['error']}")
    return j


class Qmp:
    """A QMP client on a unix socket: connects (retrying for 20 s), negotiates, runs commands
    and keeps the events that arrive meanwhile for `wait_event`."""

    def __init__(self, path):
        deadline = time.time() + 20
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.05)
        self.f = self.s.makefile("rw")
        self.events = []
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise SystemExit("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        self.f.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.f.flush()
        while True:
            v = self._read()
            if "event" in v:
                self.events.append(v)
                continue
            if "error" in v:
                raise SystemExit(f"QMP {name}: {v['error']}")
            return v["return"]

    def wait_event(self, name, timeout):
        """The first event called `name`, waiting up to `timeout` seconds for it."""
        deadline = time.time() + timeout
        self.s.settimeout(timeout)
        while True:
            for e in self.events:
                if e["event"] == name:
                    self.events.remove(e)
                    return e
            if time.time() > deadline:
                raise SystemExit(f"no {name} within {timeout} s")
            self.events.append(self._read())


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (bound, then released for a server)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
