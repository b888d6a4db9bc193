//! The block-device contract, one generic body run against every device (STYLE.md habit 8):
//! reads return what was written, out-of-range and misaligned requests are rejected with the
//! documented kinds, write-zeroes zeroes, block status never claims zeroes that are not there,
//! a discard with the zero guarantee zeroes (Q45), and flush and FUA are durable.

mod common;

use std::sync::Arc;

use ballot::drivers::file::{FileDevice, FileOptions};
use ballot::drivers::memory::MemoryDevice;
use ballot::drivers::null::NullDevice;
use ballot::drivers::quorum::{Quorum, QuorumOptions, ReadPattern};
use ballot::drivers::raw::RawDevice;
use ballot::events::EventBus;
use ballot::host::Host;
use ballot::{BlockDevice, Device, ErrorKind, WriteFlags, ZeroFlags};
use bytes::Bytes;
use common::Volatile;

const LEN: u64 = 4 << 20;

/// Deterministic, position-dependent bytes, so a misplaced write cannot pass as correct.
fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
            .collect::<Vec<u8>>(),
    )
}

/// The contract for a device that stores data.
async fn conformance(name: &str, dev: Device) {
    let len = dev.length().unwrap();
    assert_eq!(len, LEN, "{name}: length");
    let a = u64::from(dev.request_alignment());
    let blk = a.max(512) as usize;

    // Reads return what was written, at the start, the middle and the very end.
    for (i, off) in [0, 64 * 1024 + a, LEN - 8 * blk as u64]
        .into_iter()
        .enumerate()
    {
        let off = off / a * a;
        let data = pattern(i as u8 + 1, 8 * blk);
        dev.write(off, data.clone(), WriteFlags::NONE)
            .await
            .unwrap();
        assert_eq!(
            dev.read(off, data.len()).await.unwrap(),
            data,
            "{name}: read back at {off}"
        );
    }
    // Overlapping writes: the later one wins where they overlap, the earlier elsewhere.
    let first = pattern(7, 4 * blk);
    let second = pattern(9, 2 * blk);
    dev.write(1 << 20, first.clone(), WriteFlags::NONE)
        .await
        .unwrap();
    dev.write((1 << 20) + blk as u64, second.clone(), WriteFlags::NONE)
        .await
        .unwrap();
    let got = dev.read(1 << 20, 4 * blk).await.unwrap();
    assert_eq!(&got[..blk], &first[..blk], "{name}: overlap head");
    assert_eq!(&got[blk..3 * blk], &second[..], "{name}: overlap middle");
    assert_eq!(&got[3 * blk..], &first[3 * blk..], "{name}: overlap tail");

    // Zero-length requests succeed without effect.
    assert_eq!(dev.read(0, 0).await.unwrap().len(), 0, "{name}");
    dev.write(0, Bytes::new(), WriteFlags::NONE).await.unwrap();

    // Out of range (NBD.md N20 step 7 kinds): reads EINVAL, writes ENOSPC, overflow EINVAL.
    let k = |r: ballot::Result<Bytes>| r.unwrap_err().kind();
    assert_eq!(
        k(dev.read(LEN, blk).await),
        ErrorKind::Inval,
        "{name}: read past end"
    );
    assert_eq!(
        k(dev.read(LEN - a, 2 * a as usize).await),
        ErrorKind::Inval,
        "{name}: read straddling end"
    );
    let w = dev.write(LEN, pattern(1, blk), WriteFlags::NONE).await;
    assert_eq!(
        w.unwrap_err().kind(),
        ErrorKind::NoSpc,
        "{name}: write past end"
    );
    let w = dev
        .write(u64::MAX - a + 1, pattern(1, blk), WriteFlags::NONE)
        .await;
    assert_eq!(
        w.unwrap_err().kind(),
        ErrorKind::Inval,
        "{name}: overflowing write"
    );
    let z = dev.write_zeroes(LEN - a, 2 * a, ZeroFlags::default()).await;
    assert_eq!(
        z.unwrap_err().kind(),
        ErrorKind::NoSpc,
        "{name}: write-zeroes past end"
    );
    if a > 1 {
        assert_eq!(
            k(dev.read(1, a as usize).await),
            ErrorKind::Inval,
            "{name}: misaligned read"
        );
    }

    // Write-zeroes, with and without may-unmap.
    for may_unmap in [false, true] {
        dev.write(2 << 20, pattern(3, 16 * blk), WriteFlags::NONE)
            .await
            .unwrap();
        let flags = ZeroFlags {
            fua: false,
            may_unmap,
        };
        dev.write_zeroes((2 << 20) + blk as u64, 8 * blk as u64, flags)
            .await
            .unwrap();
        let got = dev.read(2 << 20, 16 * blk).await.unwrap();
        assert!(
            got[blk..9 * blk].iter().all(|&b| b == 0),
            "{name}: zeroed (unmap {may_unmap})"
        );
        assert_eq!(
            &got[..blk],
            &pattern(3, 16 * blk)[..blk],
            "{name}: zeroes stayed inside"
        );
        assert_eq!(
            &got[9 * blk..],
            &pattern(3, 16 * blk)[9 * blk..],
            "{name}: zeroes stayed inside"
        );
    }

    // Block status: a non-empty answer inside the query; "zero" must be true.
    for off in [0u64, 2 << 20, (2 << 20) + blk as u64, LEN - 64 * 1024] {
        let q = 64 * 1024;
        let s = dev.block_status(off, q).await.unwrap();
        assert!(
            s.length > 0 && s.length <= q,
            "{name}: status length {} at {off}",
            s.length
        );
        if s.zero {
            let data = dev.read(off, s.length as usize).await.unwrap();
            assert!(
                data.iter().all(|&b| b == 0),
                "{name}: status says zero at {off} but data is not"
            );
        }
    }
    assert_eq!(
        dev.block_status(LEN, 512).await.unwrap_err().kind(),
        ErrorKind::Inval,
        "{name}: status past end"
    );

    // Discard: always succeeds in range; with the guarantee the range reads zeroes (Q45).
    dev.write(3 << 20, pattern(5, 64 * 1024), WriteFlags::NONE)
        .await
        .unwrap();
    dev.discard(3 << 20, 64 * 1024).await.unwrap();
    let after = dev.read(3 << 20, 64 * 1024).await.unwrap();
    if dev.discard_zeroes() {
        assert!(
            after.iter().all(|&b| b == 0),
            "{name}: discard promised zeroes"
        );
    } else {
        assert!(
            after == pattern(5, 64 * 1024) || after.iter().all(|&b| b == 0),
            "{name}: discard left old data or zeroes"
        );
    }
    assert_eq!(
        dev.discard(LEN, 512).await.unwrap_err().kind(),
        ErrorKind::Inval,
        "{name}: discard past end"
    );

    dev.flush().await.unwrap();
}

/// Flush and FUA durability on a device whose leaves can crash (lose unflushed writes).
async fn durability(name: &str, dev: Device, leaves: &[Arc<Volatile>]) {
    let crash = || leaves.iter().for_each(|l| l.crash());
    let lost = pattern(11, 4096);
    let flushed = pattern(12, 4096);
    let fua = pattern(13, 4096);
    dev.write(0, lost.clone(), WriteFlags::NONE).await.unwrap();
    crash();
    assert_eq!(
        dev.read(0, 4096).await.unwrap(),
        Bytes::from(vec![0u8; 4096]),
        "{name}: the test leaf must lose unflushed data"
    );
    dev.write(8192, flushed.clone(), WriteFlags::NONE)
        .await
        .unwrap();
    dev.flush().await.unwrap();
    crash();
    assert_eq!(
        dev.read(8192, 4096).await.unwrap(),
        flushed,
        "{name}: flushed write survives"
    );
    dev.write(16384, fua.clone(), WriteFlags::FUA)
        .await
        .unwrap();
    crash();
    assert_eq!(
        dev.read(16384, 4096).await.unwrap(),
        fua,
        "{name}: FUA write survives"
    );
}

struct TempDir(common::Scratch);
impl TempDir {
    fn new() -> TempDir {
        TempDir(common::Scratch::new("conf"))
    }
    fn image(&self, name: &str, len: u64) -> String {
        self.0.image(name, len)
    }
}

fn file(path: &str, direct: bool, discard_unmap: bool) -> Device {
    Arc::new(
        FileDevice::open(&FileOptions {
            filename: path.into(),
            direct,
            discard_unmap,
            ..FileOptions::default()
        })
        .unwrap(),
    )
}

fn quorum(children: Vec<Device>, t: usize, pattern: ReadPattern) -> Device {
    let (host, _) = Host::recording(EventBus::new());
    let kids = children
        .into_iter()
        .enumerate()
        .map(|(i, d)| (format!("c{i}"), d))
        .collect();
    Arc::new(
        Quorum::open(
            QuorumOptions {
                read_pattern: pattern,
                rewrite_corrupted: true,
                discard_unmap: true,
                ..QuorumOptions::new("q0", t)
            },
            kids,
            host,
        )
        .unwrap(),
    )
}

#[tokio::test]
async fn memory_device_conforms() {
    conformance("memory", Arc::new(MemoryDevice::new(LEN as usize))).await;
}

#[tokio::test]
async fn file_conforms_buffered_with_and_without_unmap() {
    let d = TempDir::new();
    conformance("file", file(&d.image("a", LEN), false, false)).await;
    conformance("file discard=unmap", file(&d.image("b", LEN), false, true)).await;
}

#[tokio::test]
async fn file_conforms_with_o_direct() {
    let d = TempDir::new();
    let path = d.image("direct", LEN);
    match FileDevice::open(&FileOptions {
        filename: path.clone(),
        direct: true,
        ..FileOptions::default()
    }) {
        Ok(dev) => {
            assert!(matches!(dev_align(&dev), 512 | 4096));
            conformance("file cache.direct=on", Arc::new(dev)).await;
        }
        // tmpfs and a few others refuse O_DIRECT outright; the error must say so clearly.
        Err(e) => assert_eq!(e.kind(), ErrorKind::Inval, "{e}"),
    }
}

fn dev_align(d: &FileDevice) -> u32 {
    d.request_alignment()
}

#[tokio::test]
async fn file_writes_reach_the_file() {
    let d = TempDir::new();
    let path = d.image("vis", LEN);
    let dev = file(&path, false, false);
    dev.write(4096, pattern(1, 4096), WriteFlags::FUA)
        .await
        .unwrap();
    dev.flush().await.unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(&on_disk[4096..8192], &pattern(1, 4096)[..]);
}

#[tokio::test]
async fn raw_with_offset_conforms_and_stays_inside_its_window() {
    let d = TempDir::new();
    let path = d.image("r", LEN + 2 * 65536);
    let inner = file(&path, false, false);
    let raw = Arc::new(RawDevice::open(inner.clone(), 65536, Some(LEN), false, false).unwrap());
    conformance("raw offset=64k", raw.clone()).await;
    raw.write(0, pattern(2, 512), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(inner.read(65536, 512).await.unwrap(), pattern(2, 512));
    // The bytes before and after the window were never touched.
    assert!(inner.read(0, 65536).await.unwrap().iter().all(|&b| b == 0));
    assert!(inner
        .read(LEN + 65536, 65536)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
}

#[tokio::test]
async fn quorum_of_three_files_conforms_in_both_patterns() {
    let d = TempDir::new();
    let kids = |tag: &str| -> Vec<Device> {
        (0..3)
            .map(|i| file(&d.image(&format!("{tag}{i}"), LEN), false, true))
            .collect()
    };
    conformance("quorum(3 files)", quorum(kids("q"), 2, ReadPattern::Quorum)).await;
    conformance(
        "quorum fifo(3 files)",
        quorum(kids("f"), 1, ReadPattern::Fifo),
    )
    .await;
}

#[tokio::test]
async fn quorum_over_raw_over_memory_conforms() {
    let kids: Vec<Device> = (0..5)
        .map(|_| -> Device {
            Arc::new(
                RawDevice::open(
                    Arc::new(MemoryDevice::new(LEN as usize)),
                    0,
                    None,
                    false,
                    true,
                )
                .unwrap(),
            )
        })
        .collect();
    conformance("quorum(5 raw/memory)", quorum(kids, 3, ReadPattern::Quorum)).await;
}

#[tokio::test]
async fn null_co_reads_zeroes_and_checks_ranges() {
    let n = NullDevice::new(LEN, true, std::time::Duration::ZERO);
    n.write(0, pattern(1, 512), WriteFlags::FUA).await.unwrap();
    // null-co stores nothing: the contract is zeroes back, not the data.
    assert!(n.read(0, 512).await.unwrap().iter().all(|&b| b == 0));
    assert_eq!(n.read(LEN, 1).await.unwrap_err().kind(), ErrorKind::Inval);
    assert_eq!(
        n.write(LEN, pattern(1, 1), WriteFlags::NONE)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NoSpc
    );
    assert!(n.block_status(0, 4096).await.unwrap().zero);
    assert!(n.discard_zeroes());
    let unzeroed = NullDevice::new(LEN, false, std::time::Duration::ZERO);
    assert!(!unzeroed.block_status(0, 4096).await.unwrap().zero);
}

#[tokio::test]
async fn flush_and_fua_are_durable_through_raw_and_quorum() {
    // The leaf itself.
    let v = Volatile::new(LEN as usize);
    durability("volatile leaf", v.clone(), &[v]).await;
    // raw passes flush and FUA through.
    let v = Volatile::new(LEN as usize);
    let raw: Device = Arc::new(RawDevice::open(v.clone(), 0, None, false, false).unwrap());
    durability("raw", raw, &[v]).await;
    // quorum: FUA becomes write + flush vote (Q40); flush reaches every child (Q41).
    let leaves: Vec<Arc<Volatile>> = (0..3).map(|_| Volatile::new(LEN as usize)).collect();
    let q = quorum(
        leaves.iter().map(common::dev).collect(),
        2,
        ReadPattern::Quorum,
    );
    durability("quorum", q, &leaves).await;
    let leaves: Vec<Arc<Volatile>> = (0..2).map(|_| Volatile::new(LEN as usize)).collect();
    let q = quorum(
        leaves.iter().map(common::dev).collect(),
        1,
        ReadPattern::Fifo,
    );
    durability("quorum fifo", q, &leaves).await;
}

#[test]
fn o_direct_is_really_used_on_this_filesystem() {
    // Guards file_conforms_with_o_direct against passing vacuously: the CI and dev machines'
    // temp directory is on ext4, which supports O_DIRECT.
    let d = TempDir::new();
    let dev = FileDevice::open(&FileOptions {
        filename: d.image("probe", LEN),
        direct: true,
        ..FileOptions::default()
    });
    let fs_supports = !std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/tmp") && l.contains("tmpfs"));
    if fs_supports {
        let align = dev.map(|d| dev_align(&d)).unwrap();
        assert!(align == 512 || align == 4096, "probed alignment {align}");
    }
}
