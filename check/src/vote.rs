//! Fuzz target `quorum_vote`: the quorum read vote (QUORUM.md Q16–Q33, D1, D2, D6) against
//! a reference model written from the rules, not from the driver.
//!
//! The input picks a configuration (children, `vote-threshold`, `read-pattern`,
//! `rewrite-corrupted`, `blkverify`), each child's content (a common base with chosen bytes
//! flipped), and a few reads, each with per-child read errors and silent corruption injected
//! first. For every read the model predicts the result (data or the voted error kind), the
//! events in order (`QUORUM_REPORT_BAD` with or without `error`, `QUORUM_FAILURE`), the
//! rewrites and which of them fail into out-of-sync ranges (Q49), and a blkverify fatal
//! (D6); the real [`Quorum`] must match all of it exactly. Configurations that break Q7–Q12
//! must be refused with the model's message.

use std::collections::BTreeSet;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use ballot::drivers::quorum::{
    OutOfSyncReport, Quorum, QuorumOptions, ReadPattern, OUT_OF_SYNC_GRANULARITY_BYTES,
};
use ballot::events::{Event, EventBus, IoType, Stream};
use ballot::host::Host;
use ballot::{BlockDevice, Device, ErrorKind};

use ballot_sim::votemodel::{self, VoteRules};

use crate::child::{Faults, FaultyChild};

/// Each child's length: two 64 KiB out-of-sync granules and a shorter third.
pub const CHILD_BYTES: usize = 2 * 65536 + 4096;
const SECTOR: usize = 512;

/// One child of the case.
#[derive(Debug, Arbitrary)]
pub struct ChildCase {
    /// Bytes flipped in this child's copy before the first read: `(position seed, mask)`.
    pub flips: Vec<(u16, u8)>,
    /// Rewrites to this child fail with EIO (Q49).
    pub rewrite_fails: bool,
}

/// One read of the case.
#[derive(Debug, Arbitrary)]
pub struct ReadCase {
    /// First sector (wrapped into the disk).
    pub sector: u16,
    /// Sectors, 1–16.
    pub sectors: u8,
    /// Per child: `Some(k)` makes the child's read fail with kind `k` (an index into
    /// [`ErrorKind::ALL`]).
    pub errors: Vec<Option<u8>>,
    /// Silent corruption applied before the read: `(child, position seed, mask)`.
    pub flips: Vec<(u8, u16, u8)>,
}

/// A whole case.
#[derive(Debug, Arbitrary)]
pub struct VoteCase {
    /// `vote-threshold`, used as given (0 and values above the child count must be refused).
    pub threshold: u8,
    /// `read-pattern=fifo`.
    pub fifo: bool,
    /// `rewrite-corrupted`.
    pub rewrite: bool,
    /// `blkverify`.
    pub blkverify: bool,
    /// The children (at most 9 are used).
    pub children: Vec<ChildCase>,
    /// The reads (at most 6 are used).
    pub reads: Vec<ReadCase>,
}

/// An event as the model predicts it: the shared vote model's ([`ballot_sim::votemodel`]).
pub use ballot_sim::votemodel::Event as Ev;

/// What a read must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The data returned, or the error kind.
    pub result: Result<Vec<u8>, ErrorKind>,
    /// Events, in order.
    pub events: Vec<Ev>,
    /// Children the winning data is written back to (Q26–Q28, Q32).
    pub rewrites: Vec<usize>,
    /// A blkverify mismatch ends the process (D6).
    pub fatal: bool,
}

/// Q20's error vote: the shared vote model's.
pub use ballot_sim::votemodel::error_vote as model_error_vote;

/// Q7–Q12 in QUORUM.md §3's order: the message a configuration is refused with.
pub fn model_validate(
    children: usize,
    threshold: i64,
    fifo: bool,
    rewrite: bool,
    blkverify: bool,
) -> Option<&'static str> {
    if children == 0 {
        Some("Number of provided children must be 1 or more")
    } else if threshold < 1 {
        Some("Parameter 'vote-threshold' expects a value >= 1")
    } else if threshold > children as i64 {
        Some("threshold may not exceed children count")
    } else if blkverify && fifo {
        Some("blkverify=on cannot be used with read-pattern=fifo")
    } else if blkverify && (children != 2 || threshold != 2) {
        Some("blkverify=on can only be set if there are exactly two files and vote-threshold is 2")
    } else if blkverify && rewrite {
        Some("rewrite-corrupted=on cannot be used with blkverify=on")
    } else {
        None
    }
}

/// The reference vote over every child's answer, in child order.
///
/// `stale[i]`: child i is out of sync on the range. HEALING.md H1: while at least t children
/// are in sync, only they are read (no event, no repair for the others, H2); fifo tries the
/// out-of-sync ones last, and a quorum read whose in-sync voters give fewer than t copies
/// reads the others too (README D9). With fewer than t in sync, every child, in child order.
pub fn model_read(
    threshold: usize,
    fifo: bool,
    rewrite: bool,
    blkverify: bool,
    answers: &[Result<Vec<u8>, ErrorKind>],
    stale: &[bool],
) -> Verdict {
    let n = answers.len();
    let in_sync: Vec<usize> = (0..n).filter(|&i| !stale[i]).collect();
    // In-sync children first, then the others (fifo's last resort, or a quorum read whose
    // in-sync batch answered fewer than t copies: its errors are reported first).
    let in_sync_first: Vec<usize> = in_sync
        .iter()
        .copied()
        .chain((0..n).filter(|&i| stale[i]))
        .collect();
    let order: Vec<usize> = if in_sync.len() < threshold {
        (0..n).collect()
    } else if fifo || in_sync.iter().filter(|&&i| answers[i].is_ok()).count() < threshold {
        in_sync_first
    } else {
        in_sync
    };
    let answers: Vec<(usize, Result<Vec<u8>, ErrorKind>)> =
        order.iter().map(|&i| (i, answers[i].clone())).collect();
    // The vote itself is the model the simulator's oracle uses too.
    let rules = VoteRules {
        threshold,
        rewrite,
        blkverify,
    };
    let v = if fifo {
        votemodel::fifo(rules, &answers)
    } else {
        votemodel::quorum(rules, &answers)
    };
    Verdict {
        result: v.result,
        events: v.events,
        rewrites: v.rewrites,
        fatal: v.fatal,
    }
}

/// The 64 KiB out-of-sync granules a range touches (Q47).
pub fn granules(offset: u64, len: u64) -> std::ops::Range<u64> {
    let g = OUT_OF_SYNC_GRANULARITY_BYTES;
    offset / g..(offset + len).div_ceil(g)
}

/// Q49, Q51: each child's out-of-sync report (children named `c<i>`) equals its model
/// granules, merged and the last clipped to the disk's `length`.
///
/// # Panics
/// On the first child whose ranges differ.
pub fn check_out_of_sync(reports: &[OutOfSyncReport], model: &[BTreeSet<u64>], length: u64) {
    let g = OUT_OF_SYNC_GRANULARITY_BYTES;
    for (i, granules) in model.iter().enumerate() {
        let mut want: Vec<(u64, u64)> = Vec::new();
        for &k in granules {
            let (a, b) = (k * g, ((k + 1) * g).min(length));
            match want.last_mut() {
                Some((o, l)) if *o + *l == a => *l += b - a,
                _ => want.push((a, b - a)),
            }
        }
        let got = reports
            .iter()
            .find(|r| r.node_name == format!("c{i}"))
            .map(|r| r.ranges.clone())
            .unwrap_or_default();
        assert_eq!(got, want, "Q51: out-of-sync ranges of child {i}");
    }
}

/// The events a quorum named `q` over children `c<i>` emitted, in the model's terms, with
/// their I/O type for REPORT_BAD. Checks Q57 on the way: every event carries the request's
/// `range` (sector-num, sectors-count), except a flush's REPORT_BAD, which carries 0/0.
///
/// # Panics
/// On a Q57 or reference mismatch, or an event that is not a quorum event.
pub fn recorded(events: Vec<Event>, range: (u64, u64), ctx: &str) -> Vec<(Ev, Option<IoType>)> {
    events
        .into_iter()
        .map(|e| match e {
            Event::QuorumReportBad {
                io,
                error,
                node_name,
                sector_num,
                sectors_count,
            } => {
                let want = if io == IoType::Flush { (0, 0) } else { range };
                assert_eq!((sector_num, sectors_count), want, "{ctx}: Q57");
                let child = node_name[1..].parse().expect("child node name");
                (Ev::Bad { child, error }, Some(io))
            }
            Event::QuorumFailure {
                reference,
                sector_num,
                sectors_count,
            } => {
                assert_eq!(reference, "q", "{ctx}: FAILURE reference");
                assert_eq!((sector_num, sectors_count), range, "{ctx}: Q57");
                (Ev::Failure, None)
            }
            other => panic!("{ctx}: unexpected event {other:?}"),
        })
        .collect()
}

fn base_content() -> Vec<u8> {
    (0..CHILD_BYTES).map(|i| (i % 251) as u8).collect()
}

fn position(seed: u16) -> usize {
    (seed as usize * 9973) % CHILD_BYTES
}

/// Runs one case; panics on any difference from the model.
pub fn check(case: &VoteCase) {
    crate::rt::block_on(check_async(case));
}

async fn check_async(case: &VoteCase) {
    let n = case.children.len().min(9);
    let bus = EventBus::new();
    let rec = bus.record(Stream::Internal);
    let (host, captured) = Host::recording(bus.clone());
    let mut model: Vec<Vec<u8>> = Vec::new();
    let mut kids = Vec::new();
    for c in &case.children[..n] {
        let mut mem = base_content();
        for &(at, mask) in &c.flips {
            mem[position(at)] ^= mask;
        }
        let child = Arc::new(FaultyChild::new(mem.clone()));
        model.push(mem);
        kids.push(child);
    }
    let t = case.threshold as usize;
    let mut opts = QuorumOptions::new("q", t);
    opts.read_pattern = if case.fifo {
        ReadPattern::Fifo
    } else {
        ReadPattern::Quorum
    };
    opts.rewrite_corrupted = case.rewrite;
    opts.blkverify = case.blkverify;
    // One read's rules at a time: no background resync (HEALING.md H14).
    opts.resync = ballot::drivers::quorum::ResyncMode::Manual;
    let children: Vec<(String, Device)> = kids
        .iter()
        .enumerate()
        .map(|(i, c)| (format!("c{i}"), c.clone() as Device))
        .collect();
    let opened = Quorum::open(opts, children, host);
    let refused = model_validate(n, t as i64, case.fifo, case.rewrite, case.blkverify);
    let q = match (opened, refused) {
        (Ok(q), None) => q,
        (Err(e), Some(m)) => {
            assert_eq!(e.to_string(), m, "Q7-Q12: wrong refusal");
            return;
        }
        (Ok(_), Some(m)) => panic!("Q7-Q12: opened a configuration the model refuses: {m}"),
        (Err(e), None) => panic!("Q7-Q12: refused a valid configuration: {e}"),
    };
    // Q15: one warning exactly when the threshold is not a strict majority.
    assert_eq!(
        captured.warnings().len(),
        usize::from(2 * t <= n),
        "Q15 warning"
    );
    assert_eq!(q.length().ok(), Some(CHILD_BYTES as u64));
    let mut out_of_sync = vec![BTreeSet::new(); n];
    for (ri, r) in case.reads.iter().take(6).enumerate() {
        for &(c, at, mask) in &r.flips {
            if n > 0 {
                let c = c as usize % n;
                kids[c].flip(position(at), mask);
                model[c][position(at)] ^= mask;
            }
        }
        let total = CHILD_BYTES / SECTOR;
        let sectors = 1 + r.sectors as usize % 16;
        let first = r.sector as usize % (total - sectors + 1);
        let (off, len) = (first * SECTOR, sectors * SECTOR);
        let mut answers = Vec::with_capacity(n);
        for (i, kid) in kids.iter().enumerate() {
            let err = r
                .errors
                .get(i)
                .copied()
                .flatten()
                .map(|k| ErrorKind::ALL[k as usize % ErrorKind::ALL.len()]);
            kid.set_faults(Faults {
                read: err,
                write: case.children[i].rewrite_fails.then_some(ErrorKind::Io),
                ..Faults::default()
            });
            kid.take_writes();
            answers.push(match err {
                Some(k) => Err(k),
                None => Ok(model[i][off..off + len].to_vec()),
            });
        }
        let touched = granules(off as u64, len as u64);
        let stale: Vec<bool> = (0..n)
            .map(|i| touched.clone().any(|g| out_of_sync[i].contains(&g)))
            .collect();
        let want = model_read(t, case.fifo, case.rewrite, case.blkverify, &answers, &stale);
        rec.clear();
        let got = q.read(off as u64, len).await;
        let ctx = format!("read {ri} at {off}+{len}");
        match (&got, &want.result) {
            (Ok(d), Ok(w)) => assert!(d[..] == w[..], "{ctx}: wrong data"),
            (Err(e), Err(k)) => assert_eq!(e.kind(), *k, "{ctx}: wrong error kind"),
            _ => panic!(
                "{ctx}: got {:?}, model {:?}",
                got.as_ref().map(|d| d.len()),
                want.result.as_ref().map(|d| d.len())
            ),
        }
        let range = ((off / SECTOR) as u64, (len / SECTOR) as u64);
        let events: Vec<Ev> = recorded(rec.take(), range, &ctx)
            .into_iter()
            .map(|(e, io)| {
                assert!(
                    io.is_none_or(|io| io == IoType::Read),
                    "{ctx}: REPORT_BAD type"
                );
                e
            })
            .collect();
        assert_eq!(events, want.events, "{ctx}: events");
        assert_eq!(
            captured.fatals().len(),
            usize::from(want.fatal),
            "{ctx}: blkverify fatal"
        );
        if want.fatal {
            return; // The process would have ended.
        }
        // Rewrites: every target gets the winning data over the request range.
        let winner = want.result.as_ref().ok();
        for (i, kid) in kids.iter().enumerate() {
            let writes = kid.take_writes();
            if want.rewrites.contains(&i) {
                assert_eq!(
                    writes,
                    vec![(off as u64, len)],
                    "{ctx}: rewrite of child {i}"
                );
                if case.children[i].rewrite_fails {
                    out_of_sync[i].extend(granules(off as u64, len as u64));
                } else if let Some(w) = winner {
                    model[i][off..off + len].copy_from_slice(w);
                }
            } else {
                assert_eq!(writes, vec![], "{ctx}: child {i} must not be written");
            }
            assert!(kid.contents() == model[i], "{ctx}: child {i} contents");
        }
    }
    // Q49, Q51: failed rewrites, aligned to 64 KiB, merged, the last clipped to the length.
    check_out_of_sync(&q.out_of_sync().await, &out_of_sync, CHILD_BYTES as u64);
}

/// The fuzz target.
pub fn fuzz(data: &[u8]) {
    if let Ok(case) = VoteCase::arbitrary_take_rest(Unstructured::new(data)) {
        check(&case);
    }
}
