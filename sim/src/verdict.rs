//! One guest operation's verdict (SIMULATION.md §6; I5, I7, I8): from the answers of the
//! child requests the op caused, what the quorum must return and which events it must emit,
//! one function per kind of operation, compared with what it did. The read vote is
//! [`crate::votemodel`]'s, the model `check/` shares; events are compared as typed values.
//! The oracle ([`crate::oracle`]) calls this for every op and keeps the sector history; the
//! configuration, findings and counters it shares with this module are defined here.

use crate::ids::{Path, Rule};
use std::collections::BTreeMap;
use std::fmt;

use ballot::drivers::quorum::Audit;
use ballot::events::{Event, IoType};
use ballot::ErrorKind;

use crate::oplog::{ChildKind, ChildOp, ChildResult};
use crate::sector::data_digest;
use crate::votemodel::{self, How, VoteRules};

/// A guest operation kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKind {
    /// Read.
    Read,
    /// Write of generated data.
    Write,
    /// Write-zeroes.
    WriteZeroes,
    /// Discard (trim).
    Trim,
    /// Flush.
    Flush,
    /// Block status (scripted steps only).
    BlockStatus,
}

impl OpKind {
    /// Scenario spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Read => "read",
            OpKind::Write => "write",
            OpKind::WriteZeroes => "write_zeroes",
            OpKind::Trim => "trim",
            OpKind::Flush => "flush",
            OpKind::BlockStatus => "block_status",
        }
    }

    /// Parses the scenario spelling.
    pub fn parse(s: &str) -> Option<OpKind> {
        [
            OpKind::Read,
            OpKind::Write,
            OpKind::WriteZeroes,
            OpKind::Trim,
            OpKind::Flush,
            OpKind::BlockStatus,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// One violated invariant as the oracle (or a check beside it) finds it: the rule, and the
/// guest op and sector it concerns. The run reports the first as its
/// [`crate::ids::Violation`].
#[derive(Debug, Clone)]
pub struct Finding {
    /// Rule id (`I1`, `I7`, ...).
    pub rule: Rule,
    /// Guest op.
    pub op: u64,
    /// Sector concerned, if any.
    pub sector: Option<u64>,
    /// What was wrong.
    pub message: String,
}

/// What the model needs to know about the configuration.
#[derive(Debug, Clone)]
pub struct ModelCfg {
    /// Children N.
    pub n: usize,
    /// Threshold t.
    pub t: usize,
    /// fifo read pattern.
    pub fifo: bool,
    /// rewrite-corrupted.
    pub rewrite: bool,
    /// Whether guest discards reach the children (Q46: discard=unmap and every child zeroes).
    pub discard_forwarded: bool,
    /// Initial image: write 0's pattern (true) or zeros.
    pub initial_pattern: bool,
    /// blkverify mode (Q33, Q34).
    pub blkverify: bool,
    /// Children's node-name prefix: `c` (local vdisks) or `r` (NBD replicas).
    pub prefix: &'static str,
    /// Writes may land late (NBD children, N43): history is never pruned, since a copy of
    /// any earlier write can still reach a disk.
    pub late_writes: bool,
    /// A beyond-budget run (B6, S7).
    pub beyond: bool,
    /// The quorum recovers a power cut with `recover=lowest` (a metadata node, HEALING.md
    /// H22): any version of a write that was not flushed may win, so after a crash of the
    /// quorum host only a write every child holds stays guaranteed.
    pub recover_any: bool,
}

/// Counters of outcomes and recovery paths (for the sweep report and I15).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Outcomes by "kind/result" (e.g. `read/ok`, `write/EIO`).
    pub outcomes: BTreeMap<String, u64>,
    /// Recovery paths reached (P1...).
    pub paths: BTreeMap<Path, u64>,
    /// Invariant checks performed, by rule.
    pub checks: BTreeMap<Rule, u64>,
    /// Errors in the safety phase (counted, not judged: O7).
    pub safety_errors: u64,
}

/// A quorum event as the oracle compares it (I8): expected and emitted events are compared
/// field by field. Displayed as one short line (`RB read c1 EIO 0/8`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ev {
    /// `QUORUM_REPORT_BAD`.
    Bad {
        /// The request's type.
        io: IoType,
        /// The child's node name.
        node: String,
        /// Its error; none for a mismatch.
        error: Option<ErrorKind>,
        /// `sector-num`, `sectors-count`.
        sectors: (u64, u64),
    },
    /// `QUORUM_FAILURE`.
    Failure {
        /// `sector-num`, `sectors-count`.
        sectors: (u64, u64),
    },
    /// A job's event (never expected of a guest op): its one-line form.
    Job(String),
}

impl Ev {
    /// The typed form of an emitted event.
    pub fn of(e: &Event) -> Ev {
        match e {
            Event::QuorumReportBad {
                io,
                error,
                node_name,
                sector_num,
                sectors_count,
            } => Ev::Bad {
                io: *io,
                node: node_name.clone(),
                error: *error,
                sectors: (*sector_num, *sectors_count),
            },
            Event::QuorumFailure {
                sector_num,
                sectors_count,
                ..
            } => Ev::Failure {
                sectors: (*sector_num, *sectors_count),
            },
            Event::BlockJobCompleted {
                device,
                offset,
                len,
                error,
                ..
            } => Ev::Job(format!(
                "JOB {device} {offset}/{len} {}",
                error.map(|k| k.errno_name()).unwrap_or("-")
            )),
            Event::JobStatusChange { id, status } => Ev::Job(format!("JOBSTATUS {id} {status}")),
        }
    }

    /// A mismatch report's child index (its node name past the prefix).
    fn mismatch_child(&self) -> Option<usize> {
        match self {
            Ev::Bad {
                node, error: None, ..
            } => Some(
                node.trim_start_matches(|c: char| !c.is_ascii_digit())
                    .parse()
                    .unwrap_or(0),
            ),
            _ => None,
        }
    }
}

impl fmt::Display for Ev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ev::Bad {
                io,
                node,
                error,
                sectors: (sn, sc),
            } => {
                let e = error.map(|k| k.errno_name()).unwrap_or("-");
                write!(f, "RB {} {node} {e} {sn}/{sc}", io.as_str())
            }
            Ev::Failure { sectors: (sn, sc) } => write!(f, "FAILURE {sn}/{sc}"),
            Ev::Job(s) => f.write_str(s),
        }
    }
}

/// What an op must do: its result (a read's data as its digest; a block status answer as
/// `zero << 63 | length`) and its events, in any order.
struct Expected {
    result: Result<Option<u64>, ErrorKind>,
    events: Vec<Ev>,
}

/// One guest op as the verdict sees it.
pub struct OpView<'a> {
    /// Guest op id.
    pub id: u64,
    /// Kind.
    pub kind: OpKind,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// FUA.
    pub fua: bool,
    /// The child requests it caused.
    pub children: &'a [ChildOp],
    /// The events it emitted.
    pub events: &'a [Event],
    /// The quorum's audit of the op (voters, eligible children), if it gave one.
    pub audit: Option<&'a Audit>,
    /// The audit of the flush it made (a FUA write's, or a flush's).
    pub flush_audit: Option<&'a Audit>,
    /// HEALING.md H21: the metadata node failed this request (F29).
    pub md_failed: bool,
}

fn bad(v: &mut Vec<Finding>, op: u64, rule: Rule, message: String) {
    v.push(Finding {
        rule,
        op,
        sector: None,
        message,
    });
}

fn answer(r: &ChildResult) -> Result<u64, ErrorKind> {
    match r {
        ChildResult::Ok(d) => Ok(*d),
        ChildResult::Err(e) => Err(*e),
    }
}

fn count(m: &mut BTreeMap<Path, u64>, p: Path) {
    *m.entry(p).or_default() += 1;
}

/// Judges one op (I5, I7, I8): its result and events against what the rules expect from its
/// children's answers; a read's repair writes too. Findings go to `v`, paths and checks to
/// `tally`.
pub fn judge(
    cfg: &ModelCfg,
    tally: &mut Tally,
    op: &OpView<'_>,
    result: &Result<Option<&[u8]>, ErrorKind>,
    v: &mut Vec<Finding>,
) {
    let j = Judge { cfg, op };
    let expected = match op.kind {
        OpKind::Read => j.read(tally, v),
        OpKind::Write | OpKind::WriteZeroes | OpKind::Trim => j.write(tally, v),
        OpKind::Flush => Some(j.flush(tally, op.flush_audit)),
        OpKind::BlockStatus => j.block_status(v),
    };
    let Some(Expected {
        result: want,
        events: want_events,
    }) = expected
    else {
        return;
    };
    *tally.checks.entry(Rule::I7).or_default() += 1;
    *tally.checks.entry(Rule::I8).or_default() += 1;
    j.check_result(want, result, v);
    j.check_events(want_events, v);
}

struct Judge<'a> {
    cfg: &'a ModelCfg,
    op: &'a OpView<'a>,
}

impl Judge<'_> {
    fn sectors(&self) -> (u64, u64) {
        ballot::events::sectors(self.op.offset, self.op.len)
    }

    fn rb(&self, io: IoType, child: usize, error: Option<ErrorKind>, sectors: (u64, u64)) -> Ev {
        Ev::Bad {
            io,
            node: format!("{}{child}", self.cfg.prefix),
            error,
            sectors,
        }
    }

    /// The vote's events as the quorum emits them for this read.
    fn vote_events(&self, events: &[votemodel::Event]) -> Vec<Ev> {
        let sectors = self.sectors();
        events
            .iter()
            .map(|e| match *e {
                votemodel::Event::Bad { child, error } => {
                    self.rb(IoType::Read, child, error, sectors)
                }
                votemodel::Event::Failure => Ev::Failure { sectors },
            })
            .collect()
    }

    /// A read (Q16–Q33 with HEALING.md H1): the children it asked, then the vote.
    fn read(&self, tally: &mut Tally, v: &mut Vec<Finding>) -> Option<Expected> {
        let (n, id) = (self.cfg.n, self.op.id);
        let reads: Vec<&ChildOp> = self
            .op
            .children
            .iter()
            .filter(|c| c.kind == ChildKind::Read)
            .collect();
        // HEALING.md H1: in-sync children first, in child order, then the out-of-sync ones
        // (README D9); the quorum's audit names the children it chose and their order;
        // without one, every child.
        let order: Vec<usize> = match self.op.audit {
            Some(Audit::Read { readers, .. }) => readers.clone(),
            _ => (0..n).collect(),
        };
        let rules = VoteRules {
            threshold: self.cfg.t,
            rewrite: self.cfg.rewrite,
            blkverify: self.cfg.blkverify,
        };
        let verdict = if self.cfg.fifo {
            // Q29–Q32: children in order until one succeeds.
            let tried = reads
                .iter()
                .position(|c| matches!(c.result, ChildResult::Ok(_)))
                .map_or(reads.len(), |k| k + 1);
            for (k, c) in reads[..tried].iter().enumerate() {
                if order.get(k) != Some(&c.disk) {
                    let m = format!(
                        "fifo read child {} out of order (expected {:?})",
                        c.disk,
                        order.get(k)
                    );
                    bad(v, id, Rule::I7, m);
                    return None;
                }
            }
            let answers: Vec<(usize, Result<u64, ErrorKind>)> = reads[..tried]
                .iter()
                .map(|c| (c.disk, answer(&c.result)))
                .collect();
            let verdict = votemodel::fifo(rules, &answers);
            match verdict.how {
                How::Served(k) => {
                    if reads.len() != k + 1 {
                        let m = format!("fifo read went on after c{k} succeeded");
                        bad(v, id, Rule::I7, m);
                    }
                    if k > 0 {
                        count(&mut tally.paths, Path::P5);
                    }
                }
                _ if reads.len() != order.len() => {
                    let m = format!("fifo read tried {} of {n} children and failed", reads.len());
                    bad(v, id, Rule::I7, m);
                }
                _ => {}
            }
            verdict
        } else {
            let answers = self.voters(&reads, &order, v)?;
            let verdict = votemodel::quorum(rules, &answers);
            match verdict.how {
                How::TooFewAnswers | How::TooFewVotes => count(&mut tally.paths, Path::P4),
                How::Tie => {
                    // I5 (Q23, D1): EIO + FAILURE, no mismatch event, no rewrite.
                    *tally.checks.entry(Rule::I5).or_default() += 1;
                    count(&mut tally.paths, Path::P4);
                }
                How::Agreed if answers.iter().all(|(_, a)| a.is_ok()) => {
                    count(&mut tally.paths, Path::P1)
                }
                How::Outvoted => {
                    count(&mut tally.paths, Path::P2);
                    if self.cfg.rewrite {
                        count(&mut tally.paths, Path::P3);
                    }
                }
                _ => {}
            }
            verdict
        };
        let data = verdict.result.as_ref().ok().copied();
        let rewrites: Vec<(usize, u64)> = data
            .map(|d| verdict.rewrites.iter().map(|&i| (i, d)).collect())
            .unwrap_or_default();
        self.check_repairs(&rewrites, verdict.result.is_err(), v);
        Some(Expected {
            result: verdict.result.map(Some),
            events: self.vote_events(&verdict.events),
        })
    }

    /// Q16 with HEALING.md H1: every voter the quorum chose asked once (children out of sync
    /// on the range do not vote while at least t others are in sync); their answers in child
    /// order.
    fn voters(
        &self,
        reads: &[&ChildOp],
        order: &[usize],
        v: &mut Vec<Finding>,
    ) -> Option<Vec<(usize, Result<u64, ErrorKind>)>> {
        let n = self.cfg.n;
        let mut res: Vec<Option<Result<u64, ErrorKind>>> = vec![None; n];
        let mut twice = false;
        for c in reads {
            if c.disk < n {
                twice |= res[c.disk].is_some();
                res[c.disk] = Some(answer(&c.result));
            }
        }
        let asked = res.iter().filter(|r| r.is_some()).count();
        let exact = (0..n).all(|i| res[i].is_some() == order.contains(&i));
        if twice || !exact || reads.len() != asked {
            let m = format!(
                "quorum read asked {} children, not each of {n} once (Q16)",
                reads.len()
            );
            bad(v, self.op.id, Rule::I7, m);
            return None;
        }
        Some(
            res.into_iter()
                .enumerate()
                .filter_map(|(i, r)| r.map(|r| (i, r)))
                .collect(),
        )
    }

    /// The repair writes: exactly the expected children, the winner's data, the whole range
    /// (Q26, Q27, Q32); their failures change nothing (Q28). The rewrite carries the winner's
    /// bytes, whose write digest equals their read digest. D7, D8: the read holds its range
    /// through its repairs, so no guest write can make a repair stale and none is skipped.
    fn check_repairs(&self, want: &[(usize, u64)], failed: bool, v: &mut Vec<Finding>) {
        let (offset, len) = (self.op.offset, self.op.len);
        let mut got: Vec<(usize, u64)> = self
            .op
            .children
            .iter()
            .filter(|c| c.kind == ChildKind::Write)
            .map(|c| {
                if c.offset != offset || c.len != len {
                    (usize::MAX, 0)
                } else {
                    (c.disk, c.data)
                }
            })
            .collect();
        got.sort_unstable();
        let mut want = want.to_vec();
        want.sort_unstable();
        if got != want {
            let rule = if want.is_empty() && failed {
                Rule::I5
            } else {
                Rule::I6
            };
            let m = format!("repair writes {got:?} (child, data digest), expected {want:?}");
            bad(v, self.op.id, rule, m);
        }
    }

    /// A write, write-zeroes or discard (Q34–Q40, Q46; HEALING.md H4, H21).
    fn write(&self, tally: &mut Tally, v: &mut Vec<Finding>) -> Option<Expected> {
        let (kind, id, t) = (self.op.kind, self.op.id, self.cfg.t);
        let ck = match kind {
            OpKind::Write => ChildKind::Write,
            OpKind::WriteZeroes => ChildKind::Zero,
            _ => ChildKind::Discard,
        };
        let writes: Vec<&ChildOp> = self.op.children.iter().filter(|c| c.kind == ck).collect();
        let mut events = Vec::new();
        if kind == OpKind::Trim && !self.cfg.discard_forwarded {
            if !writes.is_empty() {
                let m = "discard reached the children without the zeroing guarantee (Q46)";
                bad(v, id, Rule::I7, m.into());
            }
            return Some(Expected {
                result: Ok(None),
                events,
            });
        }
        if self.op.md_failed && writes.is_empty() {
            // H21: the intent could not be made durable; no child saw the write.
            return Some(Expected {
                result: Err(ErrorKind::Io),
                events,
            });
        }
        // The children the quorum had when it wrote (F30: one may be swapped out).
        let n = match self.op.audit {
            Some(Audit::Write { eligible, .. }) => eligible.len(),
            _ => self.cfg.n,
        };
        if writes.len() != n {
            let m = format!(
                "{} went to {} children, expected {n}",
                kind.as_str(),
                writes.len()
            );
            bad(v, id, Rule::I7, m);
            return None;
        }
        let mut errs: Vec<(usize, ErrorKind)> = writes
            .iter()
            .filter_map(|c| answer(&c.result).err().map(|e| (c.disk, e)))
            .collect();
        errs.sort_by_key(|(d, _)| *d);
        let sectors = self.sectors();
        for (d, e) in &errs {
            events.push(self.rb(IoType::Write, *d, Some(*e), sectors));
        }
        // H4: a success counts if the quorum's audit says the child was eligible (in sync,
        // covering, or a degraded range) and current (one epoch).
        let counted = writes
            .iter()
            .filter(|c| matches!(c.result, ChildResult::Ok(_)))
            .filter(|c| match self.op.audit {
                Some(Audit::Write { eligible, current }) => {
                    eligible.get(c.disk).copied().unwrap_or(false)
                        && current.get(c.disk).copied().unwrap_or(false)
                }
                _ => true,
            })
            .count();
        let result = if counted >= t {
            if !errs.is_empty() {
                count(&mut tally.paths, Path::P6);
            }
            if self.op.fua && kind == OpKind::Write {
                // H21: marks that could not be made durable (the write's or the FUA flush's)
                // fail it; the flush's events stand.
                let f = self.flush(tally, self.op.flush_audit);
                events.extend(f.events);
                if self.op.md_failed {
                    Err(ErrorKind::Io)
                } else {
                    f.result
                }
            } else if self.op.md_failed {
                Err(ErrorKind::Io)
            } else {
                Ok(None)
            }
        } else {
            let kinds: Vec<ErrorKind> = errs.iter().map(|(_, e)| *e).collect();
            events.push(Ev::Failure { sectors });
            count(&mut tally.paths, Path::P7);
            Err(votemodel::error_vote(&kinds))
        };
        Some(Expected { result, events })
    }

    /// Q41: each child flushed once, in order; `RB flush` 0/0 per failure; ok iff at least t
    /// children the quorum counts (D14: in sync on what the flush had to make durable)
    /// succeeded, else the voted error (Q20).
    fn flush(&self, tally: &mut Tally, audit: Option<&Audit>) -> Expected {
        let flushes: Vec<&ChildOp> = self
            .op
            .children
            .iter()
            .filter(|c| c.kind == ChildKind::Flush)
            .collect();
        let mut errs = Vec::new();
        let mut events = Vec::new();
        for c in &flushes {
            if let ChildResult::Err(e) = c.result {
                events.push(self.rb(IoType::Flush, c.disk, Some(e), (0, 0)));
                errs.push(e);
            }
        }
        // The children the quorum had when it flushed (HEALING.md F30: one may be swapped out).
        let n = match audit {
            Some(Audit::Flush { eligible }) => eligible.len(),
            _ => self.cfg.n,
        };
        let result = if flushes.len() != n {
            Err(ErrorKind::NotSup) // forces a mismatch report: not every child flushed
        } else {
            let counted = flushes
                .iter()
                .filter(|c| matches!(c.result, ChildResult::Ok(_)))
                .filter(|c| match audit {
                    Some(Audit::Flush { eligible }) => {
                        eligible.get(c.disk).copied().unwrap_or(false)
                    }
                    _ => true,
                })
                .count();
            if counted >= self.cfg.t {
                Ok(None)
            } else {
                count(&mut tally.paths, Path::P8);
                Err(votemodel::error_vote(&errs))
            }
        };
        Expected { result, events }
    }

    /// Block status (Q43, Q44): children in order; the first failure answers DATA over the
    /// whole count with one error event; otherwise the merge of all answers. The answer
    /// travels as `zero << 63 | length` in the digest slot.
    fn block_status(&self, v: &mut Vec<Finding>) -> Option<Expected> {
        let (n, id, len) = (self.cfg.n, self.op.id, self.op.len);
        let sts: Vec<&ChildOp> = self
            .op
            .children
            .iter()
            .filter(|c| c.kind == ChildKind::Status)
            .collect();
        let mut events = Vec::new();
        let mut answer = None;
        let (mut all_zero, mut zero_len, mut data_len) = (true, u64::MAX, 0u64);
        for (k, c) in sts.iter().enumerate() {
            if c.disk != k {
                let m = format!(
                    "block status asked {}{} out of order",
                    self.cfg.prefix, c.disk
                );
                bad(v, id, Rule::I7, m);
                return None;
            }
            match c.result {
                ChildResult::Err(e) => {
                    events.push(self.rb(IoType::Read, k, Some(e), self.sectors()));
                    answer = Some(len);
                    if sts.len() != k + 1 {
                        let m = format!("block status went on after c{k} failed (Q43)");
                        bad(v, id, Rule::I7, m);
                    }
                    break;
                }
                ChildResult::Ok(x) => {
                    let (z, l) = (x >> 63 == 1, (x & !(1 << 63)).clamp(1, len));
                    if z {
                        zero_len = zero_len.min(l);
                    } else {
                        all_zero = false;
                        data_len = data_len.max(l);
                    }
                }
            }
        }
        let result = match answer {
            Some(l) => l,
            None if sts.len() != n => {
                let m = format!("block status asked {} of {n} children", sts.len());
                bad(v, id, Rule::I7, m);
                return None;
            }
            None if all_zero => (1 << 63) | zero_len,
            None => data_len,
        };
        Some(Expected {
            result: Ok(Some(result)),
            events,
        })
    }

    /// The op's result against the model's (I7; I5 for a vote that returned data where a tie
    /// or the threshold says it must fail).
    fn check_result(
        &self,
        want: Result<Option<u64>, ErrorKind>,
        result: &Result<Option<&[u8]>, ErrorKind>,
        v: &mut Vec<Finding>,
    ) {
        let kind = self.op.kind;
        let mut want = want;
        let writes = matches!(
            kind,
            OpKind::Write | OpKind::WriteZeroes | OpKind::Trim | OpKind::Flush
        );
        if self.op.md_failed && want.is_ok() && writes {
            // H21: marks that could not be made durable fail a request the vote accepted.
            want = Err(ErrorKind::Io);
        }
        let got: Result<Option<u64>, ErrorKind> = match result {
            Ok(Some(d)) if kind == OpKind::BlockStatus => Ok(Some(u64::from_le_bytes(
                d[..8].try_into().unwrap_or([0; 8]),
            ))),
            Ok(Some(d)) => Ok(Some(data_digest(d))),
            Ok(None) => Ok(None),
            Err(k) => Err(*k),
        };
        if got == want {
            return;
        }
        let rule = match (&got, &want) {
            // A read that should have failed returned data: tie or threshold.
            (Ok(_), Err(_)) if kind == OpKind::Read && !self.cfg.fifo => Rule::I5,
            _ => Rule::I7,
        };
        let show = |r: &Result<Option<u64>, ErrorKind>| match r {
            Ok(Some(d)) => format!("ok(data {d:016x})"),
            Ok(None) => "ok".to_string(),
            Err(k) => k.errno_name().to_string(),
        };
        let m = format!(
            "{} returned {}, the vote model says {}",
            kind.as_str(),
            show(&got),
            show(&want)
        );
        bad(v, self.op.id, rule, m);
    }

    /// The op's events (I8): exactly the expected multiset, mismatch reports in ascending
    /// child order. A read that reported a mismatch where the model fails it is I5.
    fn check_events(&self, mut want: Vec<Ev>, v: &mut Vec<Finding>) {
        let id = self.op.id;
        let mut got: Vec<Ev> = self.op.events.iter().map(Ev::of).collect();
        let mismatches: Vec<usize> = got.iter().filter_map(Ev::mismatch_child).collect();
        if !mismatches.is_sorted() {
            let shown: Vec<String> = got
                .iter()
                .filter(|e| e.mismatch_child().is_some())
                .map(|e| e.to_string())
                .collect();
            let m = format!("mismatch events out of child order: {shown:?}");
            bad(v, id, Rule::I8, m);
        }
        got.sort();
        want.sort();
        if got == want {
            return;
        }
        let rule = if self.op.kind == OpKind::Read
            && want.iter().any(|e| matches!(e, Ev::Failure { .. }))
            && !mismatches.is_empty()
        {
            Rule::I5
        } else {
            Rule::I8
        };
        let show = |evs: &[Ev]| -> Vec<String> { evs.iter().map(|e| e.to_string()).collect() };
        let m = format!("events {:?}, expected {:?}", show(&got), show(&want));
        bad(v, id, rule, m);
    }
}
