//! Fuzz target `overlay_map`, and the model behind the overlay state machine: the COLO chain
//! A → H → S (REPLICATION.md §10) against a byte-and-cluster model of R42–R52.
//!
//! The model keeps S's bytes and, per overlay, each cluster's state — unallocated, data or
//! zero — with the data. After every operation the real overlays must have exactly the
//! model's allocated clusters (R42), every read must return the model's view (R43), and block
//! status must report the model's run, flags and "allocated here" mark (R48).

use std::collections::BTreeMap;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use ballot::drivers::memory::MemoryDevice;
use ballot::drivers::overlay::{commit, Overlay, CLUSTER_BYTES};
use ballot::{BlockDevice, Device, WriteFlags, ZeroFlags};
use bytes::Bytes;

/// The disk: five whole clusters and a short sixth (R42).
pub const DISK_BYTES: u64 = 5 * CLUSTER_BYTES + 8192;
const C: u64 = CLUSTER_BYTES;

/// A byte range, reduced into the disk by [`Range::resolve`].
#[derive(Debug, Clone, Copy, Arbitrary, PartialEq, Eq)]
pub struct Range {
    /// Start, in 512-byte units when `fine` is false, else bytes.
    pub start: u32,
    /// Length, same unit.
    pub len: u32,
    /// Byte granularity instead of sectors.
    pub fine: bool,
}

impl Range {
    /// `(offset, length)` inside the disk, length at least 1.
    pub fn resolve(self) -> (u64, u64) {
        let unit = if self.fine { 1 } else { 512 };
        let units = DISK_BYTES / unit;
        let start = u64::from(self.start) % units;
        let len = 1 + u64::from(self.len) % (units - start).min(3 * C / unit + 2);
        (start * unit, len * unit)
    }
}

/// One operation on the chain.
#[derive(Debug, Clone, Copy, Arbitrary, PartialEq, Eq)]
pub enum Op {
    /// A guest write to A with a fill byte.
    Write(Range, u8),
    /// A guest write-zeroes to A.
    WriteZeroes(Range, bool),
    /// A guest discard on A (R46: changes nothing).
    Discard(Range),
    /// A guest read through A.
    Read(Range),
    /// Block status of A.
    Status(Range),
    /// A forwarded write: preserve into H (R50), then S changes.
    Forward(Range, u8),
    /// A checkpoint: A emptied, then H (R51).
    Checkpoint,
    /// make_empty on A alone.
    EmptyActive,
    /// Failover: commit the chain A, H into S (R52).
    CommitAll,
    /// Commit H alone into S.
    CommitHidden,
}

/// A cluster in the model.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Slot {
    Data(Vec<u8>),
    Zero,
}

/// The model of one overlay: allocated clusters only, ordered.
#[derive(Debug, Default, Clone)]
struct MapModel(BTreeMap<u64, Slot>);

fn cluster_len(c: u64) -> u64 {
    C.min(DISK_BYTES - c * C)
}

fn clusters(off: u64, len: u64) -> std::ops::Range<u64> {
    off / C..(off + len).div_ceil(C)
}

/// The chain's model: S's bytes, H over S, A over H.
#[derive(Debug, Clone)]
pub struct ChainModel {
    s: Vec<u8>,
    h: MapModel,
    a: MapModel,
}

impl Default for ChainModel {
    fn default() -> Self {
        Self::new()
    }
}

impl ChainModel {
    /// S holds a sector-numbered pattern; both overlays are empty (R41).
    pub fn new() -> ChainModel {
        ChainModel {
            s: initial_s(),
            h: MapModel::default(),
            a: MapModel::default(),
        }
    }

    fn h_byte_range(&self, off: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        for c in clusters(off, len) {
            let (ca, cl) = (c * C, cluster_len(c));
            let (a, b) = (ca.max(off), (ca + cl).min(off + len));
            match self.h.0.get(&c) {
                Some(Slot::Data(d)) => {
                    out.extend_from_slice(&d[(a - ca) as usize..(b - ca) as usize])
                }
                Some(Slot::Zero) => out.resize(out.len() + (b - a) as usize, 0),
                None => out.extend_from_slice(&self.s[a as usize..b as usize]),
            }
        }
        out
    }

    /// Applies `op` to the model (R44–R52).
    pub fn apply(&mut self, op: Op) {
        match op {
            Op::Write(r, byte) => {
                let (off, len) = r.resolve();
                self.write_a(off, &vec![byte; len as usize]);
            }
            Op::WriteZeroes(r, _) => {
                let (off, len) = r.resolve();
                self.write_zeroes_a(off, len);
            }
            Op::Forward(r, byte) => {
                let (off, len) = r.resolve();
                self.forward(off, len, byte);
            }
            Op::Checkpoint => {
                self.a.0.clear();
                self.h.0.clear();
            }
            Op::EmptyActive => self.a.0.clear(),
            Op::CommitAll => self.commit_all(),
            Op::CommitHidden => self.commit_hidden(),
            Op::Discard(_) | Op::Read(_) | Op::Status(_) => {}
        }
    }

    /// Allocated clusters of A and of H.
    pub fn allocated(&self) -> (Vec<u64>, Vec<u64>) {
        (
            self.a.0.keys().copied().collect(),
            self.h.0.keys().copied().collect(),
        )
    }

    /// What a read through A returns (R43).
    pub fn view(&self, off: u64, len: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len as usize);
        for c in clusters(off, len) {
            let (ca, cl) = (c * C, cluster_len(c));
            let (a, b) = (ca.max(off), (ca + cl).min(off + len));
            match self.a.0.get(&c) {
                Some(Slot::Data(d)) => {
                    out.extend_from_slice(&d[(a - ca) as usize..(b - ca) as usize])
                }
                Some(Slot::Zero) => out.resize(out.len() + (b - a) as usize, 0),
                None => out.extend_from_slice(&self.h_byte_range(a, b - a)),
            }
        }
        out
    }

    fn write_a(&mut self, off: u64, data: &[u8]) {
        // R44: every touched cluster becomes a data cluster holding the merged content.
        for c in clusters(off, data.len() as u64) {
            let (ca, cl) = (c * C, cluster_len(c));
            let mut full = self.view(ca, cl);
            let (a, b) = (ca.max(off), (ca + cl).min(off + data.len() as u64));
            full[(a - ca) as usize..(b - ca) as usize]
                .copy_from_slice(&data[(a - off) as usize..(b - off) as usize]);
            self.a.0.insert(c, Slot::Data(full));
        }
    }

    fn write_zeroes_a(&mut self, off: u64, len: u64) {
        // R45: whole clusters (the short last one counts when the range reaches the end)
        // become zero clusters; partial ones are a write of zeroes.
        let end = off + len;
        let whole_first = off.div_ceil(C);
        let whole_end = if end == DISK_BYTES {
            DISK_BYTES.div_ceil(C)
        } else {
            end / C
        };
        if whole_first >= whole_end {
            self.write_a(off, &vec![0; len as usize]);
            return;
        }
        let head = (off, whole_first * C);
        let tail = ((whole_end * C).min(end), end);
        for (a, b) in [head, tail] {
            if b > a {
                self.write_a(a, &vec![0; (b - a) as usize]);
            }
        }
        for c in whole_first..whole_end {
            self.a.0.insert(c, Slot::Zero);
        }
    }

    /// S's block status (a memory device): the leading run, in 512-byte steps from `off`,
    /// that is all zero or not.
    fn s_status(&self, off: u64, len: u64) -> (u64, bool) {
        let range = &self.s[off as usize..(off + len) as usize];
        let zero = |c: &[u8]| c.iter().all(|&b| b == 0);
        let first = zero(&range[..range.len().min(512)]);
        let mut run = 0;
        for c in range.chunks(512) {
            if zero(c) != first {
                break;
            }
            run += c.len() as u64;
        }
        (run, first)
    }

    fn forward(&mut self, off: u64, len: u64, byte: u8) {
        // R50: each run of clusters unallocated in H receives S's content; a run S reports
        // as zero throughout becomes zero clusters. Then the write changes S.
        let cs = clusters(off, len);
        let mut c = cs.start;
        while c < cs.end {
            if self.h.0.contains_key(&c) {
                c += 1;
                continue;
            }
            let mut e = c;
            while e < cs.end && !self.h.0.contains_key(&e) {
                e += 1;
            }
            let (a, b) = (c * C, (e * C).min(DISK_BYTES));
            let (run, zero) = self.s_status(a, b - a);
            for k in c..e {
                let slot = if zero && run == b - a {
                    Slot::Zero
                } else {
                    let (ka, kl) = (k * C, cluster_len(k));
                    Slot::Data(self.s[ka as usize..(ka + kl) as usize].to_vec())
                };
                self.h.0.insert(k, slot);
            }
            c = e;
        }
        self.s[off as usize..(off + len) as usize].fill(byte);
    }

    fn commit_all(&mut self) {
        let cs: Vec<u64> = self.a.0.keys().chain(self.h.0.keys()).copied().collect();
        for c in cs {
            let (ca, cl) = (c * C, cluster_len(c));
            let v = self.view(ca, cl);
            self.s[ca as usize..(ca + cl) as usize].copy_from_slice(&v);
        }
        self.a.0.clear();
        self.h.0.clear();
    }

    fn commit_hidden(&mut self) {
        let cs: Vec<u64> = self.h.0.keys().copied().collect();
        for c in cs {
            let (ca, cl) = (c * C, cluster_len(c));
            let v = self.h_byte_range(ca, cl);
            self.s[ca as usize..(ca + cl) as usize].copy_from_slice(&v);
        }
        self.h.0.clear();
    }

    /// R48 through A: `(length, zero, data, allocated)` of the first run.
    fn status(&self, off: u64, len: u64) -> (u64, bool, bool, bool) {
        let kind = |m: &MapModel, c: u64| match m.0.get(&c) {
            None => 0,
            Some(Slot::Data(_)) => 1,
            Some(Slot::Zero) => 2,
        };
        // The leading run of clusters of `[off, off + len)` in the same state in `m`.
        let run = |m: &MapModel, len: u64| {
            let cs = clusters(off, len);
            let k0 = kind(m, cs.start);
            let mut end = cs.start + 1;
            while end < cs.end && kind(m, end) == k0 {
                end += 1;
            }
            ((end * C).min(off + len) - off, k0)
        };
        let (n, k) = run(&self.a, len);
        match k {
            1 => (n, false, true, true),
            2 => (n, true, false, true),
            // H answers for A's run, with its own runs, unmarked.
            _ => match run(&self.h, n) {
                (hn, 1) => (hn, false, true, false),
                (hn, 2) => (hn, true, false, false),
                (hn, _) => {
                    let (run, zero) = self.s_status(off, hn);
                    (run, zero, !zero, false)
                }
            },
        }
    }
}

fn initial_s() -> Vec<u8> {
    (0..DISK_BYTES).map(|i| (i / 512 % 251) as u8 + 1).collect()
}

/// The real chain: A over H over S, with data in memory or in `file` nodes.
pub struct Chain {
    /// S.
    pub s: Arc<MemoryDevice>,
    /// H.
    pub h: Arc<Overlay>,
    /// A.
    pub a: Arc<Overlay>,
}

impl Chain {
    /// Opens the chain; with `file`, both overlays keep their clusters in memory devices
    /// filled with garbage (R41: an overlay opens empty whatever its file holds).
    pub fn open(file: bool) -> Chain {
        let s = Arc::new(MemoryDevice::with_contents(initial_s()));
        let sd: Device = s.clone();
        let fh: Device = Arc::new(MemoryDevice::with_contents(vec![0xEE; DISK_BYTES as usize]));
        let fa: Device = Arc::new(MemoryDevice::with_contents(vec![0xDD; DISK_BYTES as usize]));
        let h =
            Arc::new(Overlay::open("h", ("s", sd), file.then_some(("fh", fh))).expect("open H"));
        let hd: Device = h.clone();
        let a =
            Arc::new(Overlay::open("a", ("h", hd), file.then_some(("fa", fa))).expect("open A"));
        Chain { s, h, a }
    }
}

/// Applies `op` to the chain and the model, checking what `op` returns and the allocation
/// maps afterwards. Panics with `ctx` on any difference.
pub async fn step(chain: &Chain, model: &mut ChainModel, op: Op, ctx: &str) {
    match op {
        Op::Write(r, byte) => {
            let (off, len) = r.resolve();
            chain
                .a
                .write(off, Bytes::from(vec![byte; len as usize]), WriteFlags::NONE)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: write failed: {e}"));
        }
        Op::WriteZeroes(r, may_unmap) => {
            let (off, len) = r.resolve();
            let flags = ZeroFlags {
                fua: false,
                may_unmap,
            };
            chain
                .a
                .write_zeroes(off, len, flags)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: write-zeroes failed: {e}"));
        }
        Op::Discard(r) => {
            let (off, len) = r.resolve();
            chain
                .a
                .discard(off, len)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: discard failed: {e}"));
        }
        Op::Read(r) => {
            let (off, len) = r.resolve();
            let got = chain
                .a
                .read(off, len as usize)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: read failed: {e}"));
            assert!(
                got[..] == model.view(off, len)[..],
                "{ctx}: R43 read of {off}+{len}"
            );
        }
        Op::Status(r) => {
            let (off, len) = r.resolve();
            let s = chain
                .a
                .block_status(off, len)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: block status failed: {e}"));
            assert_eq!(
                (s.length, s.zero, s.data, s.allocated),
                model.status(off, len),
                "{ctx}: R48 block status of {off}+{len}"
            );
        }
        Op::Forward(r, byte) => {
            let (off, len) = r.resolve();
            let n = chain
                .h
                .preserve(off, len)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: preserve failed: {e}"));
            let fresh = clusters(off, len)
                .filter(|c| !model.h.0.contains_key(c))
                .count();
            assert_eq!(n, fresh as u64, "{ctx}: R50 clusters preserved");
            chain
                .s
                .write(off, Bytes::from(vec![byte; len as usize]), WriteFlags::NONE)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: S write failed: {e}"));
        }
        Op::Checkpoint => {
            let na = chain.a.make_empty().await;
            let nh = chain.h.make_empty().await;
            assert_eq!(
                (na, nh),
                (model.a.0.len() as u64, model.h.0.len() as u64),
                "{ctx}: R51 counts"
            );
        }
        Op::EmptyActive => {
            let na = chain.a.make_empty().await;
            assert_eq!(na, model.a.0.len() as u64, "{ctx}: R51 count");
        }
        Op::CommitAll => {
            let sd: Device = chain.s.clone();
            let want: std::collections::BTreeSet<u64> =
                model.a.0.keys().chain(model.h.0.keys()).copied().collect();
            let st = commit(&[chain.a.clone(), chain.h.clone()], &sd, None)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: commit failed: {e}"));
            let bytes: u64 = want.iter().map(|&c| cluster_len(c)).sum();
            assert_eq!(
                (st.clusters, st.bytes),
                (want.len() as u64, bytes),
                "{ctx}: R52 stats"
            );
        }
        Op::CommitHidden => {
            let sd: Device = chain.s.clone();
            commit(std::slice::from_ref(&chain.h), &sd, None)
                .await
                .unwrap_or_else(|e| panic!("{ctx}: commit of H failed: {e}"));
        }
    }
    model.apply(op);
    // R52: S after a commit; and every byte S holds after any step.
    assert!(chain.s.contents() == model.s, "{ctx}: S's bytes");
    let alloc = |m: &MapModel| m.0.keys().copied().collect::<Vec<u64>>();
    assert_eq!(
        chain.a.allocated_clusters(),
        alloc(&model.a),
        "{ctx}: R42 map of A"
    );
    assert_eq!(
        chain.h.allocated_clusters(),
        alloc(&model.h),
        "{ctx}: R42 map of H"
    );
}

/// Checks the whole view of A, byte for byte.
pub async fn check_view(chain: &Chain, model: &ChainModel, ctx: &str) {
    let got = chain
        .a
        .read(0, DISK_BYTES as usize)
        .await
        .unwrap_or_else(|e| panic!("{ctx}: read failed: {e}"));
    assert!(
        got[..] == model.view(0, DISK_BYTES)[..],
        "{ctx}: R43 whole view"
    );
}

/// Runs `ops` on a fresh chain (memory or file mode) against the model.
pub fn run(file: bool, ops: &[Op]) {
    crate::rt::block_on(async {
        let chain = Chain::open(file);
        let mut model = ChainModel::new();
        for (i, op) in ops.iter().enumerate() {
            step(&chain, &mut model, *op, &format!("op {i} {op:?}")).await;
        }
        check_view(&chain, &model, "end").await;
    });
}

/// The fuzz target: the first byte picks the mode, the rest are up to 64 operations.
pub fn fuzz(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(file) = bool::arbitrary(&mut u) else {
        return;
    };
    let mut ops = Vec::new();
    while ops.len() < 64 {
        match Op::arbitrary(&mut u) {
            Ok(op) => ops.push(op),
            Err(_) => break,
        }
        if u.is_empty() {
            break;
        }
    }
    run(file, &ops);
}
