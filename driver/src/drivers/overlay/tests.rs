//! Overlay unit tests: R41–R52 with exact contents, and a seeded model comparison.

use super::*;
use crate::drivers::memory::MemoryDevice;

const C: usize = CLUSTER_BYTES as usize;

fn mem(bytes: Vec<u8>) -> Device {
    Arc::new(MemoryDevice::with_contents(bytes))
}

fn filled(len: usize, byte: u8) -> Vec<u8> {
    vec![byte; len]
}

fn over(backing: &Device, file: Option<&Device>) -> Arc<Overlay> {
    Arc::new(Overlay::open("o", ("b", backing.clone()), file.map(|f| ("f", f.clone()))).unwrap())
}

async fn all(d: &dyn BlockDevice) -> Vec<u8> {
    d.read(0, d.length().unwrap() as usize)
        .await
        .unwrap()
        .to_vec()
}

#[test]
fn r41_file_shorter_than_backing_is_refused_with_sizes() {
    let b = mem(filled(4 * C, 0));
    let f = mem(filled(C, 0));
    let e = Overlay::open("o", ("s0", b), Some(("f0", f))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Overlay file node 'f0' (65536 bytes) is smaller than backing node 's0' (262144 bytes)"
    );
}

async fn cow_semantics(file: bool) {
    let b = mem(filled(4 * C, b'a'));
    let f = mem(filled(4 * C, b'?'));
    let o = over(&b, file.then_some(&f));
    // R43: an empty overlay reads its backing, and ignores what `file` held (R41).
    assert_eq!(all(&*o).await, filled(4 * C, b'a'));
    // R44: partial write to an unallocated cluster merges into the backing's content.
    o.write(C as u64 + 10, Bytes::from_static(b"xyz"), WriteFlags::NONE)
        .await
        .unwrap();
    let mut want = filled(4 * C, b'a');
    want[C + 10..C + 13].copy_from_slice(b"xyz");
    assert_eq!(all(&*o).await, want);
    assert_eq!(o.allocated_clusters(), vec![1]);
    // The backing changing later does not show through an allocated cluster.
    b.write(C as u64, Bytes::from(filled(2 * C, b'B')), WriteFlags::NONE)
        .await
        .unwrap();
    want[2 * C..3 * C].fill(b'B');
    assert_eq!(all(&*o).await, want);
    // R45: write-zeroes over [3C/2, 3C + 1): cluster 2 becomes a zero cluster, 1 and 3 partial.
    o.write_zeroes(3 * C as u64 / 2, 3 * C as u64 / 2 + 1, ZeroFlags::default())
        .await
        .unwrap();
    want[3 * C / 2..3 * C + 1].fill(0);
    assert_eq!(all(&*o).await, want);
    assert_eq!(o.allocated_clusters(), vec![1, 2, 3]);
    // R48: zero cluster, data clusters, unallocated = backing's answer, unmarked.
    let s = o.block_status(2 * C as u64, C as u64).await.unwrap();
    assert_eq!(s, BlockStatus::zero(C as u64));
    let s = o.block_status(0, 4 * C as u64).await.unwrap();
    assert_eq!(
        s,
        BlockStatus {
            allocated: false,
            ..BlockStatus::data(C as u64)
        }
    );
    let s = o.block_status(C as u64, 3 * C as u64).await.unwrap();
    assert_eq!(s, BlockStatus::data(C as u64));
    // R51: make_empty drops the three clusters; the view is the backing again.
    assert_eq!(o.make_empty().await, 3);
    assert_eq!(all(&*o).await, all(&*b).await);
    assert_eq!(o.stats(), OverlayStats::default());
}

#[tokio::test]
async fn r43_r44_r45_r48_r51_copy_on_write_in_memory() {
    cow_semantics(false).await;
}

#[tokio::test]
async fn r43_r44_r45_r48_r51_copy_on_write_file_backed() {
    cow_semantics(true).await;
}

#[tokio::test]
async fn r42_last_cluster_is_shorter() {
    let len = 2 * C + 4096;
    let b = mem(filled(len, 7));
    let o = over(&b, None);
    o.write(2 * C as u64, Bytes::from(filled(4096, 9)), WriteFlags::NONE)
        .await
        .unwrap();
    let mut want = filled(len, 7);
    want[2 * C..].fill(9);
    assert_eq!(all(&*o).await, want);
    assert_eq!(o.cluster_count(), 3);
    assert_eq!(o.stats().mem_clusters, 1);
    o.write_zeroes(0, len as u64, ZeroFlags::default())
        .await
        .unwrap();
    assert_eq!(all(&*o).await, filled(len, 0));
    assert_eq!(
        o.stats(),
        OverlayStats {
            allocated: 3,
            mem_clusters: 0
        }
    );
}

#[tokio::test]
async fn r50_preserve_keeps_old_content_and_skips_allocated_clusters() {
    let b = mem(filled(4 * C, b'a'));
    let o = over(&b, None);
    o.write(0, Bytes::from(filled(C, b'x')), WriteFlags::NONE)
        .await
        .unwrap();
    // Clusters 0 (allocated) and 1 (not): only 1 is preserved.
    assert_eq!(o.preserve(100, C as u64).await.unwrap(), 1);
    assert_eq!(
        o.preserve(100, C as u64).await.unwrap(),
        0,
        "R22: never twice"
    );
    b.write(0, Bytes::from(filled(4 * C, b'n')), WriteFlags::NONE)
        .await
        .unwrap();
    let mut want = filled(C, b'x');
    want.extend(filled(C, b'a'));
    want.extend(filled(2 * C, b'n'));
    assert_eq!(all(&*o).await, want);
    assert_eq!(o.allocated_clusters(), vec![0, 1]);
}

#[tokio::test]
async fn r52_commit_writes_the_chain_view_into_the_base_and_empties_the_chain() {
    let s = mem(filled(4 * C, b'a'));
    let h = over(&s, None);
    let hd: Device = h.clone();
    let a = Arc::new(Overlay::open("a", ("h", hd), None).unwrap());
    // H holds c1 = 'h', c2 = 'h'; A holds c2 = 'x' (over H) and c3 zero.
    h.write(C as u64, Bytes::from(filled(2 * C, b'h')), WriteFlags::NONE)
        .await
        .unwrap();
    a.write(2 * C as u64, Bytes::from(filled(C, b'x')), WriteFlags::NONE)
        .await
        .unwrap();
    a.write_zeroes(3 * C as u64, C as u64, ZeroFlags::default())
        .await
        .unwrap();
    let view = all(&*a).await;
    let st = commit(&[a.clone(), h.clone()], &s, None).await.unwrap();
    assert_eq!(
        st,
        CommitStats {
            clusters: 3,
            bytes: 3 * C as u64
        }
    );
    assert_eq!(all(&*s).await, view);
    let mut want = filled(C, b'a');
    want.extend(filled(C, b'h'));
    want.extend(filled(C, b'x'));
    want.extend(filled(C, 0));
    assert_eq!(view, want);
    assert_eq!(a.stats().allocated + h.stats().allocated, 0);
    // A cancelled commit stops at once and leaves everything in place.
    a.write(0, Bytes::from(filled(C, b'q')), WriteFlags::NONE)
        .await
        .unwrap();
    let cancel = AtomicBool::new(true);
    let st = commit(&[a.clone(), h.clone()], &s, Some(&cancel))
        .await
        .unwrap();
    assert_eq!(st, CommitStats::default());
    assert_eq!(a.allocated_clusters(), vec![0]);
}

/// A tiny deterministic generator for the model test.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

async fn model_run(seed: u64, file: bool) {
    let len = 5 * C + 8192;
    let mut model_s = filled(len, 0);
    for (i, b) in model_s.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    let s = mem(model_s.clone());
    let fh = mem(filled(len, 0xEE));
    let fa = mem(filled(len, 0xDD));
    let h =
        Arc::new(Overlay::open("h", ("s", s.clone()), file.then(|| ("fh", fh.clone()))).unwrap());
    let hd: Device = h.clone();
    let a = Arc::new(Overlay::open("a", ("h", hd), file.then(|| ("fa", fa.clone()))).unwrap());
    let mut view = model_s.clone();
    let mut rng = Lcg(seed);
    for step in 0..300 {
        let off = rng.below(len as u64 / 512) * 512;
        let n = (1 + rng.below(3 * C as u64 / 512)).min((len as u64 - off) / 512) * 512;
        let byte = (step % 250) as u8 + 1;
        match rng.below(8) {
            0 | 1 => {
                a.write(off, Bytes::from(filled(n as usize, byte)), WriteFlags::NONE)
                    .await
                    .unwrap();
                view[off as usize..(off + n) as usize].fill(byte);
            }
            2 => {
                a.write_zeroes(off, n, ZeroFlags::default()).await.unwrap();
                view[off as usize..(off + n) as usize].fill(0);
            }
            3 => {
                // A forwarded write: preserve into H, then change S (R19); the view must not move.
                h.preserve(off, n).await.unwrap();
                s.write(off, Bytes::from(filled(n as usize, byte)), WriteFlags::NONE)
                    .await
                    .unwrap();
                model_s[off as usize..(off + n) as usize].fill(byte);
            }
            4 => {
                let got = a.read(off, n as usize).await.unwrap();
                assert_eq!(
                    &got[..],
                    &view[off as usize..(off + n) as usize],
                    "seed {seed} step {step}"
                );
            }
            5 => {
                // Checkpoint: both emptied; the view becomes S.
                a.make_empty().await;
                h.make_empty().await;
                view = model_s.clone();
            }
            6 => {
                let bs = a.block_status(off, n).await.unwrap();
                assert!(bs.length > 0 && bs.length <= n);
                if bs.zero {
                    let got = a.read(off, bs.length as usize).await.unwrap();
                    assert!(
                        got.iter().all(|&b| b == 0),
                        "seed {seed} step {step}: ZERO lied"
                    );
                }
            }
            _ => {
                if rng.below(4) == 0 {
                    let sd: Device = s.clone();
                    commit(&[a.clone(), h.clone()], &sd, None).await.unwrap();
                    model_s = view.clone();
                    assert_eq!(all(&*s).await, model_s, "seed {seed} step {step}");
                }
            }
        }
    }
    assert_eq!(all(&*a).await, view, "seed {seed}");
}

#[tokio::test]
async fn overlay_chain_matches_a_byte_model_over_seeded_operations() {
    for seed in 1..=12 {
        model_run(seed, false).await;
        model_run(seed, true).await;
    }
}

/// A backing that counts the reads it serves.
#[derive(Debug)]
struct Counting {
    inner: Device,
    reads: std::sync::atomic::AtomicU64,
}

#[async_trait]
impl BlockDevice for Counting {
    fn driver(&self) -> &'static str {
        "counting"
    }
    fn length(&self) -> Result<u64> {
        self.inner.length()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }
}

#[tokio::test]
async fn r43_a_read_reaches_the_backing_once_per_run_of_unallocated_clusters() {
    let pattern: Vec<u8> = (0..5 * C).map(|i| (i / 512) as u8).collect();
    let counting = Arc::new(Counting {
        inner: mem(pattern.clone()),
        reads: Default::default(),
    });
    let b: Device = counting.clone();
    let o = over(&b, None);
    assert_eq!(o.name(), "o");
    // Clusters 0-2 unallocated, 3 zero, 4 data: two runs besides the backing's one.
    o.write_zeroes(3 * C as u64, C as u64, ZeroFlags::default())
        .await
        .unwrap();
    o.write(4 * C as u64, Bytes::from(filled(C, 7)), WriteFlags::NONE)
        .await
        .unwrap();
    counting.reads.store(0, Ordering::SeqCst);
    let got = o.read(100, 5 * C - 100).await.unwrap();
    let mut want = pattern[100..].to_vec();
    want[3 * C - 100..4 * C - 100].fill(0);
    want[4 * C - 100..].fill(7);
    assert_eq!(got.to_vec(), want);
    assert_eq!(
        counting.reads.load(Ordering::SeqCst),
        1,
        "one read for clusters 0-2"
    );
}
