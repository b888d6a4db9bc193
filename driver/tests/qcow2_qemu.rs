//! Issue 19: ballot's qcow2 driver against QEMU's own tools on real files.
//!
//! - Images QEMU writes (backing chains of qcow2 and raw, zero clusters, discards, compressed
//!   clusters, version 2, small and large clusters) read back through ballot byte for byte as
//!   `qemu-img convert` reads them, and ballot's block status agrees with `qemu-img map`.
//! - Images ballot writes pass `qemu-img check` with no errors and no leaks, and
//!   `qemu-img compare` finds them equal to what was written.
//! - Bad images are refused with a sentence naming the file and the problem.

mod common;

use std::process::Command;

use ballot::device::{Device, WriteFlags, ZeroFlags};
use ballot::events::EventBus;
use ballot::graph::Graph;
use ballot::host::Host;
use bytes::Bytes;
use common::Scratch;

fn graph() -> Graph {
    let (host, _) = Host::recording(EventBus::new());
    Graph::new(host)
}

fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} (qemu-utils) is installed: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, text) = run(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?}: {text}");
    text
}

fn qemu_io(img: &str, fmt: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(img);
    let text = ok("qemu-io", &args);
    assert!(!text.contains("failed"), "qemu-io {cmds:?}: {text}");
}

async fn open(g: &mut Graph, name: &str, img: &str, read_only: bool) -> Device {
    let arg = format!(
        "driver=qcow2,node-name={name},read-only={},file.driver=file,file.filename={img}",
        if read_only { "on" } else { "off" }
    );
    g.blockdev_add_arg(&arg)
        .await
        .unwrap_or_else(|e| panic!("{arg}: {}", e.message()));
    g.get(name).unwrap().dev.clone()
}

/// What `qemu-img convert` reads from `img`.
fn qemu_contents(dir: &Scratch, img: &str) -> Vec<u8> {
    let out = dir.0.join("convert.raw").display().to_string();
    ok("qemu-img", &["convert", "-O", "raw", img, &out]);
    std::fs::read(&out).unwrap()
}

/// `(zero, data)` per 512-byte sector from `qemu-img map --output=json`.
fn qemu_map(img: &str, len: u64) -> Vec<(bool, bool)> {
    let text = ok("qemu-img", &["map", "--output=json", img]);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = vec![(false, false); (len / 512) as usize];
    for e in v.as_array().unwrap() {
        let start = e["start"].as_u64().unwrap();
        let n = e["length"].as_u64().unwrap();
        let flags = (e["zero"].as_bool().unwrap(), e["data"].as_bool().unwrap());
        for b in start / 512..(start + n) / 512 {
            out[b as usize] = flags;
        }
    }
    out
}

async fn ballot_map(dev: &Device) -> Vec<(bool, bool)> {
    let len = dev.length().unwrap();
    let mut out = Vec::new();
    let mut off = 0;
    while off < len {
        let s = dev.block_status(off, len - off).await.unwrap();
        if std::env::var("QMAP").is_ok() {
            eprintln!("{off} {s:?}");
        }
        assert!(
            s.length > 0 && s.length % 512 == 0,
            "status length {} at {off}",
            s.length
        );
        for _ in 0..s.length / 512 {
            out.push((s.zero, s.data));
        }
        off += s.length;
    }
    out
}

async fn read_all(dev: &Device) -> Vec<u8> {
    let len = dev.length().unwrap();
    let mut out = Vec::with_capacity(len as usize);
    let mut off = 0;
    while off < len {
        let n = (len - off).min(4 << 20);
        out.extend_from_slice(&dev.read(off, n as usize).await.unwrap());
        off += n;
    }
    out
}

#[tokio::test]
async fn images_qemu_writes_read_back_identically_with_the_same_map() {
    let dir = Scratch::new("qcow2-qemu");
    let p = |n: &str| dir.0.join(n).display().to_string();
    let mb = 1u64 << 20;
    // A raw base, a qcow2 middle (v2, 4 KiB clusters), a qcow2 top (v3, 64 KiB clusters).
    let base = p("base.raw");
    ok("qemu-img", &["create", "-f", "raw", &base, "32M"]);
    qemu_io(
        &base,
        "raw",
        &["write -P 0x11 0 32M", "write -P 0x12 5M 1M"],
    );
    let mid = p("mid.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4096",
            "-b",
            "base.raw",
            "-F",
            "raw",
            &mid,
        ],
    );
    qemu_io(
        &mid,
        "qcow2",
        &[
            "write -P 0x21 1M 2M",
            "write -P 0x22 3000k 12k",
            "write -z 8M 1M",
        ],
    );
    let top = p("top.qcow2");
    // 40 MiB: longer than its backing (the tail past 32 MiB reads as zeroes).
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            &top,
            "40M",
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &[
            "write -P 0x31 2M 100k",
            "write -z 4M 2M",
            "write -P 0x32 20M 5M",
            "discard 21M 2M",
            "write -P 0x33 36M 64k",
            "write -c -P 0x34 30M 64k",
            "write -P 0x35 33M 8k",
        ],
    );
    // A compressed image and a small-cluster image, standalone.
    let comp = p("comp.qcow2");
    ok("qemu-img", &["convert", "-c", "-O", "qcow2", &top, &comp]);
    let small = p("small.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512,refcount_bits=1",
            &small,
            "3M",
        ],
    );
    qemu_io(
        &small,
        "qcow2",
        &[
            "write -P 0x41 1000k 100k",
            "write -z 0 512k",
            "write -P 0x42 2047k 3k",
        ],
    );
    let big = p("big.qcow2");
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", "cluster_size=2M", &big, "9M"],
    );
    qemu_io(
        &big,
        "qcow2",
        &["write -P 0x51 1M 1M", "write -P 0x52 8M 4k"],
    );

    for img in [&top, &mid, &comp, &small, &big] {
        // QEMU's view first: ballot's read-only open then keeps other writers out (H25).
        let want = qemu_contents(&dir, img);
        let map = qemu_map(img, want.len() as u64);
        let mut g = graph();
        let dev = open(&mut g, "q", img, true).await;
        let len = dev.length().unwrap();
        assert_eq!(len, want.len() as u64, "{img}: length");
        let got = read_all(&dev).await;
        let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "{img}: first differing byte");
        assert_eq!(ballot_map(&dev).await, map, "{img}: block status");
    }
    let _ = mb;
}

/// A model-checked random workload through ballot into a qcow2 file (with a backing file),
/// then QEMU's verdict on the file.
async fn ballot_writes(cluster_size: &str, compat: &str, seed: u64) {
    let dir = Scratch::new("qcow2-ballot");
    let p = |n: &str| dir.0.join(n).display().to_string();
    let len: u64 = 24 << 20;
    let base = p("base.raw");
    ok("qemu-img", &["create", "-f", "raw", &base, "16M"]);
    qemu_io(&base, "raw", &["write -P 0x77 0 16M"]);
    let img = p("img.qcow2");
    // ballot's own create, through the CLI a user runs.
    let out = Command::new(env!("CARGO_BIN_EXE_ballot"))
        .args([
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "-o",
            &format!("cluster_size={cluster_size},compat={compat}"),
            &img,
            "24M",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, text) = run("qemu-img", &["check", &img]);
    assert_eq!(code, 0, "fresh image: {text}");

    let mut model = vec![0u8; len as usize];
    model[..16 << 20].fill(0x77);
    let mut g = graph();
    let dev = open(&mut g, "q", &img, false).await;
    let mut x = seed;
    let mut rnd = |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    for i in 0..300u64 {
        let off = rnd(len / 512) * 512;
        let n = (1 + rnd(256)) * 512;
        let n = n.min(len - off);
        match rnd(10) {
            0..=5 => {
                let b = (i % 250) as u8 + 1;
                dev.write(off, Bytes::from(vec![b; n as usize]), WriteFlags::NONE)
                    .await
                    .unwrap();
                model[off as usize..(off + n) as usize].fill(b);
            }
            6..=7 => {
                let may_unmap = rnd(2) == 0;
                dev.write_zeroes(
                    off,
                    n,
                    ZeroFlags {
                        fua: false,
                        may_unmap,
                    },
                )
                .await
                .unwrap();
                model[off as usize..(off + n) as usize].fill(0);
            }
            8 => dev.flush().await.unwrap(),
            _ => {
                let got = dev.read(off, n as usize).await.unwrap();
                assert_eq!(
                    &got[..],
                    &model[off as usize..(off + n) as usize],
                    "read {off}+{n}"
                );
            }
        }
    }
    dev.flush().await.unwrap();
    drop(dev);
    drop(g);
    let (code, text) = run("qemu-img", &["check", &img]);
    assert_eq!(code, 0, "qemu-img check after ballot's writes: {text}");
    assert!(text.contains("No errors were found"), "{text}");
    let want = p("model.raw");
    std::fs::write(&want, &model).unwrap();
    let (code, text) = run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", &img, &want],
    );
    assert_eq!(code, 0, "qemu-img compare: {text}");
}

#[tokio::test]
async fn images_ballot_writes_pass_qemu_img_check_and_compare() {
    ballot_writes("64K", "1.1", 1).await;
    ballot_writes("4K", "0.10", 2).await;
    ballot_writes("512", "1.1", 3).await;
    ballot_writes("2M", "1.1", 4).await;
}

async fn refusal(arg: &str) -> String {
    let mut g = graph();
    match g.blockdev_add_arg(arg).await {
        Ok(_) => panic!("{arg} opened"),
        Err(e) => e.message().to_string(),
    }
}

fn patch(path: &str, at: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

#[tokio::test]
async fn bad_images_are_refused_with_the_file_and_the_problem() {
    let dir = Scratch::new("qcow2-bad");
    let p = |n: &str| dir.0.join(n).display().to_string();
    let spec = |img: &str| format!("driver=qcow2,node-name=q,file.driver=file,file.filename={img}");

    // Truncated: the header promises tables the file does not hold.
    let t = p("trunc.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &t, "1G"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&t)
        .unwrap()
        .set_len(70_000)
        .unwrap();
    assert_eq!(
        refusal(&spec(&t)).await,
        format!("Image '{t}': The L1 table at offset 196608 (16 bytes) lies past the end of the file (70000 bytes): the image is truncated or corrupt")
    );
    // Too short to be a header at all.
    let s = p("short.qcow2");
    std::fs::write(&s, b"QFI\xfb\x00\x00\x00\x03").unwrap();
    assert_eq!(
        refusal(&spec(&s)).await,
        format!("Image '{s}': qcow2 header truncated: the file holds 8 bytes, the header needs 72")
    );
    // Not qcow2.
    let r = p("raw.img");
    ok("qemu-img", &["create", "-f", "raw", &r, "1M"]);
    assert_eq!(
        refusal(&spec(&r)).await,
        format!("Image '{r}': Image is not in qcow2 format")
    );
    // An unknown incompatible feature bit (bit 40), named by number.
    let f = p("feature.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &f, "1M"]);
    patch(&f, 72, &(1u64 << 40).to_be_bytes());
    assert_eq!(
        refusal(&spec(&f)).await,
        format!("Image '{f}': Unsupported qcow2 feature(s): bit 40")
    );
    // A header claiming an L1 table larger than QEMU's limit.
    let h = p("huge.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &h, "1M"]);
    patch(&h, 24, &(1u64 << 62).to_be_bytes());
    assert_eq!(
        refusal(&spec(&h)).await,
        format!("Image '{h}': Image is too big: the L1 table would exceed 32 MiB (size 4611686018427387904, cluster size 65536)")
    );
    // A missing backing file.
    let m = p("orphan.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "-u",
            &m,
            "1M",
        ],
    );
    assert_eq!(
        refusal(&spec(&m)).await,
        format!(
            "Could not open backing file: Could not open '{}': No such file or directory",
            p("gone.qcow2")
        )
    );
    // A backing loop: a -> b -> a.
    let a = p("a.qcow2");
    let b = p("b.qcow2");
    ok("qemu-img", &["create", "-f", "qcow2", &a, "1M"]);
    ok(
        "qemu-img",
        &["create", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", &b],
    );
    ok(
        "qemu-img",
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", &a],
    );
    let msg = refusal(&spec(&a)).await;
    assert_eq!(
        msg,
        format!("Could not open backing file: Backing file loop: {a} -> {b} -> {a}")
    );
    // backing=null opens the same image without its chain.
    let mut g = graph();
    g.blockdev_add_arg(&format!("{},backing=null", spec(&a)))
        .await
        .unwrap();
    assert_eq!(g.get("q").unwrap().dev.length().unwrap(), 1 << 20);
}

/// Issue 19: an image QEMU left dirty (lazy refcounts, the writer killed) opens read-only as
/// it is, and writable after the repair QEMU itself would run at open: the refcounts are
/// rebuilt from the tables, the dirty bit is cleared, the data and an internal snapshot's
/// data are intact, new writes land, and `qemu-img check` finds no error and no leak.
#[tokio::test]
async fn a_dirty_image_from_a_killed_lazy_refcount_writer_is_repaired_at_a_writable_open() {
    let dir = Scratch::new("qcow2-dirty");
    let d = dir.0.join("d.qcow2").display().to_string();
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            &d,
            "16M",
        ],
    );
    qemu_io(&d, "qcow2", &["write -P 0x11 0 1M"]);
    ok("qemu-img", &["snapshot", "-c", "s1", &d]);
    // Copy-on-write of shared clusters and new allocations, then SIGKILL: refcounts behind.
    let (_, text) = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x22 512k 64k",
            "-c",
            "write -P 0x33 4M 64k",
            "-c",
            "sigraise 9",
            &d,
        ],
    );
    assert!(
        text.contains("wrote 65536/65536 bytes at offset 4194304"),
        "{text}"
    );
    let (code, text) = run("qemu-img", &["check", &d]);
    assert_eq!(code, 2, "the killed writer left refcount errors: {text}");
    let header = std::fs::read(&d).unwrap();
    assert_eq!(header[79] & 1, 1, "the dirty bit is set");

    // Read-only: served as it is, nothing written.
    let mut g = graph();
    let ro = open(&mut g, "ro", &d, true).await;
    let data = ro.read(0, 5 << 20).await.unwrap();
    assert!(data[..512 << 10].iter().all(|&b| b == 0x11));
    assert!(data[512 << 10..576 << 10].iter().all(|&b| b == 0x22));
    assert!(data[4 << 20..(4 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x33));
    drop((ro, g));
    assert_eq!(
        std::fs::read(&d).unwrap(),
        header,
        "a read-only open changes nothing"
    );

    // Writable: repaired at open, with a warning, then written.
    let (host, captured) = Host::recording(EventBus::new());
    let mut g = Graph::new(host);
    let rw = open(&mut g, "rw", &d, false).await;
    let w = captured.warnings();
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].starts_with(&format!(
            "ballot: warning: qcow2 image '{d}' was marked dirty (lazy refcounts after a crash): its refcounts were rebuilt ("
        )),
        "{}",
        w[0]
    );
    rw.write(
        8 << 20,
        Bytes::from(vec![0x44u8; 2 << 20]),
        WriteFlags::NONE,
    )
    .await
    .unwrap();
    rw.write(0, Bytes::from(vec![0x55u8; 4096]), WriteFlags::NONE)
        .await
        .unwrap();
    rw.flush().await.unwrap();
    drop((rw, g));
    assert_eq!(
        std::fs::read(&d).unwrap()[79] & 1,
        0,
        "the dirty bit is cleared"
    );
    let text = ok("qemu-img", &["check", &d]);
    assert!(
        text.contains("No errors were found on the image."),
        "{text}"
    );
    assert!(!text.contains("leaked"), "{text}");
    qemu_io(
        &d,
        "qcow2",
        &[
            "read -P 0x55 0 4k",
            "read -P 0x11 4k 508k",
            "read -P 0x22 512k 64k",
            "read -P 0x33 4M 64k",
            "read -P 0x44 8M 2M",
        ],
    );
    // The snapshot still holds what it held.
    let snap = dir.0.join("s1.raw").display().to_string();
    ok(
        "qemu-img",
        &["convert", "-l", "snapshot.name=s1", "-O", "raw", &d, &snap],
    );
    let s = std::fs::read(&snap).unwrap();
    assert!(s[..1 << 20].iter().all(|&b| b == 0x11));
    assert!(s[1 << 20..].iter().all(|&b| b == 0));
}
