//! The resync job (HEALING.md H10–H16): copies every out-of-sync granule of every child from
//! the voted copy, and the watcher that starts it by itself (`resync=auto`, H14).
//!
//! A pass walks the union of the children's out-of-sync sets in ascending offset, at most
//! `resync-inflight` granules at once (runs of consecutive granules are read with one request
//! per child). Each run is held exclusively in the quorum's request order (H10: no guest write
//! can interleave between the vote and the copy, so no newer data is undone, I17), its voters
//! are read and voted on per granule (H1, H11), and each target's own copy is compared before
//! anything is written to it (P17). A granule leaves O_c only after a flush of the target that
//! started after the copy completed (H12); the job flushes each target every 64 MiB copied and
//! at the end of a pass, then rescans. A granule with no winner is counted unrecoverable, gets
//! one FAILURE, and is not retried by this job (H13); a target whose write fails is retried
//! after 1 s, 2 s, ... 60 s while the others go on (H14); an unreachable target is left for a
//! later job.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use super::sync::{granule_bytes, GranuleSet, GRANULE_BYTES};
use super::vote;
use super::{Audit, Children, Inner};
use crate::device::WriteFlags;
use crate::error::{ErrorKind, Result};
use crate::events::{sectors, IoType};
use crate::jobs::{Cancelled, JobControl};
use crate::join::{join_all_with, BoxFuture, Window};

/// H12: a target is flushed at least every this many bytes copied to it.
pub const FLUSH_EVERY_BYTES: u64 = 64 << 20;
/// H14: the first retry delay of a target whose writes fail, doubled up to the maximum.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// H14: the longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// H14: out-of-sync granules wait this long before an automatic job starts (bursts coalesce).
pub const AUTO_START_DELAY: Duration = Duration::from_secs(1);
/// How often the watcher looks.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How often a running job logs its progress line.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// What a resync (or a verify's repair) is asked to do.
#[derive(Debug, Clone)]
pub struct ResyncRequest {
    /// `job-id`; default `<node>-resync`.
    pub job_id: Option<String>,
    /// `speed`, bytes per second, 0 = no cap.
    pub speed: u64,
    /// H13, H22: a granule with no winner takes the lowest-index child's copy.
    pub recover_lowest: bool,
    /// QEMU's `auto-dismiss`.
    pub auto_dismiss: bool,
}

impl Default for ResyncRequest {
    fn default() -> ResyncRequest {
        ResyncRequest {
            job_id: None,
            speed: 0,
            recover_lowest: false,
            auto_dismiss: true,
        }
    }
}

/// Counters of one job's copying.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    /// Target granules written with the winner.
    pub copied: u64,
    /// Target granules found equal to the winner (nothing written, P17).
    pub equal: u64,
    /// Granules with no winner (H13, P20).
    pub unrecoverable: u64,
    /// Target granules handled, in bytes (the job's progress).
    pub bytes_done: u64,
}

/// Paces a job at its rate (H15).
#[derive(Debug)]
pub(crate) struct Pacer {
    next_at: Instant,
}

impl Pacer {
    pub(crate) fn new() -> Pacer {
        Pacer {
            next_at: Instant::now(),
        }
    }

    /// The rate now: the job's `speed` caps it; while guest requests are in flight it is at
    /// most `resync-min-speed` (0 there means no floor is imposed).
    fn rate(q: &Inner, ctl: &JobControl) -> Option<u64> {
        let speed = ctl.speed();
        let busy = q.guest_inflight.load(Ordering::SeqCst) > 0 && q.opts.resync_min_speed > 0;
        match (speed, busy) {
            (0, false) => None,
            (0, true) => Some(q.opts.resync_min_speed),
            (s, false) => Some(s),
            (s, true) => Some(s.min(q.opts.resync_min_speed)),
        }
    }

    /// Waits until `bytes` more may go.
    pub(crate) async fn pace(&mut self, q: &Inner, ctl: &JobControl, bytes: u64) {
        let wait = self.reserve(q, ctl, bytes);
        if !wait.is_zero() {
            ctl.sleep(wait).await;
        }
    }

    /// Books `bytes` at the current rate and returns how long to wait before sending them
    /// (the caller waits, so work already in flight goes on meanwhile).
    pub(crate) fn reserve(&mut self, q: &Inner, ctl: &JobControl, bytes: u64) -> Duration {
        let now = Instant::now();
        let Some(rate) = Pacer::rate(q, ctl) else {
            self.next_at = now;
            return Duration::ZERO;
        };
        let start = self.next_at.max(now);
        self.next_at = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        start - now
    }
}

/// A person-readable progress line (H16's log line).
fn progress_line(what: &str, node: &str, done: u64, total: u64, bytes_per_s: f64) -> String {
    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    let pct = if total == 0 {
        100.0
    } else {
        done as f64 * 100.0 / total as f64
    };
    let eta = if bytes_per_s > 0.0 {
        format!("{:.0} s", total.saturating_sub(done) as f64 / bytes_per_s)
    } else {
        "unknown".to_string()
    };
    format!(
        "ballot: quorum '{node}' {what}: {pct:.1}% ({:.1} of {:.1} MiB), {:.1} MiB/s, ETA {eta}",
        mib(done),
        mib(total),
        bytes_per_s / f64::from(1u32 << 20)
    )
}

/// H16's progress line for one job, written at most every [`PROGRESS_EVERY`], with the rate
/// since the previous line.
#[derive(Debug)]
pub(crate) struct ProgressLog {
    what: &'static str,
    at: Instant,
    done: u64,
}

impl ProgressLog {
    pub(crate) fn new(what: &'static str) -> ProgressLog {
        ProgressLog {
            what,
            at: Instant::now() + PROGRESS_EVERY,
            done: 0,
        }
    }

    /// `done` of `total` bytes now: logs a line if one is due.
    pub(crate) fn tick(&mut self, q: &Inner, done: u64, total: u64) {
        let now = Instant::now();
        if now < self.at {
            return;
        }
        let secs = (PROGRESS_EVERY + (now - self.at)).as_secs_f64();
        let rate = (done - self.done) as f64 / secs;
        q.host.log(&progress_line(
            self.what,
            &q.opts.node_name,
            done,
            total,
            rate,
        ));
        self.at = now + PROGRESS_EVERY;
        self.done = done;
    }
}

/// What the runs of a resync need from their job; the runs in flight share one, and the job
/// changes its own copy (`Arc::make_mut`) when it learns something.
#[derive(Clone)]
pub(crate) struct RunCtx {
    q: Arc<Inner>,
    recover_lowest: bool,
    /// Granules a verify asked to repair; `None`: every out-of-sync granule.
    scope: Option<GranuleSet>,
    /// Granules with no winner this job (H13).
    skip: GranuleSet,
    /// Child name → (retry at, next delay) (H14).
    backoff: BTreeMap<String, (Instant, Duration)>,
}

/// One resync's state.
pub(crate) struct Resync {
    ctx: Arc<RunCtx>,
    ctl: Arc<JobControl>,
    /// Child name → bytes copied since its last flush (H12).
    since_flush: BTreeMap<String, u64>,
    pub(crate) tally: Tally,
    pacer: Pacer,
    log: ProgressLog,
    /// The pass's position (granule), for the progress.
    pos: u64,
    /// Runs in flight, `[first, end)` granules.
    flight: Vec<(u64, u64)>,
}

impl Resync {
    pub(crate) fn new(
        q: Arc<Inner>,
        ctl: Arc<JobControl>,
        recover_lowest: bool,
        scope: Option<GranuleSet>,
    ) -> Resync {
        Resync {
            ctx: Arc::new(RunCtx {
                q,
                recover_lowest,
                scope,
                skip: GranuleSet::default(),
                backoff: BTreeMap::new(),
            }),
            ctl,
            since_flush: BTreeMap::new(),
            tally: Tally::default(),
            pacer: Pacer::new(),
            log: ProgressLog::new("resync"),
            pos: 0,
            flight: Vec::new(),
        }
    }

    /// The next granules `>= from` that are work for an eligible child, at most `n`, as runs.
    async fn next_batch(&self, from: u64, n: u64) -> Vec<(u64, u64)> {
        let st = self.ctx.q.children.read().await;
        let eligible: Vec<usize> = (0..st.list.len())
            .filter(|&i| st.list[i].oos_granules() > 0 && self.ctx.eligible(&st, i))
            .collect();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut left = n;
        let mut g = from;
        let granules = self.ctx.q.granules();
        while left > 0 && g < granules {
            // The smallest granule >= g that some eligible child wants.
            let next = eligible
                .iter()
                .filter_map(|&i| {
                    let s = st.list[i].sync();
                    let mut at = g;
                    loop {
                        let x = s.out_of_sync().next_from(at)?;
                        if !self.ctx.skip.contains(x)
                            && self.ctx.scope.as_ref().is_none_or(|sc| sc.contains(x))
                        {
                            return Some(x);
                        }
                        at = x + 1;
                    }
                })
                .min();
            let Some(x) = next else { break };
            match runs.last_mut() {
                Some(last) if last.1 == x => last.1 = x + 1,
                _ => runs.push((x, x + 1)),
            }
            left -= 1;
            g = x + 1;
        }
        runs
    }

    /// Bytes still to do, for `total-progress`: out-of-sync granules the pass has not reached
    /// yet (those behind it are done and only wait for the flush, or are next pass's work).
    async fn remaining(&self) -> u64 {
        let st = self.ctx.q.children.read().await;
        st.list
            .iter()
            .map(|c| {
                let s = c.sync();
                let oos = s.out_of_sync();
                // Behind the pass position only the runs still in flight are left to do.
                let flying: u64 = self
                    .flight
                    .iter()
                    .map(|&(a, b)| oos.count_from(a) - oos.count_from(b))
                    .sum();
                (oos.count_from(self.pos) + flying).saturating_mul(GRANULE_BYTES)
            })
            .sum()
    }

    /// Runs passes until nothing eligible is left. A pass keeps up to `resync-inflight`
    /// granules in flight (H15) as a sliding window: a new run starts as soon as one ends, so
    /// the reads of one run overlap the writes of another.
    ///
    /// # Errors
    /// [`Cancelled`].
    pub(crate) async fn run(&mut self) -> std::result::Result<(), Cancelled> {
        let inflight = self.ctx.q.opts.resync_inflight as u64;
        // About four runs in flight: eight granules (512 KiB) each at the default of 32, one
        // granule each at 4 or less.
        let run_max = (inflight / 4).max(1);
        loop {
            // H14: what this scan will see; a mark after it makes the watcher start again.
            let marks = self.ctx.q.marks.load(Ordering::SeqCst);
            self.ctx.q.settled_marks.store(marks, Ordering::SeqCst);
            let mut pos = 0u64;
            self.pos = 0;
            let mut worked = false;
            let mut window: Window<'static, ((u64, u64), Vec<RunOutcome>)> = Window::new();
            loop {
                // Fill the window; a pause or cancel request lets what is in flight finish
                // first (its range holds would otherwise keep guest writes waiting).
                loop {
                    let busy: u64 = self.flight.iter().map(|&(a, b)| b - a).sum();
                    if busy >= inflight || self.ctl.stop_requested() {
                        break;
                    }
                    let room = (inflight - busy).min(run_max);
                    let Some(&(a, b)) = self.next_batch(pos, room).await.first() else {
                        break;
                    };
                    worked = true;
                    let bytes = granule_bytes(a, b, self.ctx.q.length);
                    let wait = self.pacer.reserve(&self.ctx.q, &self.ctl, bytes);
                    let (ctx, ctl) = (self.ctx.clone(), self.ctl.clone());
                    // Each run is a task of its own, so it goes on while the job awaits
                    // anything else (a flush, the child list behind a hot add or remove);
                    // a run that panicked leaves its granules out of sync.
                    let run = tokio::spawn(async move {
                        if !wait.is_zero() {
                            ctl.sleep(wait).await;
                        }
                        ctx.run_one(a, b).await
                    });
                    window.push(Box::pin(
                        async move { ((a, b), run.await.unwrap_or_default()) },
                    ));
                    pos = b;
                    self.flight.push((a, b));
                }
                self.ctl.set_busy(!window.is_empty());
                let Some(((a, b), outcomes)) = window.next().await else {
                    if self.ctl.stop_requested() {
                        self.ctl.checkpoint().await?;
                        continue;
                    }
                    break;
                };
                self.flight.retain(|&r| r != (a, b));
                for o in outcomes {
                    self.absorb(o);
                }
                self.flush_due(false).await;
                self.pos = pos;
                self.report().await;
            }
            self.ctl.set_busy(false);
            self.flush_due(true).await;
            if !worked {
                // Nothing eligible: done, unless a target only waits for its retry delay.
                let wait = self.retry_wait().await;
                match wait {
                    Some(d) => self.ctl.sleep(d).await,
                    None => return Ok(()),
                }
            }
        }
    }

    /// The delay until the earliest backed-off target with work may be retried.
    async fn retry_wait(&self) -> Option<Duration> {
        let st = self.ctx.q.children.read().await;
        let now = Instant::now();
        st.list
            .iter()
            .filter(|c| c.oos_granules() > 0 && c.dev.reachable())
            .filter_map(|c| self.ctx.backoff.get(&c.name).map(|(at, _)| *at))
            .filter(|at| *at > now)
            .min()
            .map(|at| at - now)
    }

    async fn report(&mut self) {
        // A verify's repair (scoped) leaves the progress to the verify.
        if self.ctx.scope.is_some() {
            return;
        }
        let remaining = self.remaining().await;
        let done = self.tally.bytes_done;
        self.ctl.progress(done, done + remaining);
        self.log.tick(&self.ctx.q, done, done + remaining);
    }

    fn absorb(&mut self, o: RunOutcome) {
        match o {
            RunOutcome::Copied { child, bytes } => {
                self.tally.copied += bytes.div_ceil(GRANULE_BYTES);
                self.tally.bytes_done += bytes;
                *self.since_flush.entry(child.clone()).or_default() += bytes;
                Arc::make_mut(&mut self.ctx).backoff.remove(&child);
            }
            RunOutcome::Equal { child, bytes } => {
                self.tally.equal += bytes.div_ceil(GRANULE_BYTES);
                self.tally.bytes_done += bytes;
                self.since_flush.entry(child).or_default();
            }
            RunOutcome::WriteFailed { child } => {
                let delay = self
                    .ctx
                    .backoff
                    .get(&child)
                    .map(|(_, d)| (*d * 2).min(RETRY_MAX))
                    .unwrap_or(RETRY_FIRST);
                Arc::make_mut(&mut self.ctx)
                    .backoff
                    .insert(child, (Instant::now() + delay, delay));
            }
            RunOutcome::Unrecoverable { granule } => {
                self.tally.unrecoverable += 1;
                Arc::make_mut(&mut self.ctx)
                    .skip
                    .insert_range(granule, granule + 1);
            }
        }
    }

    /// H12: flushes targets with 64 MiB copied since their last flush, or (`all`) every
    /// target this pass touched.
    async fn flush_due(&mut self, all: bool) {
        let due: Vec<String> = self
            .since_flush
            .iter()
            .filter(|(_, &b)| all || b >= FLUSH_EVERY_BYTES)
            .map(|(n, _)| n.clone())
            .collect();
        if due.is_empty() {
            return;
        }
        let st = self.ctx.q.children.read().await;
        for name in due {
            self.since_flush.remove(&name);
            // A child removed meanwhile has nothing to flush (H16).
            if let Some(c) = st.list.iter().find(|c| c.name == name) {
                if let Err(e) = self.ctx.q.flush_child(c).await {
                    self.ctx
                        .q
                        .report_bad(IoType::Flush, Some(e.kind()), c, 0, 0);
                }
            }
        }
    }
}

impl RunCtx {
    /// Whether child `c` may be written to now.
    fn eligible(&self, st: &Children, i: usize) -> bool {
        let c = &st.list[i];
        c.dev.reachable()
            && self
                .backoff
                .get(&c.name)
                .is_none_or(|(at, _)| *at <= Instant::now())
    }

    /// Whether granule `g` is work for child `i`.
    fn wanted(&self, st: &Children, i: usize, g: u64) -> bool {
        !self.skip.contains(g)
            && self.scope.as_ref().is_none_or(|s| s.contains(g))
            && st.list[i].oos_granules() > 0
            && !st.list[i].in_sync(g, g + 1)
    }

    /// One run of granules `[first, end)`: held exclusively, voted per granule, compared,
    /// copied where different.
    async fn run_one(self: Arc<Self>, first: u64, end: u64) -> Vec<RunOutcome> {
        let q = &self.q;
        let off = first * GRANULE_BYTES;
        let len = granule_bytes(first, end, q.length);
        let unit = q.request_alignment().max(512) as usize;
        let _hold = q.order(off, len, true).await;
        q.audit(|| Audit::Copying { offset: off, len });
        let st = q.children.read().await;
        let n = st.list.len();
        // Per granule: voters (H1) and targets.
        // With a threshold that is not a strict majority (2t <= N, D1) a degraded granule's
        // vote can be won by stale copies that agree, and copying it would undo an
        // acknowledged write for good: such granules are left out of sync (README D13).
        let weak = 2 * q.opts.threshold <= n;
        let mut out = Vec::new();
        let plan: Vec<(u64, Vec<usize>, Vec<usize>)> = (first..end)
            .map(|g| {
                let (voters, degraded) = q.voters(&st, g, g + 1);
                let targets: Vec<usize> = if degraded && weak {
                    if (0..n).any(|i| self.wanted(&st, i, g)) {
                        let (gsn, gsc) =
                            sectors(g * GRANULE_BYTES, granule_bytes(g, g + 1, q.length));
                        q.failure(gsn, gsc);
                        out.push(RunOutcome::Unrecoverable { granule: g });
                    }
                    Vec::new()
                } else {
                    (0..n)
                        .filter(|&i| self.wanted(&st, i, g) && self.eligible(&st, i))
                        .collect()
                };
                (g, voters, targets)
            })
            .collect();
        if plan.iter().all(|(_, _, t)| t.is_empty()) {
            return out;
        }
        let readers: Vec<usize> = (0..n)
            .filter(|i| plan.iter().any(|(_, v, t)| v.contains(i) || t.contains(i)))
            .collect();
        let (sn, sc) = sectors(off, len);
        let epochs: Vec<u64> = st.list.iter().map(|c| c.dev.cache_epoch()).collect();
        // Targets that vote on no granule of the run may be probed for zeroes instead of read.
        let probe: Vec<bool> = readers
            .iter()
            .map(|i| !plan.iter().any(|(_, v, _)| v.contains(i)))
            .collect();
        let copies = read_copies(q, &st, &readers, &probe, off, len, unit).await;
        let copy_of = |i: usize| -> Option<&Piece> {
            readers
                .iter()
                .position(|&r| r == i)
                .and_then(|k| copies[k].as_ref())
        };
        // Per target: (offset, data, covers its granule whole with the full winner).
        let mut writes: BTreeMap<usize, Vec<(u64, Bytes, bool)>> = BTreeMap::new();
        let mut incomplete: Vec<(usize, u64)> = Vec::new();
        for (g, voters, targets) in &plan {
            if targets.is_empty() {
                continue;
            }
            let a = ((g - first) * GRANULE_BYTES) as usize;
            let z = granule_bytes(first, g + 1, q.length) as usize;
            let (u0, u1) = (a / unit, z.div_ceil(unit));
            let (gsn, gsc) = sectors(g * GRANULE_BYTES, (z - a) as u64);
            let votes: Vec<vote::Copy<'_>> = voters
                .iter()
                .filter_map(|&i| copy_of(i).map(|p| p.copy(i, a, z, u0, u1)))
                .collect();
            let all: Vec<vote::Copy<'_>> = readers
                .iter()
                .filter_map(|&i| copy_of(i).map(|p| p.copy(i, a, z, u0, u1)))
                .collect();
            let Some(mut voted) = vote::vote_with_fallback(&votes, &all, q.opts.threshold, unit)
            else {
                // No voter answered.
                q.failure(gsn, gsc);
                out.push(RunOutcome::Unrecoverable { granule: *g });
                continue;
            };
            // H22: granules of the intent extents a power cut left behind recover with
            // `recover=lowest` whichever resync job copies them.
            let recovering = !self.recover_lowest && q.recovering(*g);
            if recovering && !voted.holes.is_empty() {
                // H22 after a crash, no operator asked: a hole may be a read that failed or
                // flipped once. The granule is read again from every reader and the holes
                // voted again; what still has no winner takes the version most children hold
                // in the re-read, the lowest child's among equals (README D19).
                let gl = (z - a) as u64;
                let units = (gl as usize).div_ceil(unit);
                let again = read_copies(q, &st, &readers, &[], g * GRANULE_BYTES, gl, unit).await;
                let fresh: Vec<vote::Copy<'_>> = readers
                    .iter()
                    .zip(&again)
                    .filter_map(|(&i, p)| p.as_ref().map(|p| p.copy(i, 0, gl as usize, 0, units)))
                    .collect();
                if let Some(v2) = vote::vote_assembled(&fresh, q.opts.threshold, unit) {
                    for &(h0, h1) in &voted.holes.clone() {
                        for ua in (h0..h1).step_by(unit) {
                            let uz = (ua + unit).min(h1);
                            let every = fresh.len() == n
                                && fresh
                                    .iter()
                                    .all(|c| c.good.get(ua / unit).copied().unwrap_or(true));
                            let from = if v2.in_hole(ua) && !every {
                                // Some child's copy could not be read: another run could
                                // choose differently, and two children would end in sync on
                                // different data. Left for a later pass (H13).
                                None
                            } else if v2.in_hole(ua) {
                                // The version most children hold (a silent fault is one
                                // child's own), the lowest child's among equals.
                                let good: Vec<&[u8]> = fresh
                                    .iter()
                                    .filter(|c| c.good.get(ua / unit).copied().unwrap_or(true))
                                    .map(|c| &c.data[ua..uz])
                                    .collect();
                                let count = |b: &[u8]| good.iter().filter(|x| **x == b).count();
                                good.iter()
                                    .copied()
                                    .enumerate()
                                    .max_by_key(|(k, b)| (count(b), std::cmp::Reverse(*k)))
                                    .map(|(_, b)| b)
                            } else {
                                Some(&v2.data[ua..uz])
                            };
                            if let Some(b) = from {
                                voted.data[ua..uz].copy_from_slice(b);
                                voted.fill(ua, uz);
                            }
                        }
                    }
                }
            }
            if self.recover_lowest && !voted.holes.is_empty() {
                // H13, H22: any version is allowed; the lowest-index child that has the
                // sector fills it in.
                for &(h0, h1) in &voted.holes.clone() {
                    for ua in (h0..h1).step_by(unit) {
                        let uz = (ua + unit).min(h1);
                        let from = (0..n).find_map(|i| {
                            copy_of(i)
                                .filter(|p| p.good_at(u0 + ua / unit))
                                .map(|p| &p.data[a + ua..a + uz])
                        });
                        if let Some(b) = from {
                            voted.data[ua..uz].copy_from_slice(b);
                            voted.fill(ua, uz);
                        }
                    }
                }
            }
            // A voter that lost to the winner is stale: it joins O_c (and is fixed by this
            // job's next pass).
            for &l in &voted.losers {
                if !targets.contains(&l) {
                    q.report_bad(IoType::Read, None, &st.list[l], gsn, gsc);
                    q.update(&st.list[l], |s| s.mark(*g, g + 1));
                }
            }
            let complete = voted.holes.is_empty();
            if !complete {
                // H13: counted and reported once; the sectors that have a winner are still
                // copied below, and the granule stays out of sync.
                q.failure(gsn, gsc);
                out.push(RunOutcome::Unrecoverable { granule: *g });
            }
            // One buffer for every target of a complete granule (no copy per target).
            let whole = complete.then(|| Bytes::from(std::mem::take(&mut voted.data)));
            for &t in targets {
                let c = &st.list[t];
                let own = copy_of(t);
                // Units of the granule to write: a winner exists there, and the target's copy
                // is unreadable or different. A complete granule is written whole or not at all.
                let stale: Vec<usize> = match &whole {
                    Some(w) => {
                        let same = own.is_some_and(|p| {
                            (u0..u1).all(|u| p.good_at(u)) && p.data[a..z] == w[..]
                        });
                        if same {
                            Vec::new()
                        } else {
                            vec![0]
                        }
                    }
                    None => (0..z - a)
                        .step_by(unit)
                        .filter(|&ua| {
                            let uz = (ua + unit).min(z - a);
                            !voted.in_hole(ua)
                                && own.is_none_or(|p| {
                                    !p.good_at(u0 + ua / unit)
                                        || p.data[a + ua..a + uz] != voted.data[ua..uz]
                                })
                        })
                        .collect(),
                };
                if !complete {
                    incomplete.push((t, *g));
                }
                if stale.is_empty() {
                    if complete {
                        let after = c.dev.cache_epoch();
                        q.update(c, |s| s.compared_equal(*g, epochs[t], after));
                    }
                    out.push(RunOutcome::Equal {
                        child: c.name.clone(),
                        bytes: (z - a) as u64,
                    });
                } else if let Some(w) = &whole {
                    writes
                        .entry(t)
                        .or_default()
                        .push((g * GRANULE_BYTES, w.clone(), true));
                } else {
                    // Only the stale units, in runs; the rest keeps the target's bytes.
                    let mut k = 0;
                    while k < stale.len() {
                        let mut j = k + 1;
                        while j < stale.len() && stale[j] == stale[j - 1] + unit {
                            j += 1;
                        }
                        let (ra, rz) = (stale[k], (stale[j - 1] + unit).min(z - a));
                        writes.entry(t).or_default().push((
                            g * GRANULE_BYTES + ra as u64,
                            Bytes::copy_from_slice(&voted.data[ra..rz]),
                            false,
                        ));
                        k = j;
                    }
                }
            }
        }
        // Consecutive whole granules of one target go in one write (no FUA: H12's flush
        // follows).
        let mut futs: Vec<BoxFuture<'_, CopyWrite>> = Vec::new();
        for (t, list) in writes {
            let mut k = 0;
            while k < list.len() {
                let mut j = k + 1;
                while j < list.len()
                    && list[j].2
                    && list[j - 1].2
                    && list[j].0 == list[j - 1].0 + list[j - 1].1.len() as u64
                {
                    j += 1;
                }
                let o = list[k].0;
                let data: Bytes = if j - k == 1 {
                    list[k].1.clone()
                } else {
                    let mut b = BytesMut::with_capacity(list[k..j].iter().map(|x| x.1.len()).sum());
                    for (_, d, _) in &list[k..j] {
                        b.extend_from_slice(d);
                    }
                    b.freeze()
                };
                let c = &st.list[t];
                let l = data.len() as u64;
                futs.push(Box::pin(async move {
                    let r = q
                        .write_child(c, o, l, c.dev.write(o, data.clone(), WriteFlags::NONE))
                        .await;
                    (t, o, data, r)
                }));
                k = j;
            }
        }
        let results = join_all_with(futs, |_, _| {}).await;
        // A granule with holes stays out of sync whatever its writes did (H13).
        for (t, g) in incomplete {
            q.update(&st.list[t], |s| s.mark(g, g + 1));
        }
        for (t, offset, data, r) in results {
            let c = &st.list[t];
            match r {
                Ok(()) => {
                    let bytes = data.len() as u64;
                    q.audit(|| Audit::Copied {
                        child: t,
                        offset,
                        data,
                    });
                    out.push(RunOutcome::Copied {
                        child: c.name.clone(),
                        bytes,
                    });
                }
                Err(e) => {
                    q.report_bad(IoType::Write, Some(e.kind()), c, sn, sc);
                    out.push(RunOutcome::WriteFailed {
                        child: c.name.clone(),
                    });
                }
            }
        }
        out
    }
}

/// A resync write's outcome: target index, offset, data, result.
type CopyWrite = (usize, u64, Bytes, Result<()>);

/// One child's copy of a run: its bytes and, per unit, whether they could be read.
pub(crate) struct Piece {
    pub(crate) data: Bytes,
    /// Empty: every unit read.
    pub(crate) good: Vec<bool>,
}

impl Piece {
    pub(crate) fn good_at(&self, u: usize) -> bool {
        self.good.get(u).copied().unwrap_or(true)
    }

    /// The copy of bytes `[a, z)` (units `[u0, u1)`) for the vote.
    pub(crate) fn copy(
        &self,
        child: usize,
        a: usize,
        z: usize,
        u0: usize,
        u1: usize,
    ) -> vote::Copy<'_> {
        vote::Copy {
            child,
            data: &self.data[a..z],
            good: if self.good.is_empty() {
                &[]
            } else {
                &self.good[u0..u1]
            },
        }
    }
}

/// Reads `[off, off + len)` from each of `readers` (one request each); a child whose read
/// fails is read again granule by granule, and a granule that fails sector by sector, so one
/// latent sector error costs that sector, not the run. `None`: nothing could be read.
pub(crate) async fn read_copies(
    q: &Inner,
    st: &Children,
    readers: &[usize],
    probe: &[bool],
    off: u64,
    len: u64,
    unit: usize,
) -> Vec<Option<Piece>> {
    let (sn, sc) = sectors(off, len);
    let futs: Vec<BoxFuture<'_, Result<Bytes>>> = readers
        .iter()
        .zip(probe.iter().chain(std::iter::repeat(&false)))
        .map(|(&i, &probe)| -> BoxFuture<'_, Result<Bytes>> {
            let dev = &st.list[i].dev;
            Box::pin(async move {
                if probe {
                    // A target that reports the whole run as zeroes (an empty disk, a hole)
                    // is compared without reading it (H8: a new disk costs one request, not a
                    // read of every granule).
                    if let Ok(b) = dev.block_status(off, len).await {
                        if b.zero && b.length >= len {
                            return Ok(Bytes::from(vec![0u8; len as usize]));
                        }
                    }
                }
                dev.read(off, len as usize).await
            })
        })
        .collect();
    let results = join_all_with(futs, |k, r| {
        if let Err(e) = r {
            q.report_bad(IoType::Read, Some(e.kind()), &st.list[readers[k]], sn, sc);
        }
    })
    .await;
    let mut out = Vec::with_capacity(readers.len());
    for (k, r) in results.into_iter().enumerate() {
        match r {
            Ok(b) if b.len() as u64 == len => out.push(Some(Piece {
                data: b,
                good: Vec::new(),
            })),
            _ => out.push(read_pieces(&st.list[readers[k]], off, len, unit).await),
        }
    }
    out
}

async fn read_pieces(c: &super::Child, off: u64, len: u64, unit: usize) -> Option<Piece> {
    let units = (len as usize).div_ceil(unit);
    let mut data = BytesMut::zeroed(len as usize);
    let mut good = vec![false; units];
    let mut at = 0u64;
    while at < len {
        let gl = (GRANULE_BYTES - (off + at) % GRANULE_BYTES).min(len - at);
        if let Ok(b) = c.dev.read(off + at, gl as usize).await {
            if b.len() as u64 == gl {
                data[at as usize..(at + gl) as usize].copy_from_slice(&b);
                good[(at as usize / unit)..((at + gl) as usize).div_ceil(unit)].fill(true);
                at += gl;
                continue;
            }
        }
        let mut ua = at;
        while ua < at + gl {
            let ul = (unit as u64).min(at + gl - ua);
            if let Ok(b) = c.dev.read(off + ua, ul as usize).await {
                if b.len() as u64 == ul {
                    data[ua as usize..(ua + ul) as usize].copy_from_slice(&b);
                    good[ua as usize / unit] = true;
                }
            }
            ua += ul;
        }
        at += gl;
    }
    good.iter().any(|g| *g).then(|| Piece {
        data: data.freeze(),
        good,
    })
}

/// What one run did to one target or granule.
#[derive(Debug)]
enum RunOutcome {
    Copied { child: String, bytes: u64 },
    Equal { child: String, bytes: u64 },
    WriteFailed { child: String },
    Unrecoverable { granule: u64 },
}

impl Inner {
    /// H16: starts the resync job now. Returns its id.
    ///
    /// # Errors
    /// `Quorum '<Q>' already has a resync job`; the job registry's id errors.
    pub fn start_resync(
        self: &Arc<Self>,
        req: ResyncRequest,
    ) -> std::result::Result<String, String> {
        let ctl = self.register_job(
            super::JobKind::Resync,
            req.job_id.clone(),
            req.speed,
            req.auto_dismiss,
        )?;
        let id = ctl.id().to_string();
        if let Ok(st) = self.children.try_read() {
            let todo: u64 = st.list.iter().map(|c| c.oos_granules()).sum();
            ctl.progress(0, todo.saturating_mul(GRANULE_BYTES));
        }
        let q = self.clone();
        tokio::spawn(async move {
            ctl.start();
            let mut job = Resync::new(q.clone(), ctl.clone(), req.recover_lowest, None);
            let _ = job.run().await;
            let remaining = job.remaining().await;
            let done = job.tally.bytes_done;
            ctl.progress(done, done + remaining);
            q.jobs().resync = None;
            let t = job.tally;
            let error = (t.unrecoverable > 0).then_some(ErrorKind::Io);
            ctl.finish(
                error,
                vec![
                    ("copied", t.copied),
                    ("equal", t.equal),
                    ("unrecoverable", t.unrecoverable),
                ],
            );
        });
        Ok(id)
    }
}

/// H14: with `resync=auto`, starts a resync job when some reachable child is out of sync on
/// granules no job has scanned since they were marked, 1 s after it first sees them. Also
/// notices a child's new cache epoch (H7) while the guest is idle. Ends with the quorum.
pub(crate) async fn watch(q: Weak<Inner>) {
    let mut seen_since: Option<Instant> = None;
    let mut was_reachable: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        tokio::time::sleep(WATCH_EVERY).await;
        let Some(q) = q.upgrade() else { return };
        let mut candidate = false;
        let mut came_back = false;
        {
            let st = q.children.read().await;
            // COLO (REPLICATION.md): a `replication` child's secondary may change only through
            // forwarded guest writes and checkpoints; a background copy would land between
            // them. Its quorum heals only when asked (README D13).
            if st.list.iter().any(|c| c.dev.driver() == "replication") {
                continue;
            }
            for c in &st.list {
                q.observe(c);
                let reachable = c.dev.reachable();
                let before = was_reachable.insert(c.name.clone(), reachable);
                if c.oos_granules() > 0 && reachable {
                    candidate = true;
                    came_back |= before == Some(false);
                }
            }
        }
        let fresh = q.marks.load(Ordering::SeqCst) > q.settled_marks.load(Ordering::SeqCst);
        if came_back {
            // A target that was unreachable when the last job ended has work again.
            q.settled_marks.store(0, Ordering::SeqCst);
        }
        let running = q.jobs().resync.is_some();
        if running || !candidate || !(fresh || came_back) {
            seen_since = None;
            continue;
        }
        let since = *seen_since.get_or_insert_with(Instant::now);
        if Instant::now() - since < AUTO_START_DELAY {
            continue;
        }
        seen_since = None;
        let _ = q.start_resync(ResyncRequest::default());
    }
}
