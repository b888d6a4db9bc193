//! The verify job (HEALING.md H17–H18): reads every granule of a range from every child,
//! holding it shared in the quorum's request order (reads run, writes wait: no false positive
//! from a write in flight), compares the voters' copies (memcmp; SHA-256 only on a mismatch),
//! reports and marks each child that loses to a winner of at least t votes, and with
//! `repair=true` heals them with the resync's own copying before it concludes.

use std::sync::Arc;

use super::resync::{read_copies, Pacer, ProgressLog, Resync};
use super::sync::{granule_bytes, GranuleSet, GRANULE_BYTES};
use super::vote;
use super::Inner;
use crate::error::ErrorKind;
use crate::events::{sectors, IoType};
use crate::jobs::{Cancelled, JobControl};

/// What `x-quorum-verify` asks.
#[derive(Debug, Clone)]
pub struct VerifyRequest {
    /// `job-id`; default `<node>-verify`.
    pub job_id: Option<String>,
    /// `start`, bytes (rounded down to a granule).
    pub start: u64,
    /// `end`, bytes (rounded up to a granule, clipped to the disk); `None`: the disk's end.
    pub end: Option<u64>,
    /// `repair`.
    pub repair: bool,
    /// `speed`, bytes per second, 0 = no cap.
    pub speed: u64,
    /// QEMU's `auto-dismiss`.
    pub auto_dismiss: bool,
}

impl Default for VerifyRequest {
    fn default() -> VerifyRequest {
        VerifyRequest {
            job_id: None,
            start: 0,
            end: None,
            repair: true,
            speed: 0,
            auto_dismiss: true,
        }
    }
}

/// H18's counters.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VerifyTally {
    /// Granules compared.
    pub checked: u64,
    /// Granules where some voter lost to a winner.
    pub mismatched: u64,
    /// Mismatched granules in sync on every child when the job ended.
    pub repaired: u64,
    /// Granules with no winner.
    pub unrecoverable: u64,
}

impl Inner {
    /// H17: starts a verify job over `[start, end)`. Returns its id.
    ///
    /// # Errors
    /// A range past the disk's end or reversed; `Quorum '<Q>' already has a verify job`; the
    /// job registry's id errors.
    pub fn start_verify(
        self: &Arc<Self>,
        req: VerifyRequest,
    ) -> std::result::Result<String, String> {
        let end = req.end.unwrap_or(self.length);
        if end > self.length {
            return Err(format!(
                "Parameter 'end' ({end}) is beyond the end of quorum '{}' ({} bytes)",
                self.opts.node_name, self.length
            ));
        }
        if req.start > end {
            return Err(format!(
                "Parameter 'start' ({}) is after 'end' ({end})",
                req.start
            ));
        }
        let ctl = self.register_job(
            super::JobKind::Verify,
            req.job_id.clone(),
            req.speed,
            req.auto_dismiss,
        )?;
        let id = ctl.id().to_string();
        let q = self.clone();
        let first = req.start / GRANULE_BYTES;
        let last = end.div_ceil(GRANULE_BYTES);
        // The length is known now, as QEMU's `len` is from the job's creation.
        ctl.progress(0, granule_bytes(first, last, self.length));
        tokio::spawn(async move {
            ctl.start();
            let mut tally = VerifyTally::default();
            let r = verify(&q, &ctl, first, last, req.repair, &mut tally).await;
            q.jobs().verify = None;
            let error = match r {
                Err(Cancelled) => None,
                Ok(()) if tally.unrecoverable > 0 => Some(ErrorKind::Io),
                Ok(()) => None,
            };
            ctl.finish(
                error,
                vec![
                    ("checked", tally.checked),
                    ("mismatched", tally.mismatched),
                    ("repaired", tally.repaired),
                    ("unrecoverable", tally.unrecoverable),
                ],
            );
        });
        Ok(id)
    }
}

async fn verify(
    q: &Arc<Inner>,
    ctl: &Arc<JobControl>,
    first: u64,
    last: u64,
    repair: bool,
    tally: &mut VerifyTally,
) -> std::result::Result<(), Cancelled> {
    let total = granule_bytes(first, last, q.length);
    ctl.progress(0, total);
    let step = q.opts.resync_inflight as u64;
    let mut pacer = Pacer::new();
    let mut mismatched = GranuleSet::default();
    let mut scope = GranuleSet::default();
    let mut done = 0u64;
    let mut log = ProgressLog::new("verify");
    let mut g = first;
    while g < last {
        ctl.checkpoint().await?;
        let end = (g + step).min(last);
        let bytes = granule_bytes(g, end, q.length);
        pacer.pace(q, ctl, bytes).await;
        ctl.set_busy(true);
        check_run(q, g, end, tally, &mut mismatched, &mut scope).await;
        ctl.set_busy(false);
        done += bytes;
        ctl.progress(done, total);
        log.tick(q, done, total);
        g = end;
    }
    if repair && !scope.is_empty() {
        let mut job = Resync::new(q.clone(), ctl.clone(), false, Some(scope));
        job.run().await?;
    }
    let st = q.children.read().await;
    tally.repaired = mismatched
        .runs()
        .iter()
        .flat_map(|&(a, b)| a..b)
        .filter(|&x| st.list.iter().all(|c| c.in_sync(x, x + 1)))
        .count() as u64;
    Ok(())
}

/// Verifies granules `[first, end)` with one read per child.
async fn check_run(
    q: &Inner,
    first: u64,
    end: u64,
    tally: &mut VerifyTally,
    mismatched: &mut GranuleSet,
    scope: &mut GranuleSet,
) {
    let off = first * GRANULE_BYTES;
    let len = granule_bytes(first, end, q.length);
    let _hold = q.order(off, len, false).await;
    let st = q.children.read().await;
    let unit = q.request_alignment().max(512) as usize;
    let everyone: Vec<usize> = (0..st.list.len()).collect();
    let copies = read_copies(q, &st, &everyone, &[], off, len, unit).await;
    for g in first..end {
        tally.checked += 1;
        let a = ((g - first) * GRANULE_BYTES) as usize;
        let z = granule_bytes(first, g + 1, q.length) as usize;
        let (u0, u1) = (a / unit, z.div_ceil(unit));
        let (voters, degraded) = q.voters(&st, g, g + 1);
        let votes: Vec<vote::Copy<'_>> = voters
            .iter()
            .filter_map(|&i| copies[i].as_ref().map(|p| p.copy(i, a, z, u0, u1)))
            .collect();
        let all: Vec<vote::Copy<'_>> = everyone
            .iter()
            .filter_map(|&i| copies[i].as_ref().map(|p| p.copy(i, a, z, u0, u1)))
            .collect();
        let (gsn, gsc) = sectors(g * GRANULE_BYTES, (z - a) as u64);
        let Some(voted) = vote::vote_with_fallback(&votes, &all, q.opts.threshold, unit) else {
            // No voter answered.
            tally.unrecoverable += 1;
            q.failure(gsn, gsc);
            continue;
        };
        if !voted.losers.is_empty() {
            tally.mismatched += 1;
            mismatched.insert_range(g, g + 1);
        }
        for &l in &voted.losers {
            if !degraded || st.list[l].in_sync(g, g + 1) {
                q.report_bad(IoType::Read, None, &st.list[l], gsn, gsc);
            }
            q.update(&st.list[l], |s| s.mark(g, g + 1));
        }
        if !voted.holes.is_empty() {
            tally.unrecoverable += 1;
            q.failure(gsn, gsc);
        }
        // The repair also heals children already out of sync here (they did not vote).
        if st.list.iter().any(|c| !c.in_sync(g, g + 1)) {
            scope.insert_range(g, g + 1);
        }
    }
}
