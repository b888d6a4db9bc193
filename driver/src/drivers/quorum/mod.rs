//! `quorum`: N replicas of one disk, written together and voted on when read.
//!
//! Implements every rule of QUORUM.md: open-time validation (Q7–Q15), quorum-pattern reads with
//! the fast compare path and the SHA-256 vote (Q16–Q28), fifo reads (Q29–Q32), blkverify
//! (Q33–Q35), writes, write-zeroes and FUA (Q36–Q40), the flush vote (Q41), length (Q42),
//! block status (Q43–Q44), discard (Q45–Q46), out-of-sync tracking (Q47–Q51), hot add and
//! remove (Q52–Q56) and events (Q57–Q61); the differences from QEMU D1–D6; and ballot's D7–D8:
//! overlapping guest requests are ordered, so a read sees every child at the same point and a
//! repair never races a guest write.
//!
//! Healing (HEALING.md §1–4) lives in the submodules: [`sync`] is the per-child record of what
//! may be stale (H5–H9, H12), [`vote`] the vote every reader shares, [`resync`] the job that
//! copies out-of-sync granules from a voted source (H10–H16), [`verify`] the job that compares
//! whole ranges (H17–H18). This file applies the record to guest I/O: out-of-sync children do
//! not vote (H1, H2), and a write's success counts only if the child is in sync afterwards (H4).

pub mod durable;
pub mod metadata;
pub mod resync;
pub mod sync;
pub mod verify;
pub mod vote;

use std::ops::Deref;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::RwLock;

use crate::device::{
    check_request, Access, BlockDevice, BlockStatus, Device, WriteFlags, ZeroFlags,
};
use crate::error::{ConfigError, Error, ErrorKind, Result};
use crate::events::{sectors, Event, IoType};
use crate::host::Host;
use crate::jobs::JobControl;
use crate::join::{join_all_with, BoxFuture};
use crate::rangelock::{OrderedGuard, OrderedRangeLock};

use self::sync::{covered, granule_bytes, touched, ChildSync, GRANULE_BYTES};
pub use self::vote::error_vote;
use self::vote::Outcome;

/// `read-pattern`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPattern {
    /// Read every child and vote (§4).
    Quorum,
    /// Read children one after another until one answers (§5).
    Fifo,
}

/// `resync` (HEALING.md H14).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncMode {
    /// A resync job starts by itself when a reachable child goes out of sync.
    Auto,
    /// Only `x-quorum-resync` starts one.
    Manual,
}

/// `resync-inflight`'s default: granules copied at once, 2 MiB (H15 says 4; README D16: at 4
/// granules in flight the copy ran at half of nbdcopy's speed, at 32 at 0.85-0.9 of it).
pub const RESYNC_INFLIGHT_DEFAULT: usize = 32;
/// Largest `resync-inflight` accepted.
pub const RESYNC_INFLIGHT_MAX: usize = 64;
/// H15's default `resync-min-speed`, bytes per second.
pub const RESYNC_MIN_SPEED_DEFAULT_BYTES_PER_S: u64 = 8 << 20;

/// The options of a quorum node (§2).
#[derive(Debug, Clone)]
pub struct QuorumOptions {
    /// `node-name`, used as `reference` in `QUORUM_FAILURE`.
    pub node_name: String,
    /// `vote-threshold` (t).
    pub threshold: usize,
    /// `read-pattern`.
    pub read_pattern: ReadPattern,
    /// `rewrite-corrupted`.
    pub rewrite_corrupted: bool,
    /// `blkverify`.
    pub blkverify: bool,
    /// `read-only`: writes, write-zeroes and discards fail with EPERM. Rewrites still happen.
    pub read_only: bool,
    /// `discard=unmap`: discards may be forwarded (Q46); with `ignore` they do nothing.
    pub discard_unmap: bool,
    /// `resync` (H14).
    pub resync: ResyncMode,
    /// `resync-inflight` (H15).
    pub resync_inflight: usize,
    /// `resync-min-speed`, bytes per second (H15).
    pub resync_min_speed: u64,
}

impl QuorumOptions {
    /// Node `node_name` with `vote-threshold` t and §2's defaults for everything else:
    /// `read-pattern=quorum`, `rewrite-corrupted=off`, `blkverify=off`, writable, QEMU's
    /// default `discard=ignore`, and HEALING.md's `resync=auto`, `resync-inflight=4`,
    /// `resync-min-speed=8 MiB/s`.
    pub fn new(node_name: impl Into<String>, threshold: usize) -> QuorumOptions {
        QuorumOptions {
            node_name: node_name.into(),
            threshold,
            read_pattern: ReadPattern::Quorum,
            rewrite_corrupted: false,
            blkverify: false,
            read_only: false,
            discard_unmap: false,
            resync: ResyncMode::Auto,
            resync_inflight: RESYNC_INFLIGHT_DEFAULT,
            resync_min_speed: RESYNC_MIN_SPEED_DEFAULT_BYTES_PER_S,
        }
    }
}

/// Out-of-sync granularity (Q47).
pub const OUT_OF_SYNC_GRANULARITY_BYTES: u64 = GRANULE_BYTES;

/// Checks Q7–Q12 for `children` children, in the order QUORUM.md §3 gives. Run before any
/// child is opened (Q13 comes after).
///
/// # Errors
/// QEMU's message for the first failed check.
pub fn validate(
    children: usize,
    threshold: i64,
    pattern: ReadPattern,
    rewrite_corrupted: bool,
    blkverify: bool,
) -> Result<(), ConfigError> {
    if children == 0 {
        return Err(ConfigError::new(
            "Number of provided children must be 1 or more",
        ));
    }
    if threshold < 1 {
        return Err(ConfigError::new(
            "Parameter 'vote-threshold' expects a value >= 1",
        ));
    }
    if threshold as u64 > children as u64 {
        return Err(ConfigError::new("threshold may not exceed children count"));
    }
    if blkverify && pattern == ReadPattern::Fifo {
        // D2: QEMU silently ignores blkverify in fifo mode.
        return Err(ConfigError::new(
            "blkverify=on cannot be used with read-pattern=fifo",
        ));
    }
    if blkverify && (children != 2 || threshold != 2) {
        return Err(ConfigError::new(
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ));
    }
    if blkverify && rewrite_corrupted {
        return Err(ConfigError::new(
            "rewrite-corrupted=on cannot be used with blkverify=on",
        ));
    }
    Ok(())
}

/// How the quorum's voted reads were decided, and the events it emitted.
#[derive(Debug, Default)]
pub(crate) struct VoteCounters {
    /// Every copy equal: the fast compare path, no hashing (Q20).
    fast: AtomicU64,
    /// Copies differed and a version won the SHA-256 vote (Q22, Q25).
    hashed: AtomicU64,
    /// No version won: a tie or none reached the threshold (Q23, Q24).
    failed: AtomicU64,
    /// `QUORUM_REPORT_BAD` events.
    report_bad: AtomicU64,
    /// `QUORUM_FAILURE` events.
    failures: AtomicU64,
}

impl VoteCounters {
    fn count(&self, o: &Outcome) {
        let c = match o {
            Outcome::Winner { losers, .. } if losers.is_empty() => &self.fast,
            Outcome::Winner { .. } => &self.hashed,
            Outcome::Tie | Outcome::BelowThreshold => &self.failed,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }
}

/// A quorum's vote and event counters at one instant ([`Quorum::vote_counters`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VoteCounts {
    /// Voted reads whose copies were all equal (the fast path).
    pub fast: u64,
    /// Voted reads a SHA-256 vote decided.
    pub hashed: u64,
    /// Voted reads no version won.
    pub failed: u64,
    /// `QUORUM_REPORT_BAD` events emitted.
    pub report_bad: u64,
    /// `QUORUM_FAILURE` events emitted.
    pub failures: u64,
}

#[derive(Debug)]
pub(crate) struct Child {
    /// `children.<i>` (Q2, Q55).
    pub(crate) name: String,
    pub(crate) node_name: String,
    pub(crate) dev: Device,
    sync: Mutex<ChildSync>,
    /// |O_c|, mirrored so that reads of a quorum with every child in sync take no lock.
    oos_granules: AtomicU64,
    /// The device's cache epoch when last observed (H7).
    seen_epoch: AtomicU64,
}

impl Child {
    fn new(name: String, node_name: String, dev: Device) -> Child {
        let epoch = dev.cache_epoch();
        Child {
            name,
            node_name,
            dev,
            sync: Mutex::new(ChildSync::new(epoch)),
            oos_granules: AtomicU64::new(0),
            seen_epoch: AtomicU64::new(epoch),
        }
    }

    pub(crate) fn sync(&self) -> MutexGuard<'_, ChildSync> {
        self.sync.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the child is in sync on every granule of `[first, end)` (H1).
    pub(crate) fn in_sync(&self, first: u64, end: u64) -> bool {
        self.oos_granules.load(Ordering::SeqCst) == 0
            || !self.sync().out_of_sync().any_in(first, end)
    }

    /// Granules out of sync now.
    pub(crate) fn oos_granules(&self) -> u64 {
        self.oos_granules.load(Ordering::SeqCst)
    }
}

#[derive(Debug)]
pub(crate) struct Children {
    pub(crate) list: Vec<Child>,
    /// Q55's name counter.
    next: u32,
    /// Q45: every current child guarantees that discarded ranges read back as zeroes.
    discard_zeroes: bool,
}

/// A child's state in `x-query-quorum-out-of-sync` (H9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncState {
    /// Nothing out of sync.
    InSync,
    /// Out of sync and no resync job running.
    OutOfSync,
    /// Out of sync and a resync job is running.
    Syncing,
}

impl SyncState {
    /// H9's name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncState::InSync => "in-sync",
            SyncState::OutOfSync => "out-of-sync",
            SyncState::Syncing => "syncing",
        }
    }
}

/// One child's out-of-sync report (Q51, H9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfSyncReport {
    /// `children.<i>`.
    pub child: String,
    /// The child's node-name.
    pub node_name: String,
    /// Sorted, merged, aligned `(offset, length)` ranges.
    pub ranges: Vec<(u64, u64)>,
    /// H9's `state`.
    pub state: SyncState,
    /// H9's `unflushed-bytes`: granules written since the child's last completed flush.
    pub unflushed_bytes: u64,
}

impl OutOfSyncReport {
    /// Total bytes of the ranges (Q51's `dirty-bytes`).
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// The QMP form of Q51 and H9.
    pub fn to_json(&self) -> Value {
        let dirty = self.dirty_bytes();
        json!({
            "child": self.child,
            "node-name": self.node_name,
            "granularity": OUT_OF_SYNC_GRANULARITY_BYTES,
            "dirty-bytes": dirty,
            "ranges": self.ranges.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>(),
            "state": self.state.as_str(),
            "unflushed-bytes": self.unflushed_bytes,
        })
    }
}

/// What a guest request decided, for a checker that predicts results from the children's
/// answers (the simulator's oracle). Reported, through [`Quorum::set_audit`], from within the
/// request's own task, before it returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audit {
    /// A read: the children read (H1's voters, or every child when degraded), child order.
    Read {
        /// Child indices read.
        readers: Vec<usize>,
        /// Fewer than t children were in sync on the range.
        degraded: bool,
    },
    /// A write, write-zeroes or forwarded discard (H4).
    Write {
        /// Per child: a success would count (in sync before, covering every out-of-sync
        /// granule it touches, or a degraded range).
        eligible: Vec<bool>,
        /// Per child: succeeded on one cache epoch (H7), so its data is current.
        current: Vec<bool>,
    },
    /// A flush (README D14): per child, whether a successful flush counts.
    Flush {
        /// In sync, after its flush, on every granule written since the flushes that have
        /// not succeeded yet; or fewer than t children were in sync there (degraded).
        eligible: Vec<bool>,
    },
    /// H1: the children chosen to vote on granules `[first, end)`, reported the moment they
    /// are chosen (by a guest read or a resync); `degraded`: fewer than t were in sync, so
    /// every child votes.
    Voters {
        /// First granule.
        first: u64,
        /// End granule (exclusive).
        end: u64,
        /// Child indices, in child order.
        voters: Vec<usize>,
        /// Fewer than t children were in sync on the range.
        degraded: bool,
    },
    /// HEALING.md H21: the metadata node could not be updated for this request: a write
    /// stopped before any child saw it, or a write or flush whose out-of-sync marks could
    /// not be made durable; the request fails with the metadata node's error.
    MetadataFailed,
    /// A resync (or a verify's repair) holds `[offset, offset + len)` exclusively and is
    /// about to read the voters' copies of it (H10). Reported from the job's task.
    Copying {
        /// Byte offset of the run.
        offset: u64,
        /// Byte length of the run.
        len: u64,
    },
    /// A resync write of `data` at `offset` to child `child` succeeded; the range is still
    /// held (H10, HEALING.md I17: the data must still be the quorum's value there).
    Copied {
        /// Child index.
        child: usize,
        /// Byte offset.
        offset: u64,
        /// What was written.
        data: Bytes,
    },
}

/// One child's sync record as it stands, in bytes (for checkers: the simulator's I18, I20).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncView {
    /// The child's node-name.
    pub node_name: String,
    /// O_c: `(offset, length)` ranges that may differ (H6).
    pub out_of_sync: Vec<(u64, u64)>,
    /// Ranges written since the child's last completed flush (H7).
    pub unflushed: Vec<(u64, u64)>,
}

/// The audit callback.
pub type AuditFn = Arc<dyn Fn(Audit) + Send + Sync>;

/// The two kinds of job a quorum runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobKind {
    /// H10.
    Resync,
    /// H17.
    Verify,
}

/// The jobs a quorum runs (H10, H17): at most one of each kind.
#[derive(Debug, Default)]
pub(crate) struct QuorumJobs {
    pub(crate) resync: Option<Arc<JobControl>>,
    pub(crate) verify: Option<Arc<JobControl>>,
}

/// A quorum node: a handle to the shared state its jobs also hold.
#[derive(Debug)]
pub struct Quorum {
    inner: Arc<Inner>,
}

/// The quorum's state, shared by the node and its background jobs.
#[derive(Debug)]
pub struct Inner {
    pub(crate) opts: QuorumOptions,
    pub(crate) length: u64,
    align: AtomicU32,
    pub(crate) host: Host,
    pub(crate) children: RwLock<Children>,
    /// D7, D8: overlapping guest requests in arrival order; reads shared (through their
    /// repairs), writes, write-zeroes and forwarded discards exclusive. The jobs take their
    /// ranges here too (H10 exclusive, H17 shared).
    pub(crate) order: Arc<OrderedRangeLock>,
    /// Guest requests in flight (H15).
    pub(crate) guest_inflight: AtomicUsize,
    /// Bumped whenever some O_c grows: what H14's automatic start watches.
    pub(crate) marks: AtomicU64,
    /// `marks` when the last resync scan began: marks after it are news for the watcher.
    pub(crate) settled_marks: AtomicU64,
    pub(crate) jobs: Mutex<QuorumJobs>,
    audit: AuditSlot,
    /// Granules acknowledged written since the last successful quorum flush (D14).
    unflushed: Mutex<QuorumUnflushed>,
    /// The metadata node, when `metadata=NODE` (HEALING.md H19).
    pub(crate) durable: std::sync::OnceLock<Arc<durable::Durable>>,
    /// H22: granules of the intent extents an unclean shutdown left, which any resync copies
    /// with `recover=lowest` (until this process ends).
    recovering: Mutex<sync::GranuleSet>,
    /// How reads were decided and what was reported (`query-blockstats`, issue 20).
    pub(crate) counters: VoteCounters,
}

/// D14's record: granules written by acknowledged guest writes, by flush generation.
#[derive(Debug, Default)]
struct QuorumUnflushed {
    current: sync::GranuleSet,
    /// Closed by a flush that has not succeeded yet, by ticket.
    closed: std::collections::BTreeMap<u64, sync::GranuleSet>,
    next: u64,
}

/// Where the audit callback lives (a closure has no `Debug`).
#[derive(Default)]
struct AuditSlot(Mutex<Option<AuditFn>>);

impl std::fmt::Debug for AuditSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AuditSlot")
    }
}

impl Deref for Quorum {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl Drop for Quorum {
    /// The node is gone (blockdev-del, process exit): its jobs stop at their next checkpoint.
    fn drop(&mut self) {
        let jobs = self.inner.jobs();
        for j in [&jobs.resync, &jobs.verify].into_iter().flatten() {
            let _ = self.inner.host.jobs.cancel(j.id());
        }
    }
}

/// Counts a guest request in flight while alive (H15).
struct GuestRequest<'a>(&'a AtomicUsize);

impl<'a> GuestRequest<'a> {
    fn new(n: &'a AtomicUsize) -> GuestRequest<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        GuestRequest(n)
    }
}

impl Drop for GuestRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Quorum {
    /// Opens a quorum over already-opened `children` (node-name, device), in child order.
    /// The graph runs [`validate`] (Q7–Q12) before opening the children (Q13); `open` checks it
    /// again so that a direct caller cannot build a quorum that breaks Q7–Q12. With
    /// `resync=auto` inside a runtime, H14's watcher starts.
    ///
    /// # Errors
    /// Q7–Q12's messages, then Q14's `Could not refresh total sector count: <strerror>`, then
    /// a `resync-inflight` outside 1..=64.
    pub fn open(
        opts: QuorumOptions,
        children: Vec<(String, Device)>,
        host: Host,
    ) -> Result<Quorum, ConfigError> {
        validate(
            children.len(),
            opts.threshold as i64,
            opts.read_pattern,
            opts.rewrite_corrupted,
            opts.blkverify,
        )?;
        let refresh_err = |kind: ErrorKind| {
            ConfigError::new(format!("Could not refresh total sector count: {kind}"))
        };
        let mut length = None;
        for (_, dev) in &children {
            let l = dev.length().map_err(|e| refresh_err(e.kind()))?;
            match length {
                None => length = Some(l),
                // Q14: a length mismatch counts as EIO.
                Some(l0) if l0 != l => return Err(refresh_err(ErrorKind::Io)),
                Some(_) => {}
            }
        }
        if !(1..=RESYNC_INFLIGHT_MAX).contains(&opts.resync_inflight) {
            return Err(ConfigError::new(format!(
                "Parameter 'resync-inflight' expects a value between 1 and {RESYNC_INFLIGHT_MAX}"
            )));
        }
        let length = length.unwrap_or(0);
        let n = children.len();
        if 2 * opts.threshold <= n {
            // Q15, D1.
            host.warn(&format!(
                "ballot: warning: quorum node '{}': vote-threshold {} with {} children is not a strict majority; stale or tied reads are possible",
                opts.node_name, opts.threshold, n
            ));
        }
        let align = children
            .iter()
            .map(|(_, d)| d.request_alignment())
            .max()
            .unwrap_or(1);
        let list: Vec<Child> = children
            .into_iter()
            .enumerate()
            .map(|(i, (node_name, dev))| Child::new(format!("children.{i}"), node_name, dev))
            .collect();
        let discard_zeroes = list.iter().all(|c| c.dev.discard_zeroes());
        let auto = opts.resync == ResyncMode::Auto;
        let inner = Arc::new(Inner {
            counters: VoteCounters::default(),
            order: Arc::default(),
            opts,
            length,
            align: AtomicU32::new(align),
            host,
            children: RwLock::new(Children {
                list,
                next: n as u32,
                discard_zeroes,
            }),
            guest_inflight: AtomicUsize::new(0),
            marks: AtomicU64::new(0),
            settled_marks: AtomicU64::new(0),
            jobs: Mutex::default(),
            audit: AuditSlot::default(),
            unflushed: Mutex::default(),
            durable: std::sync::OnceLock::new(),
            recovering: Mutex::default(),
        });
        if auto {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(resync::watch(Arc::downgrade(&inner)));
            }
        }
        // H7 at open: a child's cache may hold writes of a previous process that no flush
        // covered (an NBD replica outlives a crash of ours), so everything counts as unflushed
        // until the child's first completed flush; a reconnection or a failed flush before it
        // marks the whole child out of sync. A `replication` child (COLO) changes only through
        // its own protocol and is left as it is.
        if let Ok(st) = inner.children.try_read() {
            if !st.list.iter().any(|c| c.dev.driver() == "replication") {
                let granules = inner.granules();
                for c in &st.list {
                    inner.update(c, |s| s.assume_unflushed(granules));
                }
            }
        }
        Ok(Quorum { inner })
    }

    /// H19: opens `dev` (node `node_name`) as this quorum's metadata node, before any guest
    /// request: loads the out-of-sync record, recovers from the intent bitmap after an unclean
    /// shutdown (H22: a resync with `recover=lowest` starts at once), or formats a blank node
    /// (every granule out of sync). Starts the cooler (H21) inside a runtime.
    ///
    /// # Errors
    /// See [`durable::Durable::open`].
    pub async fn attach_metadata(
        &self,
        node_name: &str,
        dev: Device,
        opts: &durable::MetadataOptions,
    ) -> Result<durable::OpenState, ConfigError> {
        let inner = &self.inner;
        let st = inner.children.read().await;
        let (d, state) = durable::Durable::open(inner, &st.list, node_name, dev, opts).await?;
        // H7 at open assumed everything unflushed; with a metadata node the record knows:
        // after a clean shutdown every child was flushed, after a crash the intent extents
        // are out of sync everywhere.
        for c in &st.list {
            inner.update(c, |s| s.forget_unflushed());
        }
        drop(st);
        let _ = inner.durable.set(d.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(d.clone().cool(Arc::downgrade(inner)));
        }
        if let durable::OpenState::Recovered { extents } = state {
            inner.host.log(&format!(
                "ballot: quorum '{}' was not shut down cleanly: {extents} write-intent extents out of sync on every child, resync with recover=lowest (docs/healing.md H22)",
                inner.opts.node_name
            ));
            *inner.recovering.lock().unwrap_or_else(|p| p.into_inner()) = d.recovered();
            // A resync already running (resync=auto noticed the marks of an earlier attempt)
            // copies them too, with recover=lowest on these granules.
            if extents > 0 && tokio::runtime::Handle::try_current().is_ok() && inner.jobs_idle() {
                inner
                    .start_resync(resync::ResyncRequest::default())
                    .map_err(ConfigError::new)?;
            }
        }
        Ok(state)
    }

    /// H23: a clean shutdown with a metadata node: waits for every request in flight, flushes
    /// every child, makes the out-of-sync record durable, clears the intent bitmap and sets
    /// the clean flag, in that order. Without a metadata node it does nothing.
    ///
    /// # Errors
    /// A metadata write failed: the node stays unclean and the next open recovers.
    pub async fn close(&self) -> Result<()> {
        let inner = &self.inner;
        let Some(d) = inner.durable.get() else {
            return Ok(());
        };
        let _all = inner.order(0, inner.length.max(1), true).await;
        let st = inner.children.read().await;
        inner.flush_all(&st.list).await;
        d.close(inner, &st.list).await
    }

    /// The metadata node, if any.
    pub fn durable(&self) -> Option<&Arc<durable::Durable>> {
        self.inner.durable.get()
    }

    /// Installs `f` to hear every guest request's decisions ([`Audit`]).
    pub fn set_audit(&self, f: AuditFn) {
        *self.inner.audit.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// H16: starts the resync job now (`x-quorum-resync`). Returns its id.
    ///
    /// # Errors
    /// See [`Inner::start_resync`].
    pub fn start_resync(&self, req: resync::ResyncRequest) -> std::result::Result<String, String> {
        self.inner.start_resync(req)
    }

    /// H17: starts a verify job (`x-quorum-verify`). Returns its id.
    ///
    /// # Errors
    /// See [`Inner::start_verify`].
    pub fn start_verify(&self, req: verify::VerifyRequest) -> std::result::Result<String, String> {
        self.inner.start_verify(req)
    }
}

impl Inner {
    /// H22: whether granule `g` is one a power cut left behind (recovered with
    /// `recover=lowest`).
    pub fn recovering(&self, g: u64) -> bool {
        self.recovering
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(g)
    }

    /// The options this node was opened with.
    pub fn options(&self) -> &QuorumOptions {
        &self.opts
    }

    /// Whether no resync or verify job of this quorum is running.
    pub fn jobs_idle(&self) -> bool {
        let j = self.jobs();
        j.resync.is_none() && j.verify.is_none()
    }

    /// The process's job registry this quorum's jobs are in.
    pub fn host_jobs(&self) -> crate::jobs::Jobs {
        self.host.jobs.clone()
    }

    /// H16: registers this quorum's job of `kind` (id `job_id`, default `<node>-resync` or
    /// `<node>-verify`) in status `created`.
    ///
    /// # Errors
    /// `Quorum '<Q>' already has a resync job` (or verify); the registry's id errors.
    pub(crate) fn register_job(
        &self,
        kind: JobKind,
        job_id: Option<String>,
        speed: u64,
        auto_dismiss: bool,
    ) -> std::result::Result<Arc<JobControl>, String> {
        let (word, job_type) = match kind {
            JobKind::Resync => ("resync", "x-resync"),
            JobKind::Verify => ("verify", "x-verify"),
        };
        let mut jobs = self.jobs();
        let slot = match kind {
            JobKind::Resync => &mut jobs.resync,
            JobKind::Verify => &mut jobs.verify,
        };
        if slot.is_some() {
            return Err(format!(
                "Quorum '{}' already has a {word} job",
                self.opts.node_name
            ));
        }
        let id = job_id.unwrap_or_else(|| format!("{}-{word}", self.opts.node_name));
        let ctl = self.host.jobs.create(&id, job_type, speed, auto_dismiss)?;
        *slot = Some(ctl.clone());
        Ok(ctl)
    }

    pub(crate) fn jobs(&self) -> MutexGuard<'_, QuorumJobs> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `(child name, node-name)` of every child, in child order.
    pub async fn child_names(&self) -> Vec<(String, String)> {
        self.children
            .read()
            .await
            .list
            .iter()
            .map(|c| (c.name.clone(), c.node_name.clone()))
            .collect()
    }

    /// The node's running or concluded resync and verify jobs (their progress).
    pub fn job_infos(&self) -> Vec<crate::jobs::JobInfo> {
        let j = self.jobs();
        [&j.resync, &j.verify]
            .into_iter()
            .flatten()
            .map(|c| c.info())
            .collect()
    }

    /// How voted reads were decided, and the events emitted, since the node opened.
    pub fn vote_counters(&self) -> VoteCounts {
        let c = &self.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        VoteCounts {
            fast: g(&c.fast),
            hashed: g(&c.hashed),
            failed: g(&c.failed),
            report_bad: g(&c.report_bad),
            failures: g(&c.failures),
        }
    }

    /// Q51, H9: the out-of-sync record of every child, in child order.
    pub async fn out_of_sync(&self) -> Vec<OutOfSyncReport> {
        let st = self.children.read().await;
        let syncing = self.jobs().resync.is_some();
        st.list
            .iter()
            .map(|c| {
                self.observe(c);
                let s = c.sync();
                let bytes = |runs: Vec<(u64, u64)>| -> Vec<(u64, u64)> {
                    runs.into_iter()
                        .map(|(a, b)| (a * GRANULE_BYTES, granule_bytes(a, b, self.length)))
                        .collect()
                };
                let ranges = bytes(s.out_of_sync().runs());
                let unflushed_bytes = bytes(s.unflushed().runs()).iter().map(|r| r.1).sum();
                let state = match (ranges.is_empty(), syncing) {
                    (true, _) => SyncState::InSync,
                    (false, true) => SyncState::Syncing,
                    (false, false) => SyncState::OutOfSync,
                };
                OutOfSyncReport {
                    child: c.name.clone(),
                    node_name: c.node_name.clone(),
                    ranges,
                    state,
                    unflushed_bytes,
                }
            })
            .collect()
    }

    /// Every child's sync record as it stands, in child order, without waiting: `None` when
    /// the child list is being changed (a checker samples again later). Unlike
    /// `out_of_sync` it does not look at the devices' cache epochs first, so a
    /// reconnection the quorum has not noticed yet is not in it.
    pub fn sync_view(&self) -> Option<Vec<SyncView>> {
        let st = self.children.try_read().ok()?;
        let bytes = |runs: Vec<(u64, u64)>| -> Vec<(u64, u64)> {
            runs.into_iter()
                .map(|(a, b)| (a * GRANULE_BYTES, granule_bytes(a, b, self.length)))
                .collect()
        };
        Some(
            st.list
                .iter()
                .map(|c| {
                    let s = c.sync();
                    SyncView {
                        node_name: c.node_name.clone(),
                        out_of_sync: bytes(s.out_of_sync().runs()),
                        unflushed: bytes(s.unflushed().runs()),
                    }
                })
                .collect(),
        )
    }

    /// Applies `f` to `child`'s sync record; keeps the lock-free count and H14's trigger.
    pub(crate) fn update<R>(&self, child: &Child, f: impl FnOnce(&mut ChildSync) -> R) -> R {
        let mut s = child.sync();
        let before = s.out_of_sync().len();
        let r = f(&mut s);
        let after = s.out_of_sync().len();
        child.oos_granules.store(after, Ordering::SeqCst);
        drop(s);
        if after > before {
            self.marks.fetch_add(1, Ordering::SeqCst);
        }
        r
    }

    /// H7: notices a new cache epoch of `child` (an `nbd` child reconnected).
    pub(crate) fn observe(&self, child: &Child) {
        let epoch = child.dev.cache_epoch();
        // Lock-free when nothing changed, which is every request but the first after a
        // reconnection.
        if child.seen_epoch.load(Ordering::SeqCst) != epoch {
            // Recorded before the fast path may skip it (observe is idempotent).
            self.update(child, |s| s.observe(epoch));
            child.seen_epoch.store(epoch, Ordering::SeqCst);
        }
    }

    /// Number of granules of the disk.
    pub(crate) fn granules(&self) -> u64 {
        self.length.div_ceil(GRANULE_BYTES)
    }

    /// Hot add (Q54 steps 4–7; steps 1–3 are the graph's). Waits for requests in flight and
    /// holds new ones until done (Q56). The new child starts out of sync everywhere (H8).
    /// Returns the new child's name.
    ///
    /// # Errors
    /// Q54's messages.
    pub async fn add_child(&self, node_name: &str, dev: Device) -> Result<String, ConfigError> {
        if self.opts.blkverify {
            return Err(ConfigError::new(
                "Cannot add a child to a quorum in blkverify mode",
            ));
        }
        // D4: QEMU accepts another length and notices only at the next refresh.
        let child_len = dev.length().map_err(|e| ConfigError::new(e.to_string()))?;
        if child_len != self.length {
            return Err(ConfigError::new(format!(
                "Cannot add child '{node_name}' to quorum '{}': its length {child_len} differs from the quorum's length {}",
                self.opts.node_name, self.length
            )));
        }
        let mut st = self.children.write().await;
        if st.next == u32::MAX {
            return Err(ConfigError::new("Too many children"));
        }
        let name = format!("children.{}", st.next);
        st.next += 1;
        self.align
            .fetch_max(dev.request_alignment(), Ordering::Relaxed);
        let child = Child::new(name.clone(), node_name.to_string(), dev);
        let granules = self.granules();
        self.update(&child, |s| s.mark_all(granules));
        let st = &mut *st;
        match self.durable.get() {
            // H19: the new child's bitmap (all out of sync) and the new layout are durable
            // before the child takes a write.
            Some(d) => {
                let n = st.list.len() + 1;
                if let Err(m) = d.relayout(self, &mut st.list, n, |l| l.push(child)).await {
                    st.next -= 1;
                    return Err(ConfigError::new(format!(
                        "Cannot add child '{node_name}' to quorum '{}': {m}",
                        self.opts.node_name
                    )));
                }
            }
            None => st.list.push(child),
        }
        st.discard_zeroes = st.list.iter().all(|c| c.dev.discard_zeroes());
        Ok(name)
    }

    /// Hot remove (Q53 steps 3–4). Waits for requests in flight, and for the resync's
    /// granule in flight (Q56, H16). Returns the removed child's node-name.
    ///
    /// # Errors
    /// Q53's messages.
    pub async fn remove_child(&self, child: &str) -> Result<String, ConfigError> {
        let mut st = self.children.write().await;
        let Some(pos) = st.list.iter().position(|c| c.name == child) else {
            return Err(ConfigError::new(format!(
                "Node '{}' does not have child '{child}'",
                self.opts.node_name
            )));
        };
        if st.list.len() <= self.opts.threshold {
            return Err(ConfigError::new(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.opts.threshold
            )));
        }
        let st = &mut *st;
        let removed = match self.durable.get() {
            Some(d) => {
                let n = st.list.len() - 1;
                d.relayout(self, &mut st.list, n, |l| l.remove(pos))
                    .await
                    .map_err(|m| {
                        ConfigError::new(format!(
                            "Cannot remove child '{child}' from quorum '{}': {m}",
                            self.opts.node_name
                        ))
                    })?
            }
            None => st.list.remove(pos),
        };
        // Q55: removing the most recently numbered child gives its number back.
        if st
            .next
            .checked_sub(1)
            .is_some_and(|last| removed.name == format!("children.{last}"))
        {
            st.next -= 1;
        }
        st.discard_zeroes = st.list.iter().all(|c| c.dev.discard_zeroes());
        Ok(removed.node_name)
    }

    /// D8: waits for earlier overlapping requests, then holds `[offset, offset + len)`.
    pub(crate) async fn order(&self, offset: u64, len: u64, exclusive: bool) -> OrderedGuard {
        self.order.lock(offset, offset + len, exclusive).await
    }

    pub(crate) fn report_bad(
        &self,
        io: IoType,
        error: Option<ErrorKind>,
        child: &Child,
        sn: u64,
        sc: u64,
    ) {
        self.counters.report_bad.fetch_add(1, Ordering::Relaxed);
        self.host.events.emit(Event::QuorumReportBad {
            io,
            error,
            node_name: child.node_name.clone(),
            sector_num: sn,
            sectors_count: sc,
        });
    }

    pub(crate) fn failure(&self, sn: u64, sc: u64) {
        self.counters.failures.fetch_add(1, Ordering::Relaxed);
        self.host.events.emit(Event::QuorumFailure {
            reference: self.opts.node_name.clone(),
            sector_num: sn,
            sectors_count: sc,
        });
    }

    /// Range and alignment check against the quorum's length, before any child is touched.
    fn check(&self, offset: u64, len: u64, access: Access) -> Result<()> {
        check_request(self.length, self.request_alignment(), offset, len, access)
    }

    fn check_writable(&self, op: &str) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::new(
                ErrorKind::Perm,
                format!("{op} on read-only quorum '{}'", self.opts.node_name),
            ));
        }
        Ok(())
    }

    fn verdict(&self, kind: ErrorKind, what: &str, offset: u64, len: u64) -> Error {
        Error::new(
            kind,
            format!(
                "quorum '{}' {what} at offset {offset} length {len}",
                self.opts.node_name
            ),
        )
    }

    /// H1: the children that vote on granules `[first, end)`: those in sync on all of them
    /// when there are at least t, otherwise (a degraded range) every child. Child order.
    pub(crate) fn voters(&self, st: &Children, first: u64, end: u64) -> (Vec<usize>, bool) {
        // H7 at once: a child that reconnected since its last request may have lost writes
        // that no flush covered; they must not vote as if in sync.
        for c in &st.list {
            self.observe(c);
        }
        let in_sync: Vec<usize> = (0..st.list.len())
            .filter(|&i| st.list[i].in_sync(first, end))
            .collect();
        let (voters, degraded) = if in_sync.len() >= self.opts.threshold {
            (in_sync, false)
        } else {
            ((0..st.list.len()).collect(), true)
        };
        self.audit(|| Audit::Voters {
            first,
            end,
            voters: voters.clone(),
            degraded,
        });
        (voters, degraded)
    }

    /// One child write whose outcome is recorded (H5–H7): `op` runs between two looks at the
    /// device's cache epoch. Returns the write's result.
    pub(crate) async fn write_child<'a>(
        &'a self,
        child: &'a Child,
        offset: u64,
        len: u64,
        op: BoxFuture<'a, Result<()>>,
    ) -> Result<()> {
        let before = child.dev.cache_epoch();
        let r = op.await;
        self.record_write(child, offset, len, r.is_ok(), before);
        r
    }

    /// Records a write's outcome on `child`; returns whether the child now holds the written
    /// data as current (success on one epoch).
    fn record_write(&self, child: &Child, offset: u64, len: u64, ok: bool, before: u64) -> bool {
        let (first, end) = touched(offset, len);
        let whole = covered(offset, len, self.length);
        let after = child.dev.cache_epoch();
        self.update(child, |s| s.wrote(first, end, whole, ok, before, after));
        ok && before == after
    }

    /// Reports the decision `make` builds to the audit hook, if one is installed; without a
    /// hook nothing is built (reads and writes pay no copies for it).
    pub(crate) fn audit(&self, make: impl FnOnce() -> Audit) {
        let f = self
            .audit
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(f) = f {
            f(make());
        }
    }

    /// Every child flushes at once, outcomes recorded (H7); failures are reported. For the
    /// background flushes of the metadata node (H21, H23), not the guest's (Q41's order).
    pub(crate) async fn flush_all(&self, list: &[Child]) {
        let futs: Vec<BoxFuture<'_, Result<()>>> = list
            .iter()
            .map(|c| -> BoxFuture<'_, Result<()>> { Box::pin(self.flush_child(c)) })
            .collect();
        join_all_with(futs, |i, r| {
            if let Err(e) = r {
                self.report_bad(IoType::Flush, Some(e.kind()), &list[i], 0, 0);
            }
        })
        .await;
    }

    /// One child flush whose outcome is recorded (H7, H12).
    pub(crate) async fn flush_child(&self, child: &Child) -> Result<()> {
        let epoch = child.dev.cache_epoch();
        let ticket = self.update(child, |s| s.flush_started(epoch));
        let r = child.dev.flush().await;
        let after = child.dev.cache_epoch();
        self.update(child, |s| s.flush_done(ticket, r.is_ok(), after));
        r
    }

    async fn read_quorum(&self, st: &Children, offset: u64, len: usize) -> Result<Bytes> {
        let (sn, sc) = sectors(offset, len as u64);
        let (first, end) = touched(offset, len as u64);
        // H1: out-of-sync children are not read, unless the range is degraded.
        let (mut readers, mut degraded) = self.voters(st, first, end);
        let read_some = |who: Vec<usize>| async move {
            let futs: Vec<BoxFuture<'_, Result<Bytes>>> = who
                .iter()
                .map(|&i| st.list[i].dev.read(offset, len))
                .collect();
            // Q16, Q17: wait for every child; report each I/O error as its child completes.
            join_all_with(futs, |k, r| {
                if let Err(e) = r {
                    self.report_bad(IoType::Read, Some(e.kind()), &st.list[who[k]], sn, sc);
                }
            })
            .await
        };
        let mut results = read_some(readers.clone()).await;
        let answered = results.iter().filter(|r| r.is_ok()).count();
        if answered < self.opts.threshold && readers.len() < st.list.len() {
            // ballot's addition to H1 (README D9): when the in-sync voters cannot answer with
            // t copies, the range is treated as degraded and the out-of-sync children vote
            // too, as in QEMU, rather than failing a read another copy could serve.
            let rest: Vec<usize> = (0..st.list.len())
                .filter(|i| !readers.contains(i))
                .collect();
            results.extend(read_some(rest.clone()).await);
            readers.extend(rest);
            degraded = true;
        }
        // Child order, as every other path reports and votes.
        let mut pairs: Vec<(usize, Result<Bytes>)> = readers.into_iter().zip(results).collect();
        pairs.sort_by_key(|(i, _)| *i);
        let (readers, results): (Vec<usize>, Vec<Result<Bytes>>) = pairs.into_iter().unzip();
        self.audit(|| Audit::Read {
            readers: readers.clone(),
            degraded,
        });
        let ok: Vec<(usize, &Bytes)> = results
            .iter()
            .zip(&readers)
            .filter_map(|(r, &i)| r.as_ref().ok().map(|b| (i, b)))
            .collect();
        for (i, b) in &ok {
            assert_eq!(b.len(), len, "child {i} returned a short read buffer");
        }
        let t = self.opts.threshold;
        if ok.len() < t {
            // Q18.
            let kind = error_vote(results.iter().filter_map(|r| r.as_ref().err()));
            self.failure(sn, sc);
            return Err(self.verdict(kind, "read below threshold", offset, len as u64));
        }
        let (_, first_copy) = ok[0];
        if self.opts.blkverify {
            if let Some((_, b)) = ok[1..].iter().find(|(_, b)| *b != first_copy) {
                // Q33, D6.
                let at = first_copy
                    .iter()
                    .zip(b.iter())
                    .position(|(x, y)| x != y)
                    .unwrap_or(0);
                self.host.fatal(&format!(
                    "quorum: offset={offset} bytes={len} contents mismatch at offset {}",
                    offset + at as u64
                ));
                return Err(self.verdict(ErrorKind::Io, "blkverify mismatch", offset, len as u64));
            }
        }
        let copies: Vec<(usize, &[u8])> = ok.iter().map(|(i, b)| (*i, &b[..])).collect();
        let outcome = vote::vote(&copies, t);
        self.counters.count(&outcome);
        match outcome {
            Outcome::Tie => {
                // Q23, D1: a tie means nobody can say which data is current.
                self.failure(sn, sc);
                Err(self.verdict(
                    ErrorKind::Io,
                    "read tie between versions",
                    offset,
                    len as u64,
                ))
            }
            Outcome::BelowThreshold => {
                // Q24.
                self.failure(sn, sc);
                Err(self.verdict(
                    ErrorKind::Io,
                    "read with no version reaching the threshold",
                    offset,
                    len as u64,
                ))
            }
            Outcome::Winner { members, losers } => {
                // Q25, Q60: mismatch events in ascending child order (H2: readers only).
                for &i in &losers {
                    self.report_bad(IoType::Read, None, &st.list[i], sn, sc);
                }
                let data = ok
                    .iter()
                    .find(|(i, _)| *i == members[0])
                    .map(|(_, b)| (*b).clone())
                    .unwrap_or_default();
                if self.opts.rewrite_corrupted {
                    // Q26–Q28.
                    self.rewrite(st, &losers, offset, &data).await;
                }
                Ok(data)
            }
        }
    }

    /// Q27, Q28, Q32: write `data` over the whole request range to `targets` concurrently;
    /// failures are recorded (Q49) and change nothing else. D7: the read holds its range
    /// (D8) until the repair has finished, so no guest write can land between the vote and the
    /// repair and be undone by it.
    async fn rewrite(&self, st: &Children, targets: &[usize], offset: u64, data: &Bytes) {
        if targets.is_empty() {
            return;
        }
        let len = data.len() as u64;
        let futs: Vec<BoxFuture<'_, Result<()>>> = targets
            .iter()
            .map(|&i| -> BoxFuture<'_, Result<()>> {
                let c = &st.list[i];
                Box::pin(self.write_child(
                    c,
                    offset,
                    len,
                    c.dev.write(offset, data.clone(), WriteFlags::NONE),
                ))
            })
            .collect();
        join_all_with(futs, |_, _| {}).await;
    }

    async fn read_fifo(&self, st: &Children, offset: u64, len: usize) -> Result<Bytes> {
        let (sn, sc) = sectors(offset, len as u64);
        let (first, end) = touched(offset, len as u64);
        // H1: out-of-sync children are skipped, unless the range is degraded; as a last
        // resort (README D9) they are tried after the in-sync ones, in child order.
        let (mut readers, degraded) = self.voters(st, first, end);
        readers.extend(
            (0..st.list.len())
                .filter(|i| !readers.contains(i))
                .collect::<Vec<_>>(),
        );
        self.audit(|| Audit::Read {
            readers: readers.clone(),
            degraded,
        });
        let mut last_err = None;
        for (k, &i) in readers.iter().enumerate() {
            let child = &st.list[i];
            match child.dev.read(offset, len).await {
                Ok(data) => {
                    assert_eq!(data.len(), len, "child {i} returned a short read buffer");
                    if self.opts.rewrite_corrupted {
                        // Q32, D2: repair the children that failed before this one (none when
                        // the first child answered: rewrite returns at once).
                        self.rewrite(st, &readers[..k], offset, &data).await;
                    }
                    return Ok(data);
                }
                Err(e) => {
                    // Q30: report before trying the next child.
                    self.report_bad(IoType::Read, Some(e.kind()), child, sn, sc);
                    last_err = Some(e);
                }
            }
        }
        // Q30: the last child's error, no FAILURE.
        Err(last_err.unwrap_or_else(|| {
            self.verdict(ErrorKind::Io, "read with no children", offset, len as u64)
        }))
    }

    /// Q36–Q39 for writes and write-zeroes; Q46 for forwarded discards. H3: every child gets
    /// the request; H4: a success counts only if the child is in sync over the range
    /// afterwards (it was before, or the write covers every out-of-sync granule it touches),
    /// or the range is degraded.
    async fn write_vote<'a, F>(
        &'a self,
        st: &'a Children,
        offset: u64,
        len: u64,
        what: &str,
        op: F,
    ) -> Result<()>
    where
        F: Fn(&'a Device) -> BoxFuture<'a, Result<()>>,
    {
        let (sn, sc) = sectors(offset, len);
        let (first, end) = touched(offset, len);
        let whole = covered(offset, len, self.length);
        let (voters, degraded) = self.voters(st, first, end);
        // H21: the write intent is durable before any child sees the write.
        let _intent = match self.durable.get() {
            Some(d) => match d.begin_write(self, &st.list, offset, len).await {
                Ok(g) => Some(g),
                Err(e) => {
                    self.audit(|| Audit::MetadataFailed);
                    return Err(e);
                }
            },
            None => None,
        };
        let before: Vec<u64> = st.list.iter().map(|c| c.dev.cache_epoch()).collect();
        let futs: Vec<BoxFuture<'a, Result<()>>> = st.list.iter().map(|c| op(&c.dev)).collect();
        let mut current = vec![false; st.list.len()];
        let results = join_all_with(futs, |i, r| {
            let c = &st.list[i];
            // Q49, H6, H7: recorded before the result is returned.
            current[i] = self.record_write(c, offset, len, r.is_ok(), before[i]);
            if let Err(e) = r {
                // Q37.
                self.report_bad(IoType::Write, Some(e.kind()), c, sn, sc);
            }
        })
        .await;
        let eligible: Vec<bool> = (0..st.list.len())
            .map(|i| {
                degraded || voters.contains(&i) || {
                    // H4, H5: every out-of-sync granule it touches is covered whole.
                    let s = st.list[i].sync();
                    let oos = s.out_of_sync();
                    !oos.any_in(first, whole.0.max(first)) && !oos.any_in(whole.1.max(first), end)
                }
            })
            .collect();
        let s = (0..st.list.len())
            .filter(|&i| current[i] && eligible[i])
            .count();
        self.audit(|| Audit::Write { eligible, current });
        assert!(s <= st.list.len(), "write count exceeds children");
        // H21: the out-of-sync marks this write made are durable before it returns; when
        // they cannot be, a write the vote accepted fails.
        let persisted = self.persist_marks(st).await;
        if let Err(e) = &persisted {
            self.audit(|| Audit::MetadataFailed);
            if s >= self.opts.threshold {
                return Err(e.clone());
            }
        }
        if s >= self.opts.threshold {
            // D14: the next flush must make this durable on t children.
            self.unflushed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .current
                .insert_range(first, end);
            return Ok(());
        }
        // Q39: error vote, FAILURE after all children completed, no rollback.
        let kind = if results.iter().any(|r| r.is_err()) {
            error_vote(results.iter().filter_map(|r| r.as_ref().err()))
        } else {
            // H4: the successes were on children that stay out of sync.
            ErrorKind::Io
        };
        self.failure(sn, sc);
        Err(self.verdict(kind, what, offset, len))
    }

    /// Q41 with ballot's D14: a child's flush success counts only if, after it, the child is
    /// in sync on every granule acknowledged written since the last successful quorum flush
    /// (a child that missed such a write, or lost it with its cache, makes nothing durable),
    /// unless fewer than t children were in sync there (degraded: every success counts).
    async fn flush_vote(&self, st: &Children) -> Result<()> {
        let (ticket, written) = {
            let mut u = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
            let ticket = u.next;
            u.next += 1;
            let closed = std::mem::take(&mut u.current);
            u.closed.insert(ticket, closed);
            let mut all = sync::GranuleSet::default();
            for g in u.closed.values() {
                all.union_with(g);
            }
            (ticket, all.runs())
        };
        let in_sync_on_written = |c: &Child| written.iter().all(|&(a, b)| c.in_sync(a, b));
        let degraded =
            st.list.iter().filter(|c| in_sync_on_written(c)).count() < self.opts.threshold;
        let mut errors = Vec::new();
        let mut eligible = Vec::with_capacity(st.list.len());
        let mut s = 0usize;
        // Q41: one after another, in child order.
        for child in &st.list {
            let r = self.flush_child(child).await;
            let counts = degraded || in_sync_on_written(child);
            eligible.push(counts);
            match r {
                Ok(()) if counts => s += 1,
                Ok(()) => {}
                Err(e) => {
                    self.report_bad(IoType::Flush, Some(e.kind()), child, 0, 0);
                    errors.push(e);
                }
            }
        }
        self.audit(|| Audit::Flush { eligible });
        // H21: a failed child flush marked its unflushed granules; durable before returning.
        if let Err(e) = self.persist_marks(st).await {
            self.audit(|| Audit::MetadataFailed);
            return Err(e);
        }
        if s >= self.opts.threshold {
            let mut u = self.unflushed.lock().unwrap_or_else(|p| p.into_inner());
            let later = u.closed.split_off(&(ticket + 1));
            u.closed = later;
            Ok(())
        } else {
            // Never FAILURE for a flush.
            Err(Error::new(
                if errors.is_empty() {
                    ErrorKind::Io
                } else {
                    error_vote(errors.iter())
                },
                format!("quorum '{}' flush below threshold", self.opts.node_name),
            ))
        }
    }

    async fn guest_read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(offset, len as u64, Access::Read)?;
        let _guest = GuestRequest::new(&self.guest_inflight);
        let _order = self.order(offset, len as u64, false).await;
        let st = self.children.read().await;
        let r = match self.opts.read_pattern {
            ReadPattern::Quorum => self.read_quorum(&st, offset, len).await,
            ReadPattern::Fifo => self.read_fifo(&st, offset, len).await,
        };
        // H21: marks a read made (H7: a reconnection noticed, a repair that failed) are
        // durable before it returns; the data is right either way, so a metadata error is
        // left to the next write or flush to report.
        let _ = self.persist_marks(&st).await;
        r
    }

    /// H21: makes the out-of-sync marks made so far durable (nothing without a metadata node).
    pub(crate) async fn persist_marks(&self, st: &Children) -> Result<()> {
        match self.durable.get() {
            Some(d) => d.persist_marks(self, &st.list).await,
            None => Ok(()),
        }
    }

    async fn guest_write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.check_writable("write")?;
        let len = data.len() as u64;
        self.check(offset, len, Access::Write)?;
        let _guest = GuestRequest::new(&self.guest_inflight);
        let _order = self.order(offset, len, true).await;
        let st = self.children.read().await;
        // Q40: children get the write without FUA; a successful vote is followed by a flush.
        self.write_vote(&st, offset, len, "write below threshold", |dev| {
            dev.write(offset, data.clone(), WriteFlags::NONE)
        })
        .await?;
        if flags.fua {
            return self.flush_vote(&st).await;
        }
        Ok(())
    }

    async fn guest_flush(&self) -> Result<()> {
        let _guest = GuestRequest::new(&self.guest_inflight);
        let st = self.children.read().await;
        self.flush_vote(&st).await
    }

    async fn guest_write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable("write-zeroes")?;
        self.check(offset, len, Access::Write)?;
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.opts.discard_unmap,
            ..flags
        };
        let _guest = GuestRequest::new(&self.guest_inflight);
        let _order = self.order(offset, len, true).await;
        let st = self.children.read().await;
        // Q36, Q40: write-zeroes passes the caller's flags, FUA included, to every child.
        self.write_vote(&st, offset, len, "write-zeroes below threshold", |dev| {
            dev.write_zeroes(offset, len, flags)
        })
        .await
    }

    async fn guest_discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, Access::Read)?;
        if !self.opts.discard_unmap || len == 0 {
            return Ok(());
        }
        let _guest = GuestRequest::new(&self.guest_inflight);
        // D8 before the children's lock, as every request takes them (a hot add waiting for
        // the children's lock must not sit between the two).
        let _order = self.order(offset, len, true).await;
        let st = self.children.read().await;
        // Q45, Q46, D3: forward only when every child guarantees zeroes afterwards.
        if !st.discard_zeroes {
            return Ok(());
        }
        self.check_writable("discard")?;
        // H5 speaks of writes and write-zeroes only: a discard clears nothing, so it is
        // recorded as covering no granule whole.
        self.write_vote(&st, offset, len, "discard below threshold", |dev| {
            dev.discard(offset, len)
        })
        .await
    }

    async fn guest_block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check(offset, len, Access::Read)?;
        if len == 0 {
            return Ok(BlockStatus::data(0));
        }
        let st = self.children.read().await;
        let (sn, sc) = sectors(offset, len);
        let mut all_zero = true;
        let mut zero_len = u64::MAX;
        let mut data_len = 0u64;
        for child in &st.list {
            match child.dev.block_status(offset, len).await {
                Ok(s) => {
                    let l = s.length.clamp(1, len);
                    if s.zero {
                        zero_len = zero_len.min(l);
                    } else {
                        all_zero = false;
                        data_len = data_len.max(l);
                    }
                }
                Err(e) => {
                    // Q43: report, answer DATA over the whole count, stop querying.
                    self.report_bad(IoType::Read, Some(e.kind()), child, sn, sc);
                    return Ok(BlockStatus::data(len));
                }
            }
        }
        // Q44.
        Ok(if all_zero {
            BlockStatus::zero(zero_len)
        } else {
            BlockStatus::data(data_len)
        })
    }

    fn request_alignment(&self) -> u32 {
        self.align.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl BlockDevice for Quorum {
    fn driver(&self) -> &'static str {
        "quorum"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.length)
    }

    fn request_alignment(&self) -> u32 {
        self.inner.request_alignment()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.guest_read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.inner.guest_write(offset, data, flags).await
    }

    async fn flush(&self) -> Result<()> {
        self.inner.guest_flush().await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.inner.guest_write_zeroes(offset, len, flags).await
    }

    fn can_fast_zero(&self) -> bool {
        false
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.guest_discard(offset, len).await
    }

    fn discard_zeroes(&self) -> bool {
        // Non-blocking view: only a hot add or remove changes it, and those hold the write
        // lock briefly; when contended, answer the safe `false`.
        match self.children.try_read() {
            Ok(st) => self.opts.discard_unmap && st.discard_zeroes,
            Err(_) => false,
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.inner.guest_block_status(offset, len).await
    }
}
