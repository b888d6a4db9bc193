"""Helpers shared by the benchmark scripts (bench.py, bench-colo.py)."""

import signal
import subprocess


def stop(p):
    """SIGTERM a server this script started (it drains and exits), SIGKILL after 30 s."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
