#!/usr/bin/env python3
"""NBD over TLS: ballot serve against qemu-storage-daemon (issue 20), written to reports/bench-tls.md.

One raw file exported over TCP on 127.0.0.1 with TLS required and client certificates verified
(docs/tls.md K3, K6), the same command line for `ballot serve` and for qemu-storage-daemon (the
reference: QEMU's TLS is GnuTLS); certificates are made here by openssl (RSA 2048, as QEMU's
documentation makes them). Clients, all libnbd over `nbds://` with the client's certificate:

  * nbdcopy 1 GiB sequential write (from a file of random bytes) and read (to null:), MiB/s;
  * fio (nbd engine) 4k randread and randwrite at QD32, time-based, IOPS.

The same figures are taken without TLS from ballot alone, so the report also shows what TLS
costs ballot. Each figure is taken with the server started fresh, the servers alternating (order
reversed every other repetition), REPS times; medians with the ratio ballot / qsd (higher is
better).

Peers from Debian: qemu-utils (qemu-storage-daemon), libnbd-bin (nbdcopy), fio, openssl.
Environment: BENCH_TLS_BYTES (default 1 GiB), BENCH_FIO_SECONDS (default 10), BENCH_DIR
(default /var/tmp), BENCH_OUT (default reports/bench-tls.md), BALLOT_BIN (default
target/release/ballot). Argument: REPS (default 4).
"""
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import fio_job, free_port, stop, version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BALLOT = os.environ.get("BALLOT_BIN", os.path.join(ROOT, "target", "release", "ballot"))
SIZE = int(os.environ.get("BENCH_TLS_BYTES", str(1 << 30)))
RUNTIME = int(os.environ.get("BENCH_FIO_SECONDS", "10"))
OUT = os.environ.get("BENCH_OUT", os.path.join(ROOT, "reports", "bench-tls.md"))
MIB = 1 << 20
ENV = dict(os.environ, PATH="/usr/bin:" + os.environ.get("PATH", ""))


def sh(*args, **kw):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def make_pki(d):
    ca = os.path.join(d, "ca")
    os.makedirs(ca)
    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "30", "-subj", "/CN=bench CA",
       "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
       "-keyout", f"{ca}/ca-key.pem", "-out", f"{ca}/ca-cert.pem")
    dirs = {}
    for who, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                     ("client", "extendedKeyUsage=clientAuth\n")):
        w = os.path.join(d, who)
        os.makedirs(w)
        with open(f"{w}/ext", "w") as f:
            f.write(ext)
        sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}",
           "-keyout", f"{w}/{who}-key.pem", "-out", f"{w}/csr")
        sh("openssl", "x509", "-req", "-days", "30", "-CA", f"{ca}/ca-cert.pem", "-CAkey", f"{ca}/ca-key.pem",
           "-CAcreateserial", "-extfile", f"{w}/ext", "-in", f"{w}/csr", "-out", f"{w}/{who}-cert.pem")
        shutil.copy(f"{ca}/ca-cert.pem", f"{w}/ca-cert.pem")
        dirs[who] = w
    return dirs


def start(server, img, pki, tls, port):
    args = []
    if tls:
        args += ["--object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server"]
    args += ["--blockdev", f"driver=file,node-name=f0,filename={img}",
             "--nbd-server", f"addr.type=inet,addr.host=127.0.0.1,addr.port={port}" + (",tls-creds=tls0" if tls else ""),
             "--export", "type=nbd,id=e0,node-name=f0,name=disk,writable=on"]
    cmd = [BALLOT, "serve"] + args if server == "ballot" else ["qemu-storage-daemon"] + args
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return p
        except OSError:
            if p.poll() is not None or time.time() > deadline:
                raise SystemExit(f"{server} did not start: {p.stderr.read().decode()}")
            time.sleep(0.02)


def uri(pki, tls, port):
    if tls:
        return f"nbds://localhost:{port}/disk?tls-certificates={pki['client']}"
    return f"nbd://127.0.0.1:{port}/disk"


def nbdcopy(src, dst):
    t = time.monotonic()
    subprocess.run(["nbdcopy", src, dst], check=True, env=ENV)
    return SIZE / MIB / (time.monotonic() - t)


WORKLOADS = ["1 GiB seq write (nbdcopy)", "1 GiB seq read (nbdcopy)", "4k randread QD32 (fio)", "4k randwrite QD32 (fio)"]


def run(name, u, img, src, work):
    if name.startswith("1 GiB seq write"):
        return nbdcopy(src, u)
    if name.startswith("1 GiB seq read"):
        return nbdcopy(u, "null:")
    rw = "randread" if "randread" in name else "randwrite"
    # Without the tls-certificates query (see main()).
    u = u.split("?")[0]
    j = fio_job(os.path.join(work, "fio.json"), u,
                ["--name=b", f"--rw={rw}", "--bs=4k", "--iodepth=32", f"--runtime={RUNTIME}"], name)
    return j["read" if rw == "randread" else "write"]["iops"]


ETC_PKI = "/etc/pki/libnbd"


def main():
    made_etc = []
    reps = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    base = os.environ.get("BENCH_DIR", "/var/tmp")
    work = tempfile.mkdtemp(prefix="ballot-bench-tls-", dir=base)
    try:
        pki = make_pki(work)
        # fio's nbd engine may not name local files in its URI, so libnbd finds the client's
        # certificates where it looks by default: $HOME/.pki/libnbd, or /etc/pki/libnbd for
        # root (created here only if absent, and removed at the end).
        os.environ["HOME"] = work
        shutil.copytree(pki["client"], os.path.join(work, ".pki", "libnbd"))
        if os.geteuid() == 0:
            if os.path.exists(ETC_PKI):
                raise SystemExit(f"{ETC_PKI} exists; this script will not replace it")
            shutil.copytree(pki["client"], ETC_PKI)
            made_etc.append(ETC_PKI)
        img = os.path.join(work, "disk.raw")
        src = os.path.join(work, "src.raw")
        with open(src, "wb") as f:
            for _ in range(SIZE // (64 * MIB)):
                f.write(os.urandom(64 * MIB))
        shutil.copy(src, img)
        figures = {(w, s, t): [] for w in WORKLOADS for s, t in (("ballot", True), ("qsd", True), ("ballot", False))}
        for r in range(reps):
            order = [("ballot", True), ("qsd", True), ("ballot", False)]
            if r % 2:
                order = order[::-1]
            for w in WORKLOADS:
                for server, tls in order:
                    port = free_port()
                    subprocess.run(["sync"])
                    p = start("ballot" if server == "ballot" else "qsd", img, pki, tls, port)
                    try:
                        v = run(w, uri(pki, tls, port), img, src, work)
                    finally:
                        stop(p)
                    figures[(w, server, tls)].append(v)
                    print(f"rep {r + 1}/{reps} {w:28} {server:6} tls={tls!s:5} {v:10.1f}", flush=True)
        write_report(figures, reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for d in made_etc:
            shutil.rmtree(d, ignore_errors=True)


def write_report(figures, reps):
    med = {k: statistics.median(v) for k, v in figures.items()}
    lines = [
        "# NBD over TLS: ballot serve and qemu-storage-daemon",
        "",
        f"`scripts/bench-tls.py {reps}` on this machine (2 cores, shared by the clients and the server).",
        f"One raw file on a real disk, exported over TCP on 127.0.0.1 with TLS required and client "
        f"certificates verified (RSA 2048 made by openssl), the same command line for both servers; "
        f"libnbd clients over `nbds://`. {reps} repetitions, servers alternating, each run on a freshly "
        f"started server; medians. Higher is better; the ratio is ballot / qsd.",
        "",
        f"- ballot: `{version([BALLOT, '--version'])}` (rustls 0.23, ring)",
        f"- reference: `{version(['qemu-storage-daemon', '--version'])}` (GnuTLS)",
        f"- clients: `{version(['nbdcopy', '--version'])}`, `{version(['fio', '--version'])}`",
        "",
        "| workload | unit | ballot TLS | qsd TLS | ratio | ballot without TLS | TLS cost to ballot |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for w in WORKLOADS:
        unit = "MiB/s" if "GiB" in w else "IOPS"
        b, q, plain = med[(w, "ballot", True)], med[(w, "qsd", True)], med[(w, "ballot", False)]
        lines.append(f"| {w} | {unit} | {b:.0f} | {q:.0f} | {b / q:.2f}x | {plain:.0f} | {b / plain:.2f}x |")
    lines += ["", "Every figure, in run order:", "", "| workload | server | TLS | figures |", "|---|---|---|---|"]
    for (w, s, t), v in figures.items():
        lines.append(f"| {w} | {s} | {'yes' if t else 'no'} | {', '.join(f'{x:.0f}' for x in v)} |")
    with open(OUT, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
