# Issue 4 item 4: the `qemu.qmp` Python package (PyPI qemu.qmp), unchanged, against the
# monitor of `ballot serve`. Run by driver/tests/nbd_peers.rs with BALLOT_QMP naming the
# monitor socket and BALLOT_DIR the scratch directory holding a.raw, b.raw, c.raw and d.raw
# (1 MiB each). The server starts with three file nodes f0..f2 and quorum q0 over them, no
# exports. Every check asserts an exact value; the first failure raises.

import asyncio
import os

from qemu.qmp import EventListener, ExecuteError, QMPClient

SOCK = os.environ["BALLOT_QMP"]
DIR = os.environ["BALLOT_DIR"]
checks = []


def check(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    checks.append(name)


async def fails(name, coro, cls, desc):
    try:
        await coro
    except ExecuteError as e:
        check(name + " class", e.error_class, cls)
        check(name + " desc", e.error.error.desc, desc)
        return
    raise AssertionError(f"{name}: succeeded")


async def main():
    qmp = QMPClient("ballot-test")
    await qmp.connect(SOCK)
    check("greeting version", sorted(qmp.greeting.QMP.version.keys()), ["package", "qemu"])

    nodes = await qmp.execute("query-named-block-nodes")
    check("nodes", sorted(n["node-name"] for n in nodes), ["f0", "f1", "f2", "q0"])
    q0 = next(n for n in nodes if n["node-name"] == "q0")
    check("q0 driver", q0["drv"], "quorum")

    await fails(
        "unknown command",
        qmp.execute("no-such-command"),
        "CommandNotFound",
        "The command no-such-command has not been found",
    )
    await fails(
        "blockdev-del of a child",
        qmp.execute("blockdev-del", {"node-name": "f1"}),
        "GenericError",
        "Node f1 is in use",
    )

    # Hot add a fourth child, remove it again (Q52-Q56).
    await qmp.execute(
        "blockdev-add",
        {"driver": "file", "node-name": "f3", "filename": os.path.join(DIR, "d.raw")},
    )
    await qmp.execute("x-blockdev-change", {"parent": "q0", "node": "f3"})
    check(
        "out-of-sync after add",
        [c["child"] for c in await qmp.execute("x-query-quorum-out-of-sync", {"node-name": "q0"})],
        ["children.0", "children.1", "children.2", "children.3"],
    )
    await qmp.execute("x-blockdev-change", {"parent": "q0", "child": "children.3"})
    await qmp.execute("blockdev-del", {"node-name": "f3"})

    # An export added over QMP, seen by a client; a flipped byte in one child then reported.
    sock = os.path.join(DIR, "nbd.sock")
    await qmp.execute(
        "block-export-add",
        {"type": "nbd", "id": "e0", "node-name": "q0", "name": "disk0", "writable": False},
    )
    with open(os.path.join(DIR, "b.raw"), "r+b") as f:
        f.seek(4096)
        f.write(b"\xff")
    listener = EventListener(("QUORUM_REPORT_BAD",))
    with qmp.listen(listener):
        proc = await asyncio.create_subprocess_exec(
            "qemu-io", "-f", "raw", "-r", "-c", "read -P 0 0 64k",
            f"nbd+unix:///disk0?socket={sock}",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        check("qemu-io exit", proc.returncode, 0)
        check("qemu-io read", b"read 65536/65536 bytes at offset 0" in out, True)
        ev = await asyncio.wait_for(listener.get(), 10)
    check("event name", ev["event"], "QUORUM_REPORT_BAD")
    check(
        "event data",
        dict(ev["data"]),
        {"type": "read", "node-name": "f1", "sector-num": 0, "sectors-count": 128},
    )
    await qmp.execute("block-export-del", {"id": "e0"})
    await fails(
        "second block-export-del",
        qmp.execute("block-export-del", {"id": "e0"}),
        "GenericError",
        "Export 'e0' is not found",
    )

    check("quit", await qmp.execute("quit"), {})
    # The server hangs up after quit; depending on who closes first, qemu.qmp reports that
    # as EOFError, as it does with QEMU.
    try:
        await qmp.disconnect()
    except EOFError:
        pass
    print(f"qemu.qmp: {len(checks)} checks passed")


asyncio.run(main())
