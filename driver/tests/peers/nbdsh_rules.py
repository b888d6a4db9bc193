# NBD.md §8 row 5: nbdsh (libnbd 1.14, N52) against `ballot serve`.
#
# Run by driver/tests/nbd_peers.rs as
#   PATH=/usr/bin:$PATH nbdsh -n -c "exec(open(SCRIPT).read())"     (N49)
# with BALLOT_SOCK naming the server's unix socket. The server exports:
#   disk0   writable quorum of three 64 MiB files, description "three-way quorum";
#           bytes [1 MiB, 1 MiB + 64 KiB) differ in every child (no version has 2 votes);
#   ro0     the same quorum, read-only;
#   direct0 a 4 MiB raw file with cache.direct=on (minimum block size 512 or 4096, N13).
# Every check asserts an exact value; the first failure raises and nbdsh exits nonzero.

import os
import nbd

SOCK = os.environ["BALLOT_SOCK"]
MIB = 1 << 20
EPERM, ENOENT, EIO, EINVAL, ENOSPC, EOVERFLOW = 1, 2, 5, 22, 28, 75
checks = []


def check(name, got, want):
    if got != want:
        raise AssertionError(f"{name}: got {got!r}, want {want!r}")
    checks.append(name)


def fails_with(name, errnum, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        check(name, e.errnum, errnum)
        return
    raise AssertionError(f"{name}: succeeded, want errno {errnum}")


def handle(export, structured=True, flags=None, strict=None):
    h = nbd.NBD()
    h.set_export_name(export)
    h.set_request_structured_replies(structured)
    if flags is not None:
        h.set_handshake_flags(flags)
    if structured:
        h.add_meta_context("base:allocation")
    h.connect_unix(SOCK)
    if strict is not None:
        h.set_strict_mode(strict)
    return h


# Opt mode: LIST with descriptions, INFO then GO with the same answers (N10, N12, N13), ABORT.
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(SOCK)
listed = {}
check("opt_list count", h.opt_list(lambda name, desc: listed.__setitem__(name, desc)), 3)
check("opt_list names", sorted(listed), ["direct0", "disk0", "ro0"])
check("opt_list description", listed["disk0"], "three-way quorum")
h.set_export_name("disk0")
h.set_full_info(True)
h.opt_info()
info_size = h.get_size()
check("INFO size", info_size, 64 * MIB)
check("INFO description", h.get_export_description(), "three-way quorum")
check("INFO block size minimum", h.get_block_size(nbd.SIZE_MINIMUM), 1)
check("INFO block size preferred", h.get_block_size(nbd.SIZE_PREFERRED), 4096)
check("INFO block size maximum", h.get_block_size(nbd.SIZE_MAXIMUM), 32 * MIB)
h.set_export_name("nosuch")
# ERR_UNKNOWN, which libnbd reports as ENOENT (N11).
fails_with("INFO of an unknown export is ERR_UNKNOWN", ENOENT, h.opt_info)
h.set_export_name("disk0")
h.add_meta_context("base:allocation")
h.opt_go()
check("GO size equals INFO size", h.get_size(), info_size)
check("GO read-only flag", h.is_read_only(), False)
check("GO multi-conn", h.can_multi_conn(), True)
check("GO structured replies", h.get_structured_replies_negotiated(), True)
check("GO context", h.can_meta_context("base:allocation"), True)
h.pwrite(b"\x5a" * 4096, 0, nbd.CMD_FLAG_FUA)
check("read after GO", h.pread(4096, 0), b"\x5a" * 4096)
h.shutdown()

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_unix(SOCK)
h.opt_abort()
check("ABORT closes", h.aio_is_closed(), True)

# Simple replies, kernel-style traffic (N51): READ, WRITE, FLUSH, TRIM with FUA; two connections.
a = handle("disk0", structured=False)
b = handle("disk0", structured=False)
check("simple replies", a.get_structured_replies_negotiated(), False)
check("no DF without structured replies", a.can_df(), False)
a.pwrite(b"\xa1" * 65536, 2 * MIB, nbd.CMD_FLAG_FUA)
a.flush()
check("second connection sees the FUA write", b.pread(65536, 2 * MIB), b"\xa1" * 65536)
b.trim(65536, 3 * MIB, nbd.CMD_FLAG_FUA)
b.pwrite(b"\xb2" * 512, 3 * MIB + 100, 0)
b.flush()
check("read after trim and write", a.pread(512, 3 * MIB + 100), b"\xb2" * 512)
a.set_strict_mode(0)
fails_with("simple: READ over 32 MiB is EINVAL", EINVAL, a.pread, 33 * MIB, 0)
fails_with("simple: read below quorum is EIO", EIO, a.pread, 4096, MIB)
check("simple: next read on the handle", a.pread(4096, 0), b"\x5a" * 4096)
a.shutdown()
b.shutdown()

# Plain newstyle (N8): no FIXED_NEWSTYLE, so EXPORT_NAME and no structured replies.
p = handle("disk0", structured=False, flags=0)
check("plain newstyle protocol", p.get_protocol(), "newstyle")
check("plain newstyle read", p.pread(4096, 0), b"\x5a" * 4096)
check("plain newstyle size", p.get_size(), 64 * MIB)
p.shutdown()

# N20 with the client's own checks off: each bad request gets its error, the handle stays usable.
h = handle("disk0", strict=0)
size = h.get_size()


def still_usable(name):
    check(name + ": handle still usable", h.pread(4096, 0), b"\x5a" * 4096)


fails_with("READ over 32 MiB is EOVERFLOW", EOVERFLOW, h.pread, 33 * MIB, 0)
still_usable("oversize")
fails_with("unknown flag is EINVAL", EINVAL, h.pread, 512, 0, 1 << 7)
still_usable("unknown flag")
fails_with("REQ_ONE on READ is EINVAL", EINVAL, h.pread, 512, 0, nbd.CMD_FLAG_REQ_ONE)
still_usable("REQ_ONE")
fails_with("FAST_ZERO not offered is EINVAL", EINVAL, h.zero, 512, 0, nbd.CMD_FLAG_FAST_ZERO)
still_usable("FAST_ZERO")
check("zero-length READ succeeds", h.pread(0, 0), b"")
h.pwrite(b"", 0)
h.trim(0, 0)
h.zero(0, 0)
fails_with("zero-length BLOCK_STATUS is EINVAL", EINVAL, h.block_status, 0, 0, lambda *a: 0)
still_usable("zero-length")
fails_with("READ past the end is EINVAL", EINVAL, h.pread, 512, size)
fails_with("WRITE past the end is ENOSPC", ENOSPC, h.pwrite, b"\0" * 512, size - 256)
fails_with("WRITE_ZEROES past the end is ENOSPC", ENOSPC, h.zero, 512, size)
fails_with("TRIM past the end is EINVAL", EINVAL, h.trim, 512, size)
fails_with("CACHE past the end is EINVAL", EINVAL, h.cache, 512, size)
fails_with("overflowing range is EINVAL", EINVAL, h.pread, 4096, (1 << 64) - 2048)
still_usable("past the end")
fails_with("read below quorum is EIO", EIO, h.pread, 4096, MIB)
still_usable("read below quorum")
chunks = []
h.pread_structured(
    8192, 0, lambda sub, off, status, err: chunks.append((off, len(sub), status)), nbd.CMD_FLAG_DF
)
check("DF read is one data chunk", chunks, [(0, 8192, nbd.READ_DATA)])
h.shutdown()

ro = handle("ro0", strict=0)
check("read-only flag", ro.is_read_only(), True)
check("read-only has no trim", ro.can_trim(), False)
fails_with("WRITE on read-only is EPERM", EPERM, ro.pwrite, b"\0" * 512, 0)
fails_with("unadvertised TRIM on read-only is EPERM", EPERM, ro.trim, 512, 0)
fails_with("unadvertised WRITE_ZEROES on read-only is EPERM", EPERM, ro.zero, 512, 0)
check("read-only export still reads", ro.pread(4096, 0), b"\x5a" * 4096)
ro.shutdown()

s = handle("disk0", structured=False, strict=0)
fails_with("BLOCK_STATUS without structured replies is EINVAL", EINVAL, s.block_status, 4096, 0, lambda *a: 0)
check("after unadvertised BLOCK_STATUS", s.pread(4096, 0), b"\x5a" * 4096)
s.shutdown()

d = handle("direct0", strict=0)
align = d.get_block_size(nbd.SIZE_MINIMUM)
check("direct minimum is a sector size", align in (512, 4096), True)
fails_with("misaligned offset is EINVAL", EINVAL, d.pread, align, 1)
fails_with("misaligned length is EINVAL", EINVAL, d.pread, align + 1, 0)
d.pwrite(b"\x77" * align, align)
check("aligned write then read", d.pread(align, align), b"\x77" * align)
d.shutdown()

print(f"nbdsh: {len(checks)} checks passed")
