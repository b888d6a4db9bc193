//! `vdisk`: the simulator's virtual disk with local-disk faults (SIMULATION.md §3.4, §4, §5).
//!
//! Every child disk of a run lives in one [`DiskSet`], the facade the topologies call; each
//! disk is a [`VDisk`] block device. What the disks store and share is `diskstate` (the layers
//! of each disk: durable sectors, the current view, pending writes in write order; its
//! per-sector fault map and budget marks); fault injection is `vfaults`, crashes `crash`, and
//! the budget ledger's questions `ledger`. Faults never touch the stored values: corruption is
//! applied when a sector is read (V1, V5), and any write of a sector clears its faults.
//! Injection checks the fault budget across all disks first (B2-B4) and counts what it
//! skipped. Every child operation is logged against the guest op that caused it (a task-local
//! id, the op log of `oplog`), so the oracle can recompute the quorum's vote and events from
//! what the children really answered.

use crate::ids::{Fault, Rule};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use ballot::device::{check_request, Access};
use ballot::{BlockDevice, Error, ErrorKind, Result, WriteFlags, ZeroFlags};
use bytes::Bytes;

use crate::childimage::{ChildImage, Fail, Held};
use crate::crash::image_crash;
pub use crate::diskstate::{
    current_op, Armed, Counters, CrashReport, FaultMark, Mark, Sticky, GUEST_OP,
};
use crate::diskstate::{flush_disk, DiskState, Inner, Pending, INFLIGHT_PER_DISK_MAX};
pub use crate::oplog::{ChildKind, ChildOp, ChildResult};
pub use crate::params::{Budget, FaultRates, Latency};
use crate::rng::Rng;
use crate::runlog::RunLog;
pub use crate::sector::Stored;
use crate::sector::{data_digest, decode, digest_fingerprints, Decoded, Value, SECTOR, SECTOR_U64};
use crate::trace::Trace;

/// All child disks of one run, with their shared fault state, ledger, op log and trace.
pub struct DiskSet {
    inner: Mutex<Inner>,
    /// Child images by disk (`topology.child_image`, [`crate::childimage`]).
    images: Mutex<Vec<Option<Arc<ChildImage>>>>,
    /// The first rule a child image broke.
    image_fail: Mutex<Option<Fail>>,
}

/// Configuration of a disk set.
#[derive(Debug, Clone)]
pub struct DiskSetConfig {
    /// Run seed (content-seeded corruption, V5).
    pub seed: u64,
    /// Sectors per disk, one entry per child (F11 makes one differ).
    pub sectors: Vec<u64>,
    /// Vote threshold t.
    pub t: usize,
    /// Read pattern fifo (B4).
    pub fifo: bool,
    /// Budget mode.
    pub budget: Budget,
    /// Random fault rates.
    pub rates: FaultRates,
    /// Per-disk latency.
    pub latency: Vec<Latency>,
    /// Initial image: write 0 (true) or zeros.
    pub initial_pattern: bool,
    /// Whether discards zero the range (and so may be forwarded by quorum, Q45).
    pub discard_zeroes: bool,
    /// Sectors the largest request spans (guest ops and scrub reads).
    pub window_sectors: u64,
    /// F9 tears between sectors only: a sector is old or new, never a mix (runs with a
    /// metadata node: H22's recovery takes some child's copy where no version has t votes,
    /// which is a version only on sector-atomic media).
    pub sector_atomic: bool,
    /// Node-name prefix of the children: `c` for local vdisks, `r` for NBD replicas.
    pub prefix: &'static str,
}

impl DiskSet {
    /// Creates the disks, all holding the initial image (V6).
    pub fn new(cfg: DiskSetConfig, log: Arc<RunLog>) -> Arc<DiskSet> {
        let n = cfg.sectors.len();
        let fault_base = Rng::stream(cfg.seed, "faults");
        let lat_base = Rng::stream(cfg.seed, "latency");
        let disks = (0..n)
            .map(|i| {
                let sectors = cfg.sectors[i];
                let init: Vec<Stored> = (0..sectors)
                    .map(|s| {
                        Stored::V(if cfg.initial_pattern {
                            Value::Data { id: 0, sector: s }
                        } else {
                            Value::Zero
                        })
                    })
                    .collect();
                DiskState {
                    name: format!("{}{i}", cfg.prefix),
                    sectors,
                    durable: init.clone(),
                    current: init,
                    pending: Vec::new(),
                    sticky: BTreeMap::new(),
                    marks: BTreeMap::new(),
                    damage: BTreeMap::new(),
                    misdirect: None,
                    armed: Vec::new(),
                    latency: cfg.latency[i].clone(),
                    lat_rng: lat_base.fork("disk", i as u64),
                    fault_rng: fault_base.fork("disk", i as u64),
                    discard_zeroes: cfg.discard_zeroes,
                }
            })
            .collect();
        Arc::new(DiskSet {
            inner: Mutex::new(Inner {
                disks,
                n,
                t: cfg.t,
                fifo: cfg.fifo,
                budget: cfg.budget,
                rates: cfg.rates,
                injecting: true,
                window_sectors: cfg.window_sectors,
                sector_atomic: cfg.sector_atomic,
                seed: cfg.seed,
                oplog: BTreeMap::new(),
                down: vec![false; n],
                counters: Counters::default(),
                log,
                start: tokio::time::Instant::now(),
                landed: None,
            }),
            images: Mutex::new(vec![None; n]),
            image_fail: Mutex::new(None),
        })
    }

    /// Puts every disk over a qcow2 image of its own ([`crate::childimage`]); the initial
    /// image becomes each image's raw backing node (none when it is zeroes).
    pub async fn attach_images(
        &self,
        p: &crate::params::ChildImageParams,
        initial_pattern: bool,
    ) -> std::result::Result<(), Fail> {
        let (seed, prefix, inits) = {
            let g = self.lock();
            let inits: Vec<(u64, Vec<Stored>)> = g
                .disks
                .iter()
                .map(|d| (d.sectors, d.current.clone()))
                .collect();
            (g.seed, g.disks[0].name[..1].to_string(), inits)
        };
        for (i, (sectors, init)) in inits.into_iter().enumerate() {
            let img = ChildImage::create(
                seed,
                i,
                &prefix,
                sectors,
                initial_pattern.then_some(init),
                p.clone(),
            )
            .await?;
            self.images.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(img);
        }
        Ok(())
    }

    fn image(&self, index: usize) -> Option<Arc<ChildImage>> {
        self.images.lock().unwrap_or_else(|p| p.into_inner())[index].clone()
    }

    fn images(&self) -> Vec<Option<Arc<ChildImage>>> {
        self.images
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the disks are over child images.
    pub fn has_images(&self) -> bool {
        self.images().iter().any(Option::is_some)
    }

    fn image_failed(&self, f: Fail) {
        let mut g = self.image_fail.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            *g = Some(f);
        }
    }

    /// No child image broke a rule.
    pub fn failure_free(&self) -> bool {
        self.image_failure().is_none()
    }

    /// The first rule a child image broke, if one did.
    pub fn image_failure(&self) -> Option<Fail> {
        self.image_fail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The run's end: every child image, flushed, equals its disk and checks clean
    /// ([`ChildImage::final_check`]).
    pub async fn check_images(&self) -> std::result::Result<(), Fail> {
        for (i, img) in self.images().into_iter().enumerate() {
            let Some(img) = img else { continue };
            img.final_check(|| self.lock().disks[i].current.clone())
                .await?;
            let mut g = self.lock();
            *g.counters.image_checks.entry(Rule::I21).or_default() += 1;
            *g.counters.image_checks.entry(Rule::I22).or_default() += 1;
        }
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Virtual nanoseconds since the run started.
    pub fn now_ns(&self) -> u64 {
        self.lock().start.elapsed().as_nanos() as u64
    }

    /// Resets the virtual-time origin of trace records (call once inside the runtime).
    pub fn set_start(&self, start: tokio::time::Instant) {
        self.lock().start = start;
    }

    /// The block device of child `index`.
    pub fn device(self: &Arc<DiskSet>, index: usize) -> Arc<VDisk> {
        let (name, sectors) = {
            let g = self.lock();
            (g.disks[index].name.clone(), g.disks[index].sectors)
        };
        Arc::new(VDisk {
            set: self.clone(),
            index,
            name,
            length: sectors * SECTOR_U64,
            gate: Arc::new(tokio::sync::Semaphore::new(INFLIGHT_PER_DISK_MAX)),
        })
    }

    /// Number of disks.
    pub fn len(&self) -> usize {
        self.lock().n
    }

    /// Whether the set has no disks.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops or resumes random fault injection (S6 stops it for the liveness phase).
    pub fn set_injecting(&self, on: bool) {
        self.lock().injecting = on;
    }

    /// Whether random faults are injected now (the metadata disk follows the children).
    pub fn injecting(&self) -> bool {
        self.lock().injecting
    }

    /// Sectors some disk holds damage on from a fault other than a crash (F16, F8, F9): the
    /// silent faults only a verify finds (HEALING.md I19 leaves them to I12).
    pub fn silently_damaged(&self) -> BTreeSet<u64> {
        self.lock().silently_damaged()
    }

    /// The sectors of `sectors` on which the readable disks differ now.
    pub fn divergent_among(&self, sectors: &BTreeSet<u64>) -> Vec<u64> {
        self.lock().divergent_among(sectors)
    }

    /// Sets every disk's latency (S6).
    pub fn set_latency_minimal(&self) {
        let mut g = self.lock();
        for d in &mut g.disks {
            d.latency = d.latency.minimal();
        }
    }

    /// Applies `f` to disk `index`'s latency (scripted F10).
    pub fn set_latency_factor(&self, index: usize, factor: u64) {
        self.lock().disks[index].latency.factor = factor.max(1);
    }

    /// Takes the child requests logged for guest op `op`.
    pub fn take_oplog(&self, op: u64) -> Vec<ChildOp> {
        self.lock().oplog.remove(&op).unwrap_or_default()
    }

    /// Drops logs of ops the harness no longer tracks (after a crash).
    pub fn clear_oplog(&self) {
        self.lock().oplog.clear();
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        self.lock().counters.clone()
    }

    /// Whether any fault of any family (latency included) has been injected so far.
    pub fn any_injected(&self) -> bool {
        self.lock().counters.injected.values().any(|&n| n > 0)
    }

    /// Appends a trace record stamped with the current virtual time.
    pub fn trace(&self, node: &str, kind: &'static str, op: u64, off: u64, len: u64, res: i64) {
        self.trace_full(node, kind, op, off, len, res, 0, String::new());
    }

    /// Appends a full trace record.
    #[allow(clippy::too_many_arguments)]
    pub fn trace_full(
        &self,
        node: &str,
        kind: &'static str,
        op: u64,
        offset: u64,
        len: u64,
        result: i64,
        digest: u64,
        note: String,
    ) {
        self.lock().record(
            node.to_string(),
            kind,
            op,
            offset,
            len,
            result,
            digest,
            note,
        );
    }

    /// Runs `f` on the trace.
    pub fn with_trace<R>(&self, f: impl FnOnce(&mut Trace) -> R) -> R {
        let log = self.lock().log.clone();
        log.with_trace(f)
    }

    /// Counts a fault injected by the harness itself (crash, hot-add refusal, ...).
    pub fn count_injected(&self, family: Fault) {
        self.count_lasting(family, 0);
    }

    /// [`DiskSet::count_injected`] for a fault that lasts `ns` (or until [`DiskSet::ended`]
    /// is called with the returned mark index).
    pub fn count_lasting(&self, family: Fault, ns: u64) -> usize {
        let mut g = self.lock();
        *g.counters.injected.entry(family).or_default() += 1;
        g.mark_lasting(family, ns)
    }

    /// The fault of mark `index` (from [`DiskSet::count_lasting`]) ends now.
    pub fn ended(&self, index: usize) {
        let mut g = self.lock();
        let now = g.start.elapsed().as_nanos() as u64;
        if let Some(m) = g.counters.marks.get_mut(index) {
            m.until_ns = m.until_ns.max(now);
        }
    }

    /// Arms a scripted fault on disk `index`.
    pub fn arm(&self, index: usize, a: Armed) {
        let mut g = self.lock();
        g.disks[index].armed.push(a);
    }

    /// Scripted sticky fault (F1, F3 or F4) on `sectors` of disk `index`, bypassing the budget
    /// (a scenario's faults are deliberate).
    pub fn mark_sticky(&self, index: usize, sectors: Range<u64>, kind: Sticky, family: Fault) {
        let mut g = self.lock();
        let end = sectors.end.min(g.disks[index].sectors);
        let mark = if kind == Sticky::Latent {
            Mark::Failing
        } else {
            Mark::Wrong
        };
        for s in sectors.start..end {
            g.disks[index].sticky.insert(s, kind);
            g.disks[index].marks.insert(s, mark);
        }
        g.injected(index, family, sectors.start..end);
    }

    /// F26 (HEALING.md H26): a sticky flip or latent error on disk `index`'s copies of
    /// `sectors`, injected only if the budget (B2, B4) allows it; counted as `family`.
    pub fn inject_sticky(
        &self,
        index: usize,
        sectors: Range<u64>,
        kind: Sticky,
        family: Fault,
    ) -> bool {
        let mut g = self.lock();
        let end = sectors.end.min(g.disks[index].sectors);
        if sectors.start >= end {
            return false;
        }
        let (mark, silent) = if kind == Sticky::Latent {
            (Mark::Failing, false)
        } else {
            (Mark::Wrong, true)
        };
        if !g.allow_kind(family, silent, index, sectors.start..end, mark) {
            return false;
        }
        for s in sectors.start..end {
            g.disks[index].sticky.insert(s, kind);
            g.disks[index].marks.insert(s, mark);
        }
        g.injected(index, family, sectors.start..end);
        true
    }

    /// I18: what disk `index` holds at sector `s` on its media and in its cache, and whether
    /// a fault has marked that copy (B1: failing or possibly not the newest).
    pub fn sector_state(&self, index: usize, s: u64) -> (Stored, Stored, bool) {
        let g = self.lock();
        let d = &g.disks[index];
        (
            d.durable[s as usize].clone(),
            d.current[s as usize].clone(),
            d.marks.contains_key(&s) || d.sticky.contains_key(&s) || d.damage.contains_key(&s),
        )
    }

    /// Sets whether disk `index` counts as failing on every sector (B1).
    pub fn set_down(&self, index: usize, down: bool) {
        self.lock().down[index] = down;
    }

    /// B3 for a node-level fault (F13, F15–F18) on disk `index`: checked against the worst
    /// sector with the disk's copy taken as `mark` everywhere. fifo (B4): never on the first
    /// child, and only while every child before it is reachable and clean. Counts a skip.
    pub fn allow_node(&self, family: Fault, index: usize, mark: Mark) -> bool {
        let mut g = self.lock();
        let (n, t) = (g.n, g.t);
        let others_down = (0..n).filter(|&j| j != index && g.down[j]).count();
        let mut ok = others_down < n - t;
        if mark == Mark::Wrong {
            ok &= t >= 2;
        }
        if g.fifo {
            // A wrong copy on every sector (F18) is served as soon as the children before it
            // fail a read, which over NBD a timeout does without any injection.
            ok &= mark != Mark::Wrong
                && index >= 1
                && (0..index).all(|j| !g.down[j] && g.disks[j].marks.is_empty());
        }
        if ok {
            let mut marked: BTreeSet<u64> = BTreeSet::new();
            for d in &g.disks {
                marked.extend(d.marks.keys().copied());
            }
            ok = marked
                .iter()
                .all(|&s| g.within_budget(s, Some((index, Some(mark)))));
        }
        if !ok {
            *g.counters.skipped.entry(family).or_default() += 1;
        }
        ok
    }

    /// B1: a write disk `index` did not acknowledge leaves its copies of `sectors` stale
    /// (the request may also land later, F14).
    pub fn mark_missed(&self, index: usize, sectors: Range<u64>) {
        let mut g = self.lock();
        let end = sectors.end.min(g.disks[index].sectors);
        for s in sectors.start..end {
            g.disks[index].marks.insert(s, Mark::Wrong);
        }
    }

    /// Charges fault `family` to the current guest op (the report's fault × outcome).
    pub fn charge(&self, family: Fault) {
        self.lock().mark(family);
    }

    /// Records that fault `family` left disk `index`'s copies of `sectors` stale: later reads
    /// of them are charged to it until they are rewritten (bookkeeping only).
    pub fn damage(&self, index: usize, sectors: Range<u64>, family: Fault) {
        let mut g = self.lock();
        let end = sectors.end.min(g.disks[index].sectors);
        for s in sectors.start..end {
            g.disks[index].damage.insert(s, family);
        }
    }

    /// F14: a write that reached disk `index` through a connection its client had given up
    /// (N43). The copies it wrote may be older than what the disk held: suspect (B1).
    pub fn late_landing(&self, index: usize, sectors: Range<u64>) {
        self.mark_missed(index, sectors.clone());
        self.damage(index, sectors.clone(), Fault::F14);
        let mut g = self.lock();
        let end = sectors.end.min(g.disks[index].sectors);
        g.injected(index, Fault::F14, sectors.start..end);
    }

    /// Counts a crash of `node` (F16) and traces what it did to the unflushed writes.
    pub fn record_crash(&self, node: &str, r: &CrashReport) {
        self.count_injected(Fault::F16);
        self.trace_full(
            node,
            "crash",
            0,
            r.intact,
            r.lost,
            r.torn as i64,
            0,
            format!("F16 intact={} lost={} torn={}", r.intact, r.lost, r.torn),
        );
    }

    /// F18 (F30: `family`): disk `index` comes back empty (zeros, nothing pending, no sticky faults). Returns
    /// the sectors whose value changed; the ledger marks those wrong (B1).
    pub fn reformat(&self, index: usize, family: Fault) -> Vec<u64> {
        if let Some(img) = self.image(index) {
            img.reformat();
        }
        let mut g = self.lock();
        let d = &mut g.disks[index];
        let zero = Stored::V(Value::Zero);
        let mut changed = Vec::new();
        for (s, v) in d.current.iter().enumerate() {
            // A copy already marked (a write a crash just lost, say) stays suspect even where
            // it held zeros: the empty disk does not bring the newest write back.
            let s = s as u64;
            if *v != zero || d.sticky.contains_key(&s) || d.marks.contains_key(&s) {
                changed.push(s);
            }
        }
        d.current = vec![zero.clone(); d.sectors as usize];
        d.durable = vec![zero; d.sectors as usize];
        d.pending.clear();
        d.sticky.clear();
        d.misdirect = None;
        d.armed.clear();
        d.marks.clear();
        d.damage.clear();
        for &s in &changed {
            d.marks.insert(s, Mark::Wrong);
            d.damage.insert(s, family);
        }
        g.injected(index, family, 0..0);
        changed
    }

    /// Logs a child request as the quorum saw it (an NBD child's answer, transport failures
    /// included) against guest op `op`; the disk's own log line stays in the trace.
    pub fn log_seen(&self, op: u64, c: ChildOp) {
        let mut g = self.lock();
        let node = format!("q/{}", g.disks[c.disk].name);
        let (res, dg) = match &c.result {
            ChildResult::Ok(d) => (0, *d ^ c.data),
            ChildResult::Err(k) => (*k as i64 + 1, c.data),
        };
        g.record(node, "seen", op, c.offset, c.len, res, dg, String::new());
        if op != 0 {
            g.oplog.entry(op).or_default().push(c);
        }
    }

    /// How many disks hold exactly `v` at sector `s`, readable and uncorrupted (O5).
    pub fn holders(&self, s: u64, v: Value) -> usize {
        self.lock().holders(s, v)
    }

    /// Whether disk `index` holds `v` at sector `s`, readable and uncorrupted.
    pub fn holds(&self, index: usize, s: u64, v: Value) -> bool {
        self.lock().holds(index, s, v)
    }

    /// Sectors whose copies currently break B2 (errors there are permitted, O7; I6 excludes
    /// them), and sectors with a sticky latent error (I6 excludes them and lists them).
    pub fn excused_sectors(&self) -> (Vec<u64>, Vec<u64>) {
        self.lock().excused_sectors()
    }

    /// The excused sectors ([`DiskSet::excused_set`]) within `range`, looking there only.
    pub fn excused_in(&self, range: Range<u64>) -> BTreeSet<u64> {
        self.lock().excused_in(range)
    }

    /// One line per disk describing sector `s` (failure reports).
    pub fn describe_sector(&self, s: u64) -> String {
        self.lock().describe_sector(s)
    }

    /// I6: sectors on which the readable disks differ (latent sectors skipped).
    pub fn divergent_sectors(&self, limit: usize) -> Vec<u64> {
        self.lock().divergent_sectors(limit)
    }

    /// Sectors of `range` on which the readable disks differ, ignoring copies `skip` names.
    pub fn divergent_sectors_in(
        &self,
        range: Range<u64>,
        skip: impl Fn(usize, u64) -> bool,
    ) -> Vec<u64> {
        self.lock().divergent_sectors_in(range, skip)
    }

    /// [`DiskSet::excused_sectors`] as one set: the sectors whose copies break B2 or hide
    /// behind a latent error.
    pub fn excused_set(&self) -> BTreeSet<u64> {
        let (over, latent) = self.excused_sectors();
        over.into_iter().chain(latent).collect()
    }

    /// Resolves every disk's pending writes as a crash does (F8, F9; V3), then updates the
    /// ledger: on each sector a crash touched, copies that differ from the value most disks
    /// hold become wrong (B1: stale or torn).
    ///
    /// `cut_off` lists byte ranges of guest requests the crash interrupted: a write can have
    /// reached some children (even durably, through another op's flush) and not others.
    pub fn crash(&self, cut_off: &[(u64, u64)]) -> CrashReport {
        let all: Vec<usize> = (0..self.len()).collect();
        self.crash_disks(&all, cut_off).0
    }

    /// [`DiskSet::crash`] for the disks in `which` only (a replica host's crash); also returns
    /// the sectors it touched.
    pub fn crash_disks(&self, which: &[usize], cut_off: &[(u64, u64)]) -> (CrashReport, Vec<u64>) {
        let images = self.images();
        let mut g = self.lock();
        let mut report = CrashReport::default();
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        for &(off, len) in cut_off {
            touched.extend(off / SECTOR_U64..(off + len).div_ceil(SECTOR_U64));
        }
        // Damaged copies per sector so far: the safety budget lets at most t - 1 disks hold
        // damage on one sector, so no torn version can gather t votes.
        let mut damaged: BTreeMap<u64, usize> = BTreeMap::new();
        for &di in which {
            match &images[di] {
                Some(img) => {
                    let keep = g.rates.f8.unwrap_or(1.0);
                    let tear = g.rates.f9.unwrap_or(0.0);
                    if let Err(f) =
                        image_crash(&mut g, di, img, keep, tear, &mut report, &mut touched)
                    {
                        self.image_failed(f);
                    }
                }
                None => g.crash_disk(di, &mut damaged, &mut report, &mut touched),
            }
        }
        g.remark_after_crash(&touched);
        g.count_crash(&report);
        (report, touched.into_iter().collect())
    }

    /// Reads sector `s` of disk `index` as the media holds it (no faults applied), for final
    /// comparisons.
    pub fn stored(&self, index: usize, s: u64) -> Stored {
        self.lock().disks[index].current[s as usize].clone()
    }
}

/// One child disk: a [`BlockDevice`] over its slot in the [`DiskSet`].
pub struct VDisk {
    set: Arc<DiskSet>,
    index: usize,
    name: String,
    length: u64,
    gate: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for VDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vdisk {}", self.name)
    }
}

fn eio(what: &str, disk: &str, s: u64) -> Error {
    Error::new(ErrorKind::Io, format!("vdisk {disk}: {what} at sector {s}"))
}

impl VDisk {
    /// Every request's prologue: a slot among the disk's in-flight requests (V4), then the
    /// request's latency (V4, F10). The permit is held until the request completes.
    async fn admit(&self, write: bool) -> Result<tokio::sync::SemaphorePermit<'_>> {
        let permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| eio("closed", &self.name, 0))?;
        self.delay(write).await;
        Ok(permit)
    }

    async fn delay(&self, write: bool) {
        let ns = {
            let mut g = self.set.lock();
            let d = &mut g.disks[self.index];
            let (min, mean) = if write {
                (d.latency.write_min_ns, d.latency.write_mean_ns)
            } else {
                (d.latency.read_min_ns, d.latency.read_mean_ns)
            };
            let extra = mean.saturating_sub(min) as f64;
            let mut ns = min + d.lat_rng.exponential(extra) as u64;
            ns = ns.saturating_mul(d.latency.factor.max(1));
            let mut stalled = false;
            if d.latency.stall_p > 0.0 && d.lat_rng.chance(d.latency.stall_p) {
                let (a, b) = d.latency.stall_ns;
                ns += d.lat_rng.range(a, b.max(a));
                stalled = true;
            }
            if stalled || d.latency.factor > 1 {
                *g.counters.injected.entry(Fault::F10).or_default() += 1;
                // Requests queued behind this one wait for it too.
                g.mark_lasting(Fault::F10, ns);
            }
            ns
        };
        if ns > 0 {
            tokio::time::sleep(Duration::from_nanos(ns)).await;
        }
    }

    /// Waits for this disk's child image, if it has one (requests reach it one at a time).
    async fn hold(&self) -> Result<Option<(Arc<ChildImage>, Held)>> {
        let Some(img) = self.set.image(self.index) else {
            return Ok(None);
        };
        match img.enter().await {
            Ok(h) => Ok(Some((img, h))),
            Err(f) => {
                let e = eio(&f.1, &self.name, 0);
                self.set.image_failed(f);
                Err(e)
            }
        }
    }

    /// Sends the write the model just put in this disk's cache to its child image;
    /// `durable` (a FUA write that succeeded): the image flushes after it, and only then does
    /// the model's cache become durable (a crash before that leaves the write unflushed in
    /// both).
    async fn mirror(&self, held: &Option<(Arc<ChildImage>, Held)>, durable: bool) {
        let Some((img, h)) = held else { return };
        let landed = self.set.lock().landed.take();
        if let Some((_, p)) = landed.filter(|(i, _)| *i == self.index) {
            if let Err(f) = img.write(h, p.first, &p.data, durable).await {
                if img.current(h) {
                    self.set.image_failed(f);
                }
            }
        } else if durable {
            if let Err(f) = img.flush(h).await {
                if img.current(h) {
                    self.set.image_failed(f);
                }
            }
        }
        if durable && img.current(h) {
            flush_disk(&mut self.set.lock().disks[self.index]);
        }
    }

    fn sectors_of(offset: u64, len: u64) -> Range<u64> {
        offset / SECTOR_U64..(offset + len).div_ceil(SECTOR_U64)
    }

    /// Applies a write of `data` (one Stored per sector) at `first`; shared by write,
    /// write-zeroes and discard. Returns the error to report, if the write fails (F5).
    fn apply_write(
        &self,
        g: &mut Inner,
        first: u64,
        mut data: Vec<Stored>,
        fua: bool,
    ) -> std::result::Result<(), Error> {
        let i = self.index;
        let n = data.len() as u64;
        let range = first..first + n;
        // F5: the write fails; none, all or some of its sectors reached the media.
        let armed5 = g.take_armed(i, Fault::F5, &range);
        let rate5 = g.rates.f5;
        let fire5 = armed5.is_some() || g.draw(i, rate5);
        if fire5 {
            let applied = match &armed5 {
                Some(a) => a.applied,
                None => ["none", "all", "some"][g.disks[i].fault_rng.below(3) as usize],
            };
            let mask: Vec<bool> = (0..n)
                .map(|_| match applied {
                    "none" => false,
                    "all" => true,
                    _ => g.disks[i].fault_rng.chance(0.5),
                })
                .collect();
            let stale: Vec<u64> = (0..n)
                .filter(|k| !mask[*k as usize])
                .map(|k| first + k)
                .collect();
            let ok = armed5.is_some()
                || stale
                    .iter()
                    .all(|&s| g.allow_one(Fault::F5, i, s, Mark::Wrong));
            if ok {
                g.injected(i, Fault::F5, range.clone());
                let d = &mut g.disks[i];
                for (k, v) in data.into_iter().enumerate() {
                    let s = first + k as u64;
                    if mask[k] {
                        d.current[s as usize] = v;
                        d.sticky.remove(&s);
                        d.marks.remove(&s);
                        d.damage.remove(&s);
                    } else {
                        d.marks.insert(s, Mark::Wrong);
                        d.damage.insert(s, Fault::F5);
                    }
                }
                // The applied part is in the cache like any write.
                let snapshot: Vec<Stored> = range
                    .clone()
                    .map(|s| d.current[s as usize].clone())
                    .collect();
                let p = Pending {
                    first,
                    data: snapshot,
                };
                d.pending.push(p.clone());
                let e = eio("write failed (F5)", &d.name, first);
                g.landed = Some((i, p));
                return Err(e);
            } else {
                *g.counters.skipped.entry(Fault::F5).or_default() += 1;
            }
        }
        // F6: the whole write lands elsewhere (at most one live misdirection per disk).
        let target = g.draw_misdirect(i, &range);
        let d = &mut g.disks[i];
        if target == first {
            if let Some((a, b)) = &d.misdirect {
                // A write that covers the intended range repairs the misdirection's stale side;
                // one that covers the target repairs the foreign side.
                let (a, b) = (a.clone(), b.clone());
                let covers = |r: &Range<u64>| first <= r.start && r.end <= first + n;
                if covers(&a) || covers(&b) || (a.start < first + n && first < a.end) {
                    d.misdirect = None;
                }
            }
        }
        for (k, v) in data.iter_mut().enumerate() {
            let s = target + k as u64;
            d.current[s as usize] = std::mem::replace(v, Stored::V(Value::Zero));
            d.sticky.remove(&s);
            if target == first {
                d.marks.remove(&s);
                d.damage.remove(&s);
            } else {
                d.marks.insert(s, Mark::Wrong);
                d.damage.insert(s, Fault::F6);
            }
        }
        let snapshot: Vec<Stored> = (target..target + n)
            .map(|s| d.current[s as usize].clone())
            .collect();
        let p = Pending {
            first: target,
            data: snapshot,
        };
        d.pending.push(p.clone());
        g.landed = Some((i, p));
        // F3: one sector of the write is stored corrupted.
        let armed3 = g.take_armed(i, Fault::F3, &range);
        let rate3 = g.rates.f3;
        if armed3.is_some() || g.draw(i, rate3) {
            let s = g.pick_sector(i, &(target..target + n));
            if armed3.is_some() || g.allow(Fault::F3, i, s..s + 1, Mark::Wrong) {
                g.injected(i, Fault::F3, s..s + 1);
                g.disks[i].sticky.insert(s, Sticky::Rot);
                g.disks[i].marks.insert(s, Mark::Wrong);
            }
        }
        if fua {
            flush_disk(&mut g.disks[i]);
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for VDisk {
    fn driver(&self) -> &'static str {
        "vdisk"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.length)
    }

    fn request_alignment(&self) -> u32 {
        SECTOR as u32
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_request(self.length, SECTOR as u32, offset, len as u64, Access::Read)?;
        let op = current_op();
        let _permit = self.admit(false).await?;
        let held = self.hold().await?;
        let range = Self::sectors_of(offset, len as u64);
        let (out, expect) = (|| -> Result<(Bytes, Option<Vec<Stored>>)> {
            let mut g = self.set.lock();
            let i = self.index;
            let range = Self::sectors_of(offset, len as u64);
            if range.is_empty() {
                return Ok((Bytes::new(), None));
            }
            let expect: Option<Vec<Stored>> = held
                .as_ref()
                .map(|_| g.disks[i].current[range.start as usize..range.end as usize].to_vec());
            g.draw_sticky_read_faults(i, &range);
            let latent = range
                .clone()
                .find(|s| g.disks[i].sticky.get(s) == Some(&Sticky::Latent));
            if let Some(s) = latent {
                g.mark(Fault::F4);
                let e = eio("latent sector error (F4)", &self.name, s);
                g.log(
                    op,
                    ChildOp {
                        disk: i,
                        kind: ChildKind::Read,
                        offset,
                        len: len as u64,
                        data: 0,
                        result: ChildResult::Err(e.kind()),
                    },
                );
                return Err(e);
            }
            let (source, transient) = g.draw_read_faults(i, &range);
            let (buf, met, fps) = g.fill_read(i, &range, source, transient, len);
            for f in met {
                g.mark(f);
            }
            let out = buf.freeze();
            let dg = digest_fingerprints(fps.into_iter());
            g.log(
                op,
                ChildOp {
                    disk: i,
                    kind: ChildKind::Read,
                    offset,
                    len: len as u64,
                    data: 0,
                    result: ChildResult::Ok(dg),
                },
            );
            Ok((out, expect))
        })()?;
        if let (Some((img, h)), Some(expect)) = (&held, expect) {
            // I21: the image holds what the model does.
            let got = img.read(h, range.clone()).await;
            if img.current(h) {
                match got {
                    Ok(got) => {
                        if let Some(k) = (0..got.len()).find(|&k| got[k] != expect[k]) {
                            self.set.image_failed((
                                Rule::I21,
                                format!(
                                    "{}'s image reads {:?} at sector {}, the disk holds {:?}",
                                    self.name,
                                    got[k],
                                    range.start + k as u64,
                                    expect[k]
                                ),
                            ));
                        }
                    }
                    Err(f) => self.set.image_failed(f),
                }
            }
        }
        Ok(out)
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        check_request(
            self.length,
            SECTOR as u32,
            offset,
            data.len() as u64,
            Access::Write,
        )?;
        let op = current_op();
        let _permit = self.admit(true).await?;
        let held = self.hold().await?;
        let stored: Vec<Stored> = data
            .chunks(SECTOR)
            .map(|c| match decode(c) {
                Decoded::Value(v) => Stored::V(v),
                Decoded::Garbage => Stored::Raw(Arc::from(c)),
            })
            .collect();
        let r = {
            let mut g = self.set.lock();
            let r = self.apply_write(
                &mut g,
                offset / SECTOR_U64,
                stored,
                flags.fua && held.is_none(),
            );
            g.log(
                op,
                ChildOp {
                    disk: self.index,
                    kind: ChildKind::Write,
                    offset,
                    len: data.len() as u64,
                    data: data_digest(&data),
                    result: ChildResult::of(&r),
                },
            );
            r
        };
        self.mirror(&held, flags.fua && r.is_ok()).await;
        r
    }

    async fn flush(&self) -> Result<()> {
        let op = current_op();
        let _permit = self.admit(true).await?;
        let held = self.hold().await?;
        let i = self.index;
        let log = |g: &mut Inner, result: ChildResult| {
            g.log(
                op,
                ChildOp {
                    disk: i,
                    kind: ChildKind::Flush,
                    offset: 0,
                    len: 0,
                    data: 0,
                    result,
                },
            );
        };
        {
            let mut g = self.set.lock();
            // F5 on a flush: the write-back fails. Only on an idle cache, so no acked data
            // depends on it (the oracle's durability model stays exact); it drives Q41's
            // error paths.
            let rate5 = g.rates.f5;
            if g.draw(i, rate5) && g.disks[i].pending.is_empty() {
                g.injected(i, Fault::F5, 0..0);
                let e = eio("flush failed (F5, idle cache)", &self.name, 0);
                log(&mut g, ChildResult::Err(e.kind()));
                return Err(e);
            }
        }
        if let Some((img, h)) = &held {
            // The image's flush first: the model's cache is durable only once the image's is.
            if let Err(f) = img.flush(h).await {
                if img.current(h) {
                    self.set.image_failed(f);
                }
            }
        }
        let mut g = self.set.lock();
        flush_disk(&mut g.disks[i]);
        log(&mut g, ChildResult::Ok(0));
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_request(self.length, SECTOR as u32, offset, len, Access::Write)?;
        let op = current_op();
        let _permit = self.admit(true).await?;
        let held = self.hold().await?;
        let n = (len / SECTOR_U64) as usize;
        let r = {
            let mut g = self.set.lock();
            let r = self.apply_write(
                &mut g,
                offset / SECTOR_U64,
                vec![Stored::V(Value::Zero); n],
                flags.fua && held.is_none(),
            );
            g.log(
                op,
                ChildOp {
                    disk: self.index,
                    kind: ChildKind::Zero,
                    offset,
                    len,
                    data: 0,
                    result: ChildResult::of(&r),
                },
            );
            r
        };
        self.mirror(&held, flags.fua && r.is_ok()).await;
        r
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.length, SECTOR as u32, offset, len, Access::Read)?;
        let op = current_op();
        let _permit = self.admit(true).await?;
        let held = self.hold().await?;
        let r = {
            let mut g = self.set.lock();
            let r = if g.disks[self.index].discard_zeroes {
                let n = (len / SECTOR_U64) as usize;
                self.apply_write(
                    &mut g,
                    offset / SECTOR_U64,
                    vec![Stored::V(Value::Zero); n],
                    false,
                )
            } else {
                Ok(())
            };
            g.log(
                op,
                ChildOp {
                    disk: self.index,
                    kind: ChildKind::Discard,
                    offset,
                    len,
                    data: 0,
                    result: ChildResult::of(&r),
                },
            );
            r
        };
        self.mirror(&held, false).await;
        r
    }

    fn discard_zeroes(&self) -> bool {
        self.set.lock().disks[self.index].discard_zeroes
    }

    /// The run of zero or of data sectors starting at `offset`; an unreadable (F4) sector in
    /// the range fails the query, as a device whose metadata cannot be read would.
    async fn block_status(&self, offset: u64, len: u64) -> Result<ballot::BlockStatus> {
        check_request(self.length, SECTOR as u32, offset, len, Access::Read)?;
        let op = current_op();
        let _permit = self.admit(false).await?;
        let mut g = self.set.lock();
        let i = self.index;
        let range = Self::sectors_of(offset, len);
        let d = &g.disks[i];
        let latent = range
            .clone()
            .find(|s| d.sticky.get(s) == Some(&Sticky::Latent));
        let r = match latent {
            Some(s) => Err(eio(
                "latent sector error (F4) in block status",
                &self.name,
                s,
            )),
            None => {
                let is_zero = |s: u64| {
                    d.current[s as usize] == Stored::V(Value::Zero) && !d.sticky.contains_key(&s)
                };
                let first = is_zero(range.start);
                let run = range.clone().take_while(|&s| is_zero(s) == first).count() as u64;
                let bytes = (run * SECTOR_U64).min(len);
                Ok(if first {
                    ballot::BlockStatus::zero(bytes)
                } else {
                    ballot::BlockStatus::data(bytes)
                })
            }
        };
        g.log(
            op,
            ChildOp {
                disk: i,
                kind: ChildKind::Status,
                offset,
                len,
                data: 0,
                result: match &r {
                    Ok(st) => ChildResult::Ok((u64::from(st.zero) << 63) | st.length),
                    Err(e) => ChildResult::Err(e.kind()),
                },
            },
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oracle::Oracle;

    fn disks(n: usize) -> Arc<DiskSet> {
        let lat = Latency {
            read_min_ns: 0,
            read_mean_ns: 0,
            write_min_ns: 0,
            write_mean_ns: 0,
            stall_p: 0.0,
            stall_ns: (0, 0),
            factor: 1,
        };
        DiskSet::new(
            DiskSetConfig {
                seed: 1,
                sectors: vec![64; n],
                t: 2,
                fifo: false,
                budget: Budget::Safety,
                rates: FaultRates::default(),
                latency: vec![lat; n],
                initial_pattern: false,
                discard_zeroes: false,
                window_sectors: 16,
                prefix: "c",
                sector_atomic: false,
            },
            Arc::new(RunLog::new(&Default::default())),
        )
    }

    /// The report's fault × outcome: a copy an F5 left stale charges the F5 to the op that
    /// met it (the write) and to every later read of it, until a write makes it current.
    #[tokio::test]
    async fn a_copy_a_fault_left_stale_charges_later_reads_until_it_is_rewritten() {
        let set = disks(3);
        set.arm(
            1,
            Armed {
                family: Fault::F5,
                sectors: None,
                count: 1,
                applied: "none",
            },
        );
        let d = set.device(1);
        let data = Oracle::write_data(5, 0, 2048);
        let w = GUEST_OP.scope(7, d.write(0, data.clone(), WriteFlags::NONE));
        assert!(w.await.is_err(), "the armed F5 fails the write");
        // A read of the stale sectors, one of other sectors, a read touching one stale sector.
        assert!(GUEST_OP.scope(8, d.read(0, 2048)).await.is_ok());
        assert!(GUEST_OP.scope(9, d.read(4096, 512)).await.is_ok());
        assert!(GUEST_OP.scope(10, d.read(1536, 1024)).await.is_ok());
        // Rewritten: no longer charged.
        assert!(GUEST_OP
            .scope(11, d.write(0, data, WriteFlags::NONE))
            .await
            .is_ok());
        assert!(GUEST_OP.scope(12, d.read(0, 2048)).await.is_ok());
        let marks: Vec<(u64, Fault)> = set
            .counters()
            .marks
            .iter()
            .map(|m| (m.op, m.family))
            .collect();
        assert_eq!(marks, [(7, Fault::F5), (8, Fault::F5), (10, Fault::F5)]);
    }
}
