//! Overlay unit tests: R41–R52 with exact contents, and a seeded model comparison.

use super::*;
use crate::drivers::memory::MemoryDevice;
use crate::{Error, ErrorKind};
use std::sync::atomic::Ordering;

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

/// A device that counts the reads and writes it serves, can fail its flushes, and can hold
/// its writes until `gate` is opened.
#[derive(Debug)]
struct Counting {
    inner: Device,
    reads: std::sync::atomic::AtomicU64,
    writes: std::sync::atomic::AtomicU64,
    flush_err: Option<ErrorKind>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl Counting {
    fn new(inner: Device) -> Arc<Counting> {
        Counting::with(inner, None, None)
    }

    fn with(
        inner: Device,
        flush_err: Option<ErrorKind>,
        gate: Option<Arc<tokio::sync::Semaphore>>,
    ) -> Arc<Counting> {
        Arc::new(Counting {
            inner,
            reads: Default::default(),
            writes: Default::default(),
            flush_err,
            gate,
        })
    }
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
        self.writes.fetch_add(1, Ordering::SeqCst);
        if let Some(g) = &self.gate {
            let _ = g.acquire().await;
        }
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> Result<()> {
        match self.flush_err {
            Some(k) => Err(Error::new(k, "counting flush")),
            None => self.inner.flush().await,
        }
    }
}

#[tokio::test]
async fn r43_a_read_reaches_the_backing_once_per_run_of_unallocated_clusters() {
    let pattern: Vec<u8> = (0..5 * C).map(|i| (i / 512) as u8).collect();
    let counting = Counting::new(mem(pattern.clone()));
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

#[tokio::test]
async fn identity_capabilities_and_r46_discard_range_check() {
    let b = mem(filled(2 * C, 1));
    let o = over(&b, None);
    assert_eq!((o.name(), o.driver()), ("o", "overlay"));
    // R45's whole clusters are a map update, but partial ones write data: not fast.
    assert!(!o.can_fast_zero());
    assert_eq!(o.discard(C as u64, C as u64).await, Ok(()));
    assert_eq!(
        o.discard(C as u64, C as u64 + 1)
            .await
            .map_err(|e| e.kind()),
        Err(ErrorKind::Inval)
    );
    assert_eq!(
        all(&*o).await,
        filled(2 * C, 1),
        "R46: discard changes nothing"
    );
}

#[tokio::test]
async fn r44_whole_cluster_writes_copy_nothing_and_go_to_the_file_in_one_write() {
    // Memory mode: the request's buffer becomes the cluster, the backing is not read.
    let counting = Counting::new(mem(filled(4 * C, 1)));
    let b: Device = counting.clone();
    let o = over(&b, None);
    let data = Bytes::from(filled(C, 9));
    o.write(C as u64, data.clone(), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(counting.reads.load(Ordering::SeqCst), 0);
    let got = o.read(C as u64, C).await.unwrap();
    assert_eq!(
        got.as_ptr(),
        data.as_ptr(),
        "the cluster is the written buffer"
    );
    // File mode: two whole clusters are one write to the file, and no backing read.
    let file = Counting::new(mem(filled(4 * C, 0)));
    let f: Device = file.clone();
    let o = over(&b, Some(&f));
    o.write(C as u64, Bytes::from(filled(2 * C, 5)), WriteFlags::NONE)
        .await
        .unwrap();
    assert_eq!(counting.reads.load(Ordering::SeqCst), 0);
    assert_eq!(file.writes.load(Ordering::SeqCst), 1);
    // A partial write widens to its clusters: one write per cluster.
    o.write(
        3 * C as u64 + 1,
        Bytes::from(filled(10, 6)),
        WriteFlags::NONE,
    )
    .await
    .unwrap();
    assert_eq!(file.writes.load(Ordering::SeqCst), 2);
    assert_eq!(
        counting.reads.load(Ordering::SeqCst),
        1,
        "copy-on-write of cluster 3"
    );
}

#[tokio::test]
async fn r47_flush_returns_the_file_error_then_the_backing_error() {
    let failing = |k| Counting::with(mem(filled(C, 0)), Some(k), None);
    let ok: Device = Counting::new(mem(filled(C, 0)));
    let bad_backing: Device = failing(ErrorKind::Io);
    let bad_file: Device = failing(ErrorKind::NoSpc);
    assert_eq!(over(&ok, Some(&ok)).flush().await, Ok(()));
    let e = over(&bad_backing, Some(&ok)).flush().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
    let e = over(&bad_backing, Some(&bad_file))
        .flush()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NoSpc, "the file is flushed first");
    let e = over(&bad_backing, None).flush().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Io);
}

#[tokio::test(start_paused = true)]
async fn r49_a_commit_step_holds_writes_to_its_cluster_but_not_reads_of_allocated_data() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let base = Counting::with(mem(filled(2 * C, 1)), None, Some(gate.clone()));
    let bd: Device = base.clone();
    let o = over(&bd, None);
    o.write(0, Bytes::from(filled(C, 2)), WriteFlags::NONE)
        .await
        .unwrap();
    let chain = vec![o.clone()];
    let commit = tokio::spawn({
        let bd = bd.clone();
        async move { commit(&chain, &bd, None).await }
    });
    // The commit step of cluster 0 now waits inside the base write.
    while base.writes.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    let read = tokio::time::timeout(std::time::Duration::from_millis(10), o.read(0, C)).await;
    assert_eq!(
        read.map(|r| r.map(|d| d[0])),
        Ok(Ok(2)),
        "an allocated cluster reads at once"
    );
    let o2 = o.clone();
    let write = tokio::spawn(async move {
        o2.write(0, Bytes::from(filled(10, 3)), WriteFlags::NONE)
            .await
    });
    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    assert!(
        !write.is_finished(),
        "R49: the write waits for the commit step"
    );
    gate.add_permits(1);
    assert_eq!(
        commit.await.unwrap(),
        Ok(CommitStats {
            clusters: 1,
            bytes: C as u64
        })
    );
    assert_eq!(write.await.unwrap(), Ok(()));
    // The write came after the step: it copied the committed cluster from the base.
    let mut want = filled(C, 2);
    want[..10].fill(3);
    assert_eq!(o.read(0, C).await.unwrap().to_vec(), want);
    assert_eq!(o.allocated_clusters(), vec![0]);
}
