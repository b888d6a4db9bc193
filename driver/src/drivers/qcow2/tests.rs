//! The qcow2 driver against a byte model: random requests at every cluster size, refcount
//! width and version, reopen after flush, and crashes that keep any subset of the unflushed
//! writes (torn at 512-byte sectors) — after which the image must open, read only values the
//! model allows, and check with leaks at most.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::check::check;
use super::create::{create, CreateOptions};
use super::*;
use crate::device::{BlockDevice, Device, WriteFlags, ZeroFlags};
use crate::drivers::memory::MemoryDevice;

const SECTOR: u64 = 512;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A file whose writes are volatile until flushed; [`CrashFile::crash`] keeps a random subset
/// of the volatile sectors.
#[derive(Debug)]
struct CrashFile {
    st: Mutex<CrashState>,
}

#[derive(Debug, Default)]
struct CrashState {
    durable: Vec<u8>,
    /// The image as reads see it.
    live: Vec<u8>,
    /// Sectors written since the last flush (offsets).
    volatile: Vec<u64>,
}

impl CrashFile {
    fn new() -> CrashFile {
        CrashFile {
            st: Mutex::new(CrashState::default()),
        }
    }

    /// Power cut: each volatile sector keeps its new content or reverts, at random.
    fn crash(&self, rng: &mut Rng) {
        let mut st = self.st.lock().unwrap();
        let vol = std::mem::take(&mut st.volatile);
        let mut durable = st.durable.clone();
        durable.resize(st.live.len(), 0);
        for s in vol {
            if rng.below(2) == 0 {
                let a = s as usize;
                let b = (a + SECTOR as usize).min(st.live.len());
                durable[a..b].copy_from_slice(&st.live[a..b]);
            }
        }
        st.live = durable.clone();
        st.durable = durable;
    }
}

#[async_trait]
impl BlockDevice for CrashFile {
    fn driver(&self) -> &'static str {
        "crashfile"
    }
    fn length(&self) -> crate::error::Result<u64> {
        Ok(self.st.lock().unwrap().live.len() as u64)
    }
    async fn read(&self, offset: u64, len: usize) -> crate::error::Result<Bytes> {
        let st = self.st.lock().unwrap();
        crate::device::check_request(
            st.live.len() as u64,
            1,
            offset,
            len as u64,
            crate::device::Access::Read,
        )?;
        Ok(Bytes::copy_from_slice(
            &st.live[offset as usize..offset as usize + len],
        ))
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> crate::error::Result<()> {
        let mut st = self.st.lock().unwrap();
        crate::device::check_request(
            st.live.len() as u64,
            1,
            offset,
            data.len() as u64,
            crate::device::Access::Write,
        )?;
        st.live[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        if flags.fua {
            let live = st.live.clone();
            st.durable = live;
            st.volatile.clear();
        } else {
            let end = offset + data.len() as u64;
            let mut s = offset / SECTOR * SECTOR;
            while s < end {
                st.volatile.push(s);
                s += SECTOR;
            }
        }
        Ok(())
    }
    async fn flush(&self) -> crate::error::Result<()> {
        let mut st = self.st.lock().unwrap();
        let live = st.live.clone();
        st.durable = live;
        st.volatile.clear();
        Ok(())
    }
    async fn grow(&self, length: u64) -> crate::error::Result<()> {
        let mut st = self.st.lock().unwrap();
        if (st.live.len() as u64) < length {
            st.live.resize(length as usize, 0);
        }
        Ok(())
    }
    fn grows_with_zeroes(&self) -> bool {
        true
    }
}

async fn open_image(
    file: Device,
    backing: Option<Device>,
    read_only: bool,
) -> crate::error::Result<Qcow2> {
    let h = Qcow2::read_header(&file, "'test.qcow2'").await?;
    Qcow2::open(
        "q",
        "'test.qcow2'",
        file,
        h,
        backing,
        Qcow2Options {
            read_only,
            discard_unmap: true,
            l2_cache_bytes: 4 << 10,
            refcount_cache_bytes: 2 << 10,
        },
    )
    .await
}

/// Per-sector tags: every 8 bytes of a written sector hold its tag.
fn pattern(tags: &[u64]) -> Bytes {
    let mut b = BytesMut::with_capacity(tags.len() * SECTOR as usize);
    for t in tags {
        for _ in 0..SECTOR / 8 {
            b.extend_from_slice(&t.to_le_bytes());
        }
    }
    b.freeze()
}

fn tags_of(data: &[u8]) -> Vec<u64> {
    data.chunks(SECTOR as usize)
        .map(|s| {
            let t = u64::from_le_bytes(s[..8].try_into().unwrap());
            assert!(
                s.chunks(8).all(|c| c == &s[..8]),
                "a sector mixes two writes (torn inside a sector)"
            );
            t
        })
        .collect()
}

/// Random requests against the model at one geometry; returns the number of requests.
async fn exercise(
    seed: u64,
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    with_backing: bool,
    crashes: bool,
) {
    let mut rng = Rng(seed);
    let size_sectors = 300 + rng.below(200);
    let size = size_sectors * SECTOR;
    let cf = Arc::new(CrashFile::new());
    let file: Device = cf.clone();
    create(
        &file,
        &CreateOptions {
            size,
            cluster_bits,
            version,
            refcount_order,
            backing: with_backing.then(|| ("base.raw".to_string(), "raw".to_string())),
        },
    )
    .await
    .unwrap();
    // The backing: shorter than the image, tags 1_000_000 + sector.
    let backing_sectors = size_sectors * 3 / 4;
    let backing: Option<Device> = with_backing.then(|| {
        let tags: Vec<u64> = (0..backing_sectors).map(|s| 1_000_000 + s).collect();
        Arc::new(MemoryDevice::with_contents(pattern(&tags).to_vec())) as Device
    });
    let base_tag = |s: u64| {
        if with_backing && s < backing_sectors {
            1_000_000 + s
        } else {
            0
        }
    };
    // durable[s]: the value after the last flush; allowed[s]: values written since.
    let mut durable: Vec<u64> = (0..size_sectors).map(base_tag).collect();
    let mut allowed: Vec<Vec<u64>> = vec![Vec::new(); size_sectors as usize];
    let mut current = durable.clone();
    let mut q = open_image(file.clone(), backing.clone(), false)
        .await
        .unwrap();
    let mut tag = 1u64;
    for step in 0..400 {
        if std::env::var("QDBG").is_ok() {
            eprintln!("seed {seed} step {step}");
        }
        let s = rng.below(size_sectors);
        let n = 1 + rng.below((size_sectors - s).min(70));
        match rng.below(20) {
            0..=8 => {
                let tags: Vec<u64> = (0..n).map(|i| tag * 1000 + i).collect();
                tag += 1;
                let fua = rng.below(8) == 0;
                q.write(s * SECTOR, pattern(&tags), WriteFlags { fua })
                    .await
                    .unwrap();
                for i in 0..n {
                    current[(s + i) as usize] = tags[i as usize];
                    allowed[(s + i) as usize].push(tags[i as usize]);
                }
            }
            9..=12 => {
                let got = tags_of(&q.read(s * SECTOR, (n * SECTOR) as usize).await.unwrap());
                assert_eq!(
                    got,
                    current[s as usize..(s + n) as usize],
                    "seed {seed} step {step}: read {s}+{n}"
                );
            }
            13..=14 => {
                let may_unmap = rng.below(2) == 0;
                q.write_zeroes(
                    s * SECTOR,
                    n * SECTOR,
                    ZeroFlags {
                        fua: false,
                        may_unmap,
                    },
                )
                .await
                .unwrap();
                for i in s..s + n {
                    current[i as usize] = 0;
                    allowed[i as usize].push(0);
                }
            }
            15 => {
                // A discard leaves any content; the model takes what the node now reads.
                q.discard(s * SECTOR, n * SECTOR).await.unwrap();
                let got = tags_of(&q.read(s * SECTOR, (n * SECTOR) as usize).await.unwrap());
                for i in 0..n {
                    let v = got[i as usize];
                    current[(s + i) as usize] = v;
                    allowed[(s + i) as usize].push(v);
                }
            }
            16..=17 => {
                q.flush().await.unwrap();
                durable.clone_from(&current);
                for a in allowed.iter_mut() {
                    a.clear();
                }
            }
            _ => {
                if crashes && rng.below(3) == 0 {
                    cf.crash(&mut rng);
                } else {
                    q.flush().await.unwrap();
                    durable.clone_from(&current);
                    for a in allowed.iter_mut() {
                        a.clear();
                    }
                }
                drop(q);
                let h = Qcow2::read_header(&file, "'t'").await.unwrap();
                let report = check(&file, &h).await.unwrap();
                assert!(
                    report.is_consistent(),
                    "seed {seed} step {step}: {:?}",
                    report.messages
                );
                q = open_image(file.clone(), backing.clone(), false)
                    .await
                    .unwrap();
                let got = tags_of(&q.read(0, size as usize).await.unwrap());
                for (i, v) in got.iter().enumerate() {
                    assert!(
                        *v == durable[i] || allowed[i].contains(v),
                        "seed {seed} step {step}: sector {i} reads {v}, allowed {} or {:?}",
                        durable[i],
                        allowed[i]
                    );
                }
                current.clone_from(&got);
                durable.clone_from(&got);
                for a in allowed.iter_mut() {
                    a.clear();
                }
            }
        }
    }
    q.flush().await.unwrap();
    let h = Qcow2::read_header(&file, "'t'").await.unwrap();
    let report = check(&file, &h).await.unwrap();
    assert_eq!(report.corruptions, 0, "seed {seed}: {:?}", report.messages);
}

#[tokio::test]
async fn random_requests_match_the_model_at_every_geometry() {
    let mut seed = 1;
    for cluster_bits in [9, 12, 16] {
        for (version, order) in [(3, 4), (2, 4), (3, 0), (3, 3), (3, 6)] {
            for backing in [false, true] {
                exercise(seed, cluster_bits, version, order, backing, false).await;
                seed += 1;
            }
        }
    }
}

#[tokio::test]
async fn crashes_leave_allowed_data_and_at_most_leaks() {
    for seed in 100..130 {
        let bits = [9, 12, 16][(seed % 3) as usize];
        exercise(seed, bits, 3, 4, seed % 2 == 0, true).await;
    }
}

#[tokio::test]
async fn an_image_grows_its_refcount_table_past_one_cluster() {
    // 512-byte clusters with 64-bit refcounts: one block counts 64 clusters, one table cluster
    // 64 blocks = 4096 clusters = 2 MiB; writing 4 MiB forces the table to grow.
    let file: Device = Arc::new(MemoryDevice::growable(0));
    create(
        &file,
        &CreateOptions {
            size: 8 << 20,
            cluster_bits: 9,
            refcount_order: 6,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let q = open_image(file.clone(), None, false).await.unwrap();
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    q.write(1 << 20, Bytes::from(data.clone()), WriteFlags::NONE)
        .await
        .unwrap();
    q.flush().await.unwrap();
    drop(q);
    let h = Qcow2::read_header(&file, "'t'").await.unwrap();
    assert!(
        h.reftable_clusters > 1,
        "the table grew: {} clusters",
        h.reftable_clusters
    );
    let report = check(&file, &h).await.unwrap();
    assert_eq!(
        (report.corruptions, report.leaks),
        (0, 0),
        "{:?}",
        report.messages
    );
    let q = open_image(file, None, true).await.unwrap();
    assert_eq!(q.read(1 << 20, 4 << 20).await.unwrap(), Bytes::from(data));
}
