#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into fuzz/corpus/<target>/seed-*.

Text targets get real inputs (the repository's scenario files, the --blockdev lines of the
docs); structured targets get deterministic pseudo-random bytes of several sizes, which
libFuzzer's mutations turn into cases quickly, plus hand-encoded protocol streams.
Run from anywhere; rerunning rewrites the same files.
"""
import pathlib
import random
import struct

ROOT = pathlib.Path(__file__).resolve().parent
REPO = ROOT.parent


def put(target, name, data):
    d = ROOT / "corpus" / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / f"seed-{name}").write_bytes(data)


def randoms(target, sizes, mode=None):
    rng = random.Random(target)
    for n in sizes:
        b = bytes(rng.randrange(256) for _ in range(n))
        if mode is not None:
            b = bytes([mode]) + b
        put(target, f"random-{mode}-{n}" if mode is not None else f"random-{n}", b)


def main():
    # scenario_file: stem line, then the file.
    for p in sorted((REPO / "scenarios").glob("*.toml")):
        put("scenario_file", p.stem, p.stem + "\n" + p.read_text())
    put("scenario_file", "empty", "x\n")
    # libvirt_xml: the proposal's disk as the seed document writes it, raw and qcow2, quoted,
    # nested, inside a domain, and broken.
    seed = (REPO.parent / "shared" / "seeds" / "001_ffd58c94f2716c96.txt").read_text()
    start = seed.index("<disk type='quorum'")
    end = seed.index("bus='virtio'/>", start) + len("bus='virtio'/>")
    prop = seed[start:end]
    put("libvirt_xml", "proposal-qcow2", prop)
    put("libvirt_xml", "proposal-raw", prop.replace("qcow2", "raw"))
    child = "<backingStore type='file'><format type='raw'/><source file='{}'/></backingStore>"
    put("libvirt_xml", "quoted", "<disk type=\"quorum\"><threshold value=\"2\"/>"
        + "".join(child.format(f) for f in ["a.raw", "b.raw", "/c.raw"])
        + "<target dev=\"vdb\"/></disk>")
    put("libvirt_xml", "nested", "<disk type='quorum'><threshold value='1'/>"
        "<backingStore type='file'><format type='raw'/><source file='a'/>"
        "<backingStore type='file'><format type='raw'/><source file='b'/></backingStore>"
        "</backingStore></disk>")
    put("libvirt_xml", "domain", "<?xml version='1.0'?><domain><devices><!-- x -->"
        "<disk type='quorum'><threshold value=1/>" + child.format("x.raw")
        + "<target dev='vda'/></disk><disk type='file'/></devices></domain>")
    put("libvirt_xml", "block", "<disk type='quorum'><threshold value=1/><backingStore type='block'>"
        "<format type='raw'/><source dev='/dev/sdb'/></backingStore></disk>")
    put("libvirt_xml", "broken", "<disk type='quorum'><threshold value=></disk")
    # qmp_monitor: sessions as a client sends them.
    caps = '{"execute":"qmp_capabilities"}\n'
    put("qmp_monitor", "caps", caps)
    put("qmp_monitor", "no-caps", '{"execute":"query-named-block-nodes","id":1}\n')
    put("qmp_monitor", "quorum", caps
        + '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0","size":1048576}}\n'
        + '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n1","size":1048576}}\n'
        + '{"execute":"blockdev-add","arguments":{"driver":"quorum","node-name":"q","vote-threshold":1,"children":["n0","n1"]},"id":"a"}\n'
        + '{"execute":"x-query-quorum-out-of-sync","arguments":{"node-name":"q"}}\n'
        + '{"execute":"x-blockdev-change","arguments":{"parent":"q","child":"children.1"}}\n'
        + '{"execute":"block-export-add","arguments":{"type":"nbd","id":"e","node-name":"q"}}\n'
        + '{"execute":"block-export-del","arguments":{"id":"e"}}\n'
        + '{"execute":"blockdev-del","arguments":{"node-name":"q"}}\n'
        + '{"execute":"query-named-block-nodes"}\n{"execute":"quit"}\n')
    put("qmp_monitor", "garbage", caps + '{"execute": 3}\n[1,2]\n{"arguments":{}}\n{bad json\n')
    put("qmp_monitor", "replication", caps
        + '{"execute":"blockdev-add","arguments":{"driver":"null-co","node-name":"n0"}}\n'
        + '{"execute":"xen-set-replication","arguments":{"enable":true,"primary":false}}\n'
        + '{"execute":"query-xen-replication-status"}\n{"execute":"xen-colo-do-checkpoint"}\n')
    put("qmp_monitor", "split", '{"exec' )
    put("qmp_monitor", "ids", caps + '{"execute":"query-version","id":{"x":[1]}}\n{"execute":"nope","id":7}\n')
    put("qmp_monitor", "empty", "")
    put("libvirt_xml", "entities", "<disk type='quorum'><threshold value='1'/>"
        + child.format("a&amp;b&lt;.raw") + "</disk>")
    put("scenario_file", "bad-toml", "x\nname = \n")

    # nbd_block_sizes: arbitrary's encoding is not stable enough to hand-encode, so random
    # bytes of several sizes; libFuzzer finds the branches from there.
    randoms("nbd_block_sizes", [16, 24, 32, 40, 48, 64, 96, 128])

    # metadata_header: well-formed slots (CRC32C computed here), then torn and truncated ones.
    def crc32c(b):
        c = 0xFFFFFFFF
        for x in b:
            c ^= x
            for _ in range(8):
                c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        return c ^ 0xFFFFFFFF

    def slot(seq, clean, children):
        body = b"BALLOTMD" + struct.pack("<II", 1, 0) + struct.pack("<QQII", seq, 3 << 30, 65536, 4 << 20)
        body += bytes([1 if clean else 0, 0, 0, 0]) + struct.pack("<I", len(children))
        for name, length in children:
            n = name.encode()
            body += struct.pack("<H", len(n)) + n + struct.pack("<Q", length)
        body = body[:12] + struct.pack("<I", len(body) + 4) + body[16:]
        return (body + struct.pack("<I", crc32c(body))).ljust(4096, b"\0")

    three = [("r0", 3 << 30), ("r1", 3 << 30), ("r2", 3 << 30)]
    put("metadata_header", "clean", slot(2, True, three))
    put("metadata_header", "dirty", slot(7, False, three))
    put("metadata_header", "no-children", slot(1, True, []))
    put("metadata_header", "utf8", slot(3, True, [("replica-é", 1 << 20)]))
    torn = bytearray(slot(9, False, three))
    torn[40] ^= 1
    put("metadata_header", "torn", bytes(torn))
    put("metadata_header", "truncated", slot(4, True, three)[:60])
    put("metadata_header", "zeros", bytes(4096))
    put("metadata_header", "magic-only", b"BALLOTMD" + bytes(56))

    # blockdev_options: one --blockdev per line, in both syntaxes.
    lines = [
        "driver=null-co,node-name=n0,size=1M\n"
        "driver=null-co,node-name=n1,size=1M\n"
        "driver=null-co,node-name=n2,size=1M\n"
        "driver=quorum,node-name=q,children.0=n0,children.1=n1,children.2=n2,vote-threshold=2\n",
        "driver=quorum,node-name=q,vote-threshold=2,read-pattern=fifo,"
        "children.0.driver=null-co,children.0.size=4096,children.1.driver=null-co,children.1.size=4096\n",
        '{"driver":"quorum","node-name":"q","vote-threshold":2,"blkverify":true,"children":'
        '[{"driver":"null-co","size":512},{"driver":"null-co","size":512}]}\n',
        "driver=null-co,node-name=s,size=1G\n"
        "driver=overlay,node-name=h,backing=s\n"
        "driver=overlay,node-name=a,backing=h\n"
        "driver=replication,node-name=r,mode=secondary,file=a,top-id=r\n",
        "driver=null-co,node-name=d,size=1M\n"
        "driver=replication,node-name=p,mode=primary,file=d\n",
        "driver=raw,node-name=r0,offset=512,size=1024,file.driver=null-co,file.size=4096\n",
        "driver=quorum,node-name=q,vote-threshold=0,children.0.driver=null-co\n",
        "driver=quorum,node-name=q,vote-threshold=3,children.0.driver=null-co,children.1.driver=null-co\n",
        "driver=file,node-name=f,filename=/nonexistent\n",
        '{"driver":"nbd","node-name":"n","server":{"type":"inet","host":"127.0.0.1","port":"1"},"export":"e"}\n',
        "driver=overlay,node-name=o,backing.driver=null-co,backing.size=70000,file.driver=null-co,file.size=65536\n",
        "driver=quorum,node-name=q,children.0=missing,vote-threshold=1\n",
    ]
    for i, l in enumerate(lines):
        put("blockdev_options", f"{i:02}", l)

    # nbd_server: raw streams (mode byte 0) and session cases (mode byte 1).
    def opt(o, data=b""):
        return struct.pack(">QII", 0x49484156454F5054, o, len(data)) + data

    def req(kind, cookie, off, length, flags=0):
        return struct.pack(">IHHQQI", 0x25609513, flags, kind, cookie, off, length)

    go = struct.pack(">I", 1) + b"e" + struct.pack(">H", 0)
    hs = struct.pack(">I", 1) + opt(8) + opt(7, go)
    put("nbd_server", "raw-go-read", b"\0" + hs + req(0, 1, 0, 512) + req(3, 2, 0, 0) + req(2, 3, 0, 0))
    put("nbd_server", "raw-go-write", b"\0" + hs + req(1, 1, 0, 4) + b"abcd" + req(0, 2, 0, 4))
    put("nbd_server", "raw-export-name", b"\0" + struct.pack(">I", 0) + opt(1, b"e") + req(0, 1, 0, 512))
    put("nbd_server", "raw-list-abort", b"\0" + struct.pack(">I", 1) + opt(3) + opt(2))
    put("nbd_server", "raw-bad-magic", b"\0" + struct.pack(">I", 1) + b"\1" * 16)
    put("nbd_server", "raw-huge-option", b"\0" + struct.pack(">I", 1) + struct.pack(">QII", 0x49484156454F5054, 7, 0xFFFFFFFF))
    randoms("nbd_server", [16, 64, 256, 1024], mode=1)

    # nbd_client_replies: raw (mode 0) and replies (mode 1).
    put("nbd_client_replies", "raw-simple", b"\0\0\1" + b"\0\0\0\0\x10\0" + struct.pack(">IIQ", 0x67446698, 0, 0) + b"\0" * 16)
    randoms("nbd_client_replies", [16, 64, 256, 1024], mode=0)
    randoms("nbd_client_replies", [16, 64, 256, 1024], mode=1)

    qcow2_images()

    randoms("quorum_vote", [8, 32, 64, 128, 256, 512, 1024, 2048])
    randoms("overlay_map", [8, 32, 64, 128, 256, 512, 1024, 2048])


def qcow2_images():
    """qcow2_image: small images qemu-img and qemu-io write (512-byte clusters keep them a few
    KiB), then damaged copies. Skipped without qemu-utils; the committed files stay."""
    import shutil
    import subprocess
    import tempfile

    if shutil.which("qemu-img") is None:
        return
    with tempfile.TemporaryDirectory() as d:
        def img(name, opts, size, cmds=()):
            p = f"{d}/{name}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, size], check=True)
            for c in cmds:
                subprocess.run(["qemu-io", "-f", "qcow2", "-c", c, p], check=True, capture_output=True)
            data = pathlib.Path(p).read_bytes()
            put("qcow2_image", name, data)
            return data

        img("empty-v3", "cluster_size=512", "64K")
        img("empty-v2", "cluster_size=512,compat=0.10", "64K")
        w = img("written", "cluster_size=512", "64K",
                ["write -P 0x11 0 4k", "write -z 8k 2k", "write -P 0x22 20k 1k", "discard 0 1k"])
        img("compressed", "cluster_size=512", "32K", ["write -c -P 0x33 0 512", "write -c -P 0x44 1k 512"])
        img("refcount1", "cluster_size=512,refcount_bits=1", "16K", ["write -P 0x55 0 2k"])
        img("refcount64", "cluster_size=512,refcount_bits=64", "16K", ["write -P 0x66 0 2k"])
        t = bytearray(w)
        put("qcow2_image", "truncated", bytes(t[: len(t) // 2]))
        t = bytearray(w)
        t[36:40] = struct.pack(">I", 0xFFFFFFFF)  # l1_size
        put("qcow2_image", "huge-l1", bytes(t))
        t = bytearray(w)
        t[24:32] = struct.pack(">Q", 1 << 60)  # size
        put("qcow2_image", "huge-size", bytes(t))


if __name__ == "__main__":
    main()
