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
use crate::sector::{data_digest, write_digest};
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

#[cfg(test)]
impl ModelCfg {
    /// The oracle's tests' configuration: `n` local children with threshold `t`, quorum
    /// reads, initial pattern, nothing else on.
    pub(crate) fn plain(n: usize, t: usize) -> ModelCfg {
        ModelCfg {
            n,
            t,
            fifo: false,
            rewrite: false,
            discard_forwarded: false,
            initial_pattern: true,
            blkverify: false,
            prefix: "c",
            late_writes: false,
            beyond: false,
            recover_any: false,
        }
    }
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
        OpKind::Flush => j.flush(tally, op.flush_audit, v),
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
                        let (p, c) = (self.cfg.prefix, answers[k].0);
                        let m = format!("fifo read went on after {p}{c} succeeded");
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

    /// Why `reqs` are not one request to each of children 0..n (a write's or a flush's), or
    /// none: naming the children asked, in the order they answered.
    fn each_once(&self, reqs: &[&ChildOp], n: usize) -> Option<String> {
        let mut seen = vec![false; n];
        let once = reqs.len() == n
            && reqs
                .iter()
                .all(|c| c.disk < n && !std::mem::replace(&mut seen[c.disk], true));
        if once {
            return None;
        }
        let asked: Vec<String> = reqs
            .iter()
            .map(|c| format!("{}{}", self.cfg.prefix, c.disk))
            .collect();
        Some(format!(
            "[{}], not each of {n} children once",
            asked.join(", ")
        ))
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
        if let Some(m) = self.each_once(&writes, n) {
            bad(v, id, Rule::I7, format!("{} went to {m}", kind.as_str()));
            return None;
        }
        // Q36: each child gets the guest's request: its range and (a write) its bytes.
        let data = match kind {
            OpKind::Write => write_digest(id, self.op.offset, self.op.len),
            _ => 0,
        };
        if let Some(c) = writes
            .iter()
            .find(|c| (c.offset, c.len, c.data) != (self.op.offset, self.op.len, data))
        {
            let m = format!(
                "{} sent {}{} {}+{} data {:016x}, not the guest's {}+{} data {data:016x} (Q36)",
                kind.as_str(),
                self.cfg.prefix,
                c.disk,
                c.offset,
                c.len,
                c.data,
                self.op.offset,
                self.op.len
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
                let f = self.flush(tally, self.op.flush_audit, v)?;
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

    /// Q41: each child flushed once; `RB flush` 0/0 per failure; ok iff at least t children
    /// the quorum counts (D14: in sync on what the flush had to make durable) succeeded, else
    /// the voted error (Q20). A flush that skipped a child or flushed one twice is I7.
    fn flush(
        &self,
        tally: &mut Tally,
        audit: Option<&Audit>,
        v: &mut Vec<Finding>,
    ) -> Option<Expected> {
        let flushes: Vec<&ChildOp> = self
            .op
            .children
            .iter()
            .filter(|c| c.kind == ChildKind::Flush)
            .collect();
        if self.op.md_failed && flushes.is_empty() {
            // H21: the metadata node failed the request before any child was flushed.
            return Some(Expected {
                result: Err(ErrorKind::Io),
                events: Vec::new(),
            });
        }
        // The children the quorum had when it flushed (HEALING.md F30: one may be swapped out).
        let n = match audit {
            Some(Audit::Flush { eligible }) => eligible.len(),
            _ => self.cfg.n,
        };
        if let Some(m) = self.each_once(&flushes, n) {
            let what = if self.op.kind == OpKind::Flush {
                "flush went to"
            } else {
                // Q40: a FUA write the vote accepted is made durable by a quorum flush.
                "the FUA write's flush went to"
            };
            bad(v, self.op.id, Rule::I7, format!("{what} {m} (Q41)"));
            return None;
        }
        let mut errs = Vec::new();
        let mut events = Vec::new();
        for c in &flushes {
            if let ChildResult::Err(e) = c.result {
                events.push(self.rb(IoType::Flush, c.disk, Some(e), (0, 0)));
                errs.push(e);
            }
        }
        let counted = flushes
            .iter()
            .filter(|c| matches!(c.result, ChildResult::Ok(_)))
            .filter(|c| match audit {
                Some(Audit::Flush { eligible }) => eligible.get(c.disk).copied().unwrap_or(false),
                _ => true,
            })
            .count();
        let result = if counted >= self.cfg.t {
            Ok(None)
        } else {
            count(&mut tally.paths, Path::P8);
            Err(votemodel::error_vote(&errs))
        };
        Some(Expected { result, events })
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
                        let m = format!(
                            "block status went on after {}{k} failed (Q43)",
                            self.cfg.prefix
                        );
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

#[cfg(test)]
mod tests {
    //! One guest op at a time through [`judge`]: the children's answers, then the quorum's
    //! result and events. For each rule, the right answer gives no finding and the smallest
    //! wrong one gives exactly the expected finding.

    use super::*;
    use ballot::ErrorKind::{Io, NoSpc};

    /// The op every test judges.
    const OP: u64 = 7;

    /// A child request over the op's range (sector 0, one sector).
    fn ch(disk: usize, kind: ChildKind, result: ChildResult) -> ChildOp {
        let len = if kind == ChildKind::Flush { 0 } else { 512 };
        ChildOp {
            disk,
            kind,
            offset: 0,
            len,
            data: if kind == ChildKind::Write {
                write_digest(OP, 0, 512)
            } else {
                0
            },
            result,
        }
    }

    fn ok(d: u64) -> ChildResult {
        ChildResult::Ok(d)
    }

    fn err(k: ErrorKind) -> ChildResult {
        ChildResult::Err(k)
    }

    /// Guest op `OP` of `kind` on sector 0 (a flush: no range), no FUA, no audit.
    fn op<'a>(kind: OpKind, children: &'a [ChildOp], events: &'a [Event]) -> OpView<'a> {
        OpView {
            id: OP,
            kind,
            offset: 0,
            len: if kind == OpKind::Flush { 0 } else { 512 },
            fua: false,
            children,
            events,
            audit: None,
            flush_audit: None,
            md_failed: false,
        }
    }

    /// The findings for `op` completed with `result`, as (rule, message); each must name the
    /// op (the verdict knows no sector).
    fn verdict(
        cfg: &ModelCfg,
        op: &OpView<'_>,
        result: Result<Option<&[u8]>, ErrorKind>,
    ) -> Vec<(Rule, String)> {
        let mut v = Vec::new();
        judge(cfg, &mut Tally::default(), op, &result, &mut v);
        for f in &v {
            assert_eq!((f.op, f.sector), (OP, None), "{f:?}");
        }
        v.into_iter().map(|f| (f.rule, f.message)).collect()
    }

    /// `QUORUM_REPORT_BAD` of child `c` for a one-sector request at sector 0 (a flush: 0/0).
    fn rb(io: IoType, c: usize, error: Option<ErrorKind>) -> Event {
        Event::QuorumReportBad {
            io,
            error,
            node_name: format!("c{c}"),
            sector_num: 0,
            sectors_count: u64::from(io != IoType::Flush),
        }
    }

    fn failure() -> Event {
        Event::QuorumFailure {
            reference: "q0".into(),
            sector_num: 0,
            sectors_count: 1,
        }
    }

    /// One sector of `fill` bytes: a version of the data, and its digest.
    fn version(fill: u8) -> (Vec<u8>, u64) {
        let b = vec![fill; 512];
        let d = data_digest(&b);
        (b, d)
    }

    fn reads(answers: &[ChildResult]) -> Vec<ChildOp> {
        answers
            .iter()
            .enumerate()
            .map(|(d, r)| ch(d, ChildKind::Read, r.clone()))
            .collect()
    }

    fn writes(kind: ChildKind, answers: &[ChildResult]) -> Vec<ChildOp> {
        answers
            .iter()
            .enumerate()
            .map(|(d, r)| ch(d, kind, r.clone()))
            .collect()
    }

    fn s(x: &str) -> String {
        x.to_string()
    }

    #[test]
    fn a_read_that_fails_although_one_version_had_t_votes_is_i7() {
        let ((a, da), (_, db)) = (version(1), version(2));
        let children = reads(&[ok(da), ok(da), ok(db)]);
        let events = [rb(IoType::Read, 2, None)];
        let view = op(OpKind::Read, &children, &events);
        // Q25: the version of c0 and c1 wins; c2 is reported as outvoted.
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view, Ok(Some(&a))), []);
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view, Err(Io)),
            [(
                Rule::I7,
                format!("read returned EIO, the vote model says ok(data {da:016x})")
            )]
        );
    }

    #[test]
    fn a_child_whose_read_failed_is_reported_with_its_error_and_not_as_outvoted() {
        let (a, da) = version(1);
        let children = reads(&[ok(da), err(Io), ok(da)]);
        let right = [rb(IoType::Read, 1, Some(Io))];
        let view = op(OpKind::Read, &children, &right);
        // Q17, Q19: c1's failure is reported with its error; c0 and c2 agree.
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view, Ok(Some(&a))), []);
        let as_mismatch = [rb(IoType::Read, 1, None)];
        let view = op(OpKind::Read, &children, &as_mismatch);
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view, Ok(Some(&a))),
            [(
                Rule::I8,
                s("events [\"RB read c1 - 0/1\"], expected [\"RB read c1 EIO 0/1\"]")
            )]
        );
    }

    #[test]
    fn a_read_with_fewer_than_t_answers_fails_with_the_error_vote_and_quorum_failure() {
        let (a, da) = version(1);
        let children = reads(&[err(NoSpc), ok(da), err(NoSpc)]);
        let events = [
            rb(IoType::Read, 0, Some(NoSpc)),
            rb(IoType::Read, 2, Some(NoSpc)),
            failure(),
        ];
        let view = op(OpKind::Read, &children, &events);
        // Q18, Q20: one answer for t = 2; both failures say ENOSPC.
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view, Err(NoSpc)), []);
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view, Err(Io)),
            [(Rule::I7, s("read returned EIO, the vote model says ENOSPC"))]
        );
        // Serving the one answer anyway is I5: the threshold says the read must fail.
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view, Ok(Some(&a))),
            [(
                Rule::I5,
                format!("read returned ok(data {da:016x}), the vote model says ENOSPC")
            )]
        );
    }

    #[test]
    fn a_tie_that_reports_a_mismatch_or_repairs_a_child_is_i5() {
        let ((_, da), (_, db)) = (version(1), version(2));
        let mut c = ModelCfg::plain(4, 2);
        c.rewrite = true;
        let children = reads(&[ok(da), ok(da), ok(db), ok(db)]);
        let right = [failure()];
        // Q23, D1: EIO and QUORUM_FAILURE, no mismatch report, no repair.
        assert_eq!(
            verdict(&c, &op(OpKind::Read, &children, &right), Err(Io)),
            []
        );
        let reported = [
            rb(IoType::Read, 2, None),
            rb(IoType::Read, 3, None),
            failure(),
        ];
        assert_eq!(
            verdict(&c, &op(OpKind::Read, &children, &reported), Err(Io)),
            [(
                Rule::I5,
                s(
                    "events [\"RB read c2 - 0/1\", \"RB read c3 - 0/1\", \"FAILURE 0/1\"], \
                   expected [\"FAILURE 0/1\"]"
                )
            )]
        );
        let mut repaired = children.clone();
        repaired.push(ChildOp {
            data: da,
            ..ch(2, ChildKind::Write, ok(0))
        });
        assert_eq!(
            verdict(&c, &op(OpKind::Read, &repaired, &right), Err(Io)),
            [(
                Rule::I5,
                format!("repair writes [(2, {da})] (child, data digest), expected []")
            )]
        );
    }

    #[test]
    fn mismatch_reports_out_of_child_order_are_i8() {
        let ((a, da), (_, db), (_, dc)) = (version(1), version(2), version(3));
        let children = reads(&[ok(da), ok(da), ok(da), ok(db), ok(dc)]);
        let ascending = [rb(IoType::Read, 3, None), rb(IoType::Read, 4, None)];
        let view = op(OpKind::Read, &children, &ascending);
        // Q25: the outvoted children are reported in ascending child order.
        assert_eq!(verdict(&ModelCfg::plain(5, 3), &view, Ok(Some(&a))), []);
        let descending = [rb(IoType::Read, 4, None), rb(IoType::Read, 3, None)];
        let view = op(OpKind::Read, &children, &descending);
        assert_eq!(
            verdict(&ModelCfg::plain(5, 3), &view, Ok(Some(&a))),
            [(
                Rule::I8,
                s("mismatch events out of child order: [\"RB read c4 - 0/1\", \"RB read c3 - 0/1\"]")
            )]
        );
    }

    #[test]
    fn a_quorum_read_asks_each_voter_exactly_once() {
        let (a, da) = version(1);
        let two = reads(&[ok(da), ok(da)]);
        // Q16: without an audit every child votes, so two answers of three are I7.
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Read, &two, &[]),
                Ok(Some(&a))
            ),
            [(
                Rule::I7,
                s("quorum read asked 2 children, not each of 3 once (Q16)")
            )]
        );
        // H1: c2 is out of sync and left out; c0 and c1 are the voters.
        let audit = Audit::Read {
            readers: vec![0, 1],
            degraded: false,
        };
        let view = OpView {
            audit: Some(&audit),
            ..op(OpKind::Read, &two, &[])
        };
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view, Ok(Some(&a))), []);
        let mut twice = two.clone();
        twice.push(ch(1, ChildKind::Read, ok(da)));
        let view = OpView {
            audit: Some(&audit),
            ..op(OpKind::Read, &twice, &[])
        };
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view, Ok(Some(&a))),
            [(
                Rule::I7,
                s("quorum read asked 3 children, not each of 3 once (Q16)")
            )]
        );
    }

    #[test]
    fn a_repair_covers_the_whole_read_range_and_its_failure_changes_nothing() {
        let ((a, da), (_, db)) = (version(1), version(2));
        let mut c = ModelCfg::plain(3, 2);
        c.rewrite = true;
        let events = [rb(IoType::Read, 2, None)];
        let mut children = reads(&[ok(da), ok(da), ok(db)]);
        // Q28: the repair of c2 failed; the read still returns the winner, with no event.
        children.push(ChildOp {
            data: da,
            ..ch(2, ChildKind::Write, err(Io))
        });
        assert_eq!(
            verdict(&c, &op(OpKind::Read, &children, &events), Ok(Some(&a))),
            []
        );
        // Q27: a repair of only part of the range is not the repair.
        children.pop();
        children.push(ChildOp {
            len: 256,
            data: da,
            ..ch(2, ChildKind::Write, ok(0))
        });
        assert_eq!(
            verdict(&c, &op(OpKind::Read, &children, &events), Ok(Some(&a))),
            [(
                Rule::I6,
                format!(
                    "repair writes [({}, 0)] (child, data digest), expected [(2, {da})]",
                    usize::MAX
                )
            )]
        );
    }

    #[test]
    fn a_fifo_read_follows_the_audited_order_and_rewrites_the_children_before_the_answer() {
        let (a, da) = version(1);
        let mut c = ModelCfg::plain(3, 1);
        c.fifo = true;
        c.rewrite = true;
        // D9: c0 is out of sync, so it is tried last.
        let audit = Audit::Read {
            readers: vec![1, 2, 0],
            degraded: false,
        };
        let events = [rb(IoType::Read, 1, Some(Io))];
        let repair = ChildOp {
            data: da,
            ..ch(1, ChildKind::Write, ok(0))
        };
        let right = [
            ch(1, ChildKind::Read, err(Io)),
            ch(2, ChildKind::Read, ok(da)),
            repair,
        ];
        let view = |children| OpView {
            audit: Some(&audit),
            ..op(OpKind::Read, children, &events)
        };
        // Q29, Q30, Q32: c1 failed and is reported, c2 answered, c1 gets c2's data.
        assert_eq!(verdict(&c, &view(&right), Ok(Some(&a))), []);
        assert_eq!(
            verdict(&c, &view(&right[..2]), Ok(Some(&a))),
            [(
                Rule::I6,
                format!("repair writes [] (child, data digest), expected [(1, {da})]")
            )]
        );
        let c0_first = [ch(0, ChildKind::Read, ok(da))];
        assert_eq!(
            verdict(&c, &view(&c0_first), Ok(Some(&a))),
            [(
                Rule::I7,
                s("fifo read child 0 out of order (expected Some(1))")
            )]
        );
    }

    #[test]
    fn blkverify_fails_a_disagreement_without_a_report_and_does_not_serve_either_copy() {
        let ((a, da), (_, db)) = (version(1), version(2));
        let mut c = ModelCfg::plain(2, 2);
        c.blkverify = true;
        let children = reads(&[ok(da), ok(db)]);
        let view = op(OpKind::Read, &children, &[]);
        // Q33, D6: any disagreement is a failure (and ends the process); nothing is reported.
        assert_eq!(verdict(&c, &view, Err(Io)), []);
        assert_eq!(
            verdict(&c, &view, Ok(Some(&a))),
            [(
                Rule::I5,
                format!("read returned ok(data {da:016x}), the vote model says EIO")
            )]
        );
    }

    #[test]
    fn a_write_that_skipped_a_child_is_i7_unless_the_quorum_had_only_those() {
        let children = writes(ChildKind::Write, &[ok(0), ok(0)]);
        // Q36: a write goes to every child.
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Write, &children, &[]),
                Ok(None)
            ),
            [(
                Rule::I7,
                s("write went to [c0, c1], not each of 3 children once")
            )]
        );
        // F30: the quorum had two children when it wrote.
        let audit = Audit::Write {
            eligible: vec![true, true],
            current: vec![true, true],
        };
        let view = OpView {
            audit: Some(&audit),
            ..op(OpKind::Write, &children, &[])
        };
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view, Ok(None)), []);
    }

    #[test]
    fn a_write_that_sent_a_child_another_range_or_other_bytes_is_i7() {
        let right = writes(ChildKind::Write, &[ok(0), ok(0), ok(0)]);
        let cfg = ModelCfg::plain(3, 2);
        assert_eq!(verdict(&cfg, &op(OpKind::Write, &right, &[]), Ok(None)), []);
        let guest = write_digest(OP, 0, 512);
        // Q36: c1 got op 8's bytes (another write's data) and c2 the next sector; the
        // first child that differs is named, with what it got and what the guest wrote.
        let mut wrong = right.clone();
        wrong[1].data = write_digest(OP + 1, 0, 512);
        wrong[2].offset = 512;
        assert_eq!(
            verdict(&cfg, &op(OpKind::Write, &wrong, &[]), Ok(None)),
            [(
                Rule::I7,
                format!(
                    "write sent c1 0+512 data {:016x}, not the guest's 0+512 data {guest:016x} \
                     (Q36)",
                    write_digest(OP + 1, 0, 512)
                )
            )]
        );
        // Write-zeroes carries no bytes; its range must still be the guest's.
        let mut zeroes = writes(ChildKind::Zero, &[ok(0), ok(0), ok(0)]);
        assert_eq!(
            verdict(&cfg, &op(OpKind::WriteZeroes, &zeroes, &[]), Ok(None)),
            []
        );
        zeroes[0].len = 1024;
        assert_eq!(
            verdict(&cfg, &op(OpKind::WriteZeroes, &zeroes, &[]), Ok(None)),
            [(
                Rule::I7,
                s(
                    "write_zeroes sent c0 0+1024 data 0000000000000000, not the guest's 0+512 \
                   data 0000000000000000 (Q36)"
                )
            )]
        );
    }

    #[test]
    fn a_failed_write_returns_the_error_vote_with_one_report_per_child_and_quorum_failure() {
        let children = writes(
            ChildKind::Write,
            &[err(Io), err(NoSpc), err(Io), err(NoSpc)],
        );
        let events = [
            rb(IoType::Write, 0, Some(Io)),
            rb(IoType::Write, 1, Some(NoSpc)),
            rb(IoType::Write, 2, Some(Io)),
            rb(IoType::Write, 3, Some(NoSpc)),
            failure(),
        ];
        let view = op(OpKind::Write, &children, &events);
        // Q20's example: two each; ENOSPC first appears later in child order, so it wins.
        assert_eq!(verdict(&ModelCfg::plain(4, 2), &view, Err(NoSpc)), []);
        assert_eq!(
            verdict(&ModelCfg::plain(4, 2), &view, Err(Io)),
            [(
                Rule::I7,
                s("write returned EIO, the vote model says ENOSPC")
            )]
        );
        // Q37, Q39: every failed child is reported, then one QUORUM_FAILURE.
        let view = op(OpKind::Write, &children, &events[1..]);
        assert_eq!(
            verdict(&ModelCfg::plain(4, 2), &view, Err(NoSpc)),
            [(
                Rule::I8,
                s(
                    "events [\"RB write c1 ENOSPC 0/1\", \"RB write c2 EIO 0/1\", \
                   \"RB write c3 ENOSPC 0/1\", \"FAILURE 0/1\"], expected \
                   [\"RB write c0 EIO 0/1\", \"RB write c1 ENOSPC 0/1\", \
                   \"RB write c2 EIO 0/1\", \"RB write c3 ENOSPC 0/1\", \"FAILURE 0/1\"]"
                )
            )]
        );
    }

    #[test]
    fn a_write_acked_on_successes_the_audit_does_not_count_is_i7() {
        let children = writes(ChildKind::Write, &[ok(0), ok(0), ok(0)]);
        // H4: c1 succeeded on a stale cache epoch, c2 stays out of sync: one success counts.
        let audit = Audit::Write {
            eligible: vec![true, true, false],
            current: vec![true, false, true],
        };
        let events = [failure()];
        let view = |events| OpView {
            audit: Some(&audit),
            ..op(OpKind::Write, &children, events)
        };
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view(&events), Err(Io)), []);
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view(&[]), Ok(None)),
            [
                (Rule::I7, s("write returned ok, the vote model says EIO")),
                (Rule::I8, s("events [], expected [\"FAILURE 0/1\"]")),
            ]
        );
    }

    #[test]
    fn a_fua_write_takes_its_result_from_the_quorum_flush_that_follows_it() {
        let mut children = writes(ChildKind::Write, &[ok(0), ok(0), ok(0)]);
        children.extend(writes(ChildKind::Flush, &[ok(0), err(Io), err(Io)]));
        let events = [
            rb(IoType::Flush, 1, Some(Io)),
            rb(IoType::Flush, 2, Some(Io)),
        ];
        let view = |events| OpView {
            fua: true,
            ..op(OpKind::Write, &children, events)
        };
        // Q40, Q41: all three wrote, one flushed: the write fails, without QUORUM_FAILURE.
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view(&events), Err(Io)), []);
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view(&events), Ok(None)),
            [(Rule::I7, s("write returned ok, the vote model says EIO"))]
        );
        let mut with_failure = events.to_vec();
        with_failure.push(failure());
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view(&with_failure), Err(Io)),
            [(
                Rule::I8,
                s(
                    "events [\"RB flush c1 EIO 0/0\", \"RB flush c2 EIO 0/0\", \"FAILURE 0/1\"], \
                   expected [\"RB flush c1 EIO 0/0\", \"RB flush c2 EIO 0/0\"]"
                )
            )]
        );
        // A FUA write the vote accepted that flushed no child (Q40).
        let unflushed = writes(ChildKind::Write, &[ok(0), ok(0), ok(0)]);
        let view = OpView {
            fua: true,
            ..op(OpKind::Write, &unflushed, &[])
        };
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view, Err(Io)),
            [(
                Rule::I7,
                s("the FUA write's flush went to [], not each of 3 children once (Q41)")
            )]
        );
    }

    #[test]
    fn a_write_whose_metadata_update_failed_fails_although_every_child_wrote_it() {
        let children = writes(ChildKind::Write, &[ok(0), ok(0), ok(0)]);
        let view = |children| OpView {
            md_failed: true,
            ..op(OpKind::Write, children, &[])
        };
        // H21: the out-of-sync marks could not be made durable.
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view(&children), Err(Io)),
            []
        );
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view(&children), Ok(None)),
            [(Rule::I7, s("write returned ok, the vote model says EIO"))]
        );
        // ... and when the intent failed first, no child saw the write at all.
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view(&[]), Err(Io)), []);
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view(&[]), Ok(None)),
            [(Rule::I7, s("write returned ok, the vote model says EIO"))]
        );
        // A FUA write whose marks failed after the children wrote fails before its flush;
        // a plain flush whose marks failed flushes no child. Either fails with EIO.
        let fua = OpView {
            fua: true,
            ..view(&children)
        };
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &fua, Err(Io)), []);
        let flush = OpView {
            md_failed: true,
            ..op(OpKind::Flush, &[], &[])
        };
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &flush, Err(Io)), []);
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &flush, Ok(None)),
            [(Rule::I7, s("flush returned ok, the vote model says EIO"))]
        );
        // Without a metadata failure, a flush that reached no child is I7.
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Flush, &[], &[]),
                Err(Io)
            ),
            [(
                Rule::I7,
                s("flush went to [], not each of 3 children once (Q41)")
            )]
        );
    }

    #[test]
    fn a_discard_reaches_the_children_only_with_the_zeroing_guarantee() {
        let discards = writes(ChildKind::Discard, &[ok(0), err(Io), err(Io)]);
        // D3: without the guarantee a discard succeeds at once and touches no child.
        let c = ModelCfg::plain(3, 2);
        assert_eq!(verdict(&c, &op(OpKind::Trim, &[], &[]), Ok(None)), []);
        assert_eq!(
            verdict(&c, &op(OpKind::Trim, &discards, &[]), Ok(None)),
            [(
                Rule::I7,
                s("discard reached the children without the zeroing guarantee (Q46)")
            )]
        );
        // Q46: with it, a discard is judged like a write: one success of three fails it.
        let mut c = ModelCfg::plain(3, 2);
        c.discard_forwarded = true;
        let events = [
            rb(IoType::Write, 1, Some(Io)),
            rb(IoType::Write, 2, Some(Io)),
            failure(),
        ];
        assert_eq!(
            verdict(&c, &op(OpKind::Trim, &discards, &events), Err(Io)),
            []
        );
        assert_eq!(
            verdict(&c, &op(OpKind::Trim, &discards, &events), Ok(None)),
            [(Rule::I7, s("trim returned ok, the vote model says EIO"))]
        );
    }

    #[test]
    fn a_flush_that_skipped_a_child_or_sent_quorum_failure_is_caught() {
        let all = writes(ChildKind::Flush, &[ok(0), ok(0), ok(0)]);
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Flush, &all, &[]),
                Ok(None)
            ),
            []
        );
        // Q41: every child is flushed.
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Flush, &all[..2], &[]),
                Ok(None)
            ),
            [(
                Rule::I7,
                s("flush went to [c0, c1], not each of 3 children once (Q41)")
            )]
        );
        // Q41: a flush never sends QUORUM_FAILURE, even when it fails.
        let failed = writes(ChildKind::Flush, &[err(Io), err(Io), ok(0)]);
        let reports = [
            rb(IoType::Flush, 0, Some(Io)),
            rb(IoType::Flush, 1, Some(Io)),
        ];
        let mut with_failure = reports.to_vec();
        with_failure.push(failure());
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Flush, &failed, &reports),
                Err(Io)
            ),
            []
        );
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Flush, &failed, &with_failure),
                Err(Io)
            ),
            [(
                Rule::I8,
                s(
                    "events [\"RB flush c0 EIO 0/0\", \"RB flush c1 EIO 0/0\", \"FAILURE 0/1\"], \
                   expected [\"RB flush c0 EIO 0/0\", \"RB flush c1 EIO 0/0\"]"
                )
            )]
        );
    }

    #[test]
    fn a_flush_counts_only_the_children_its_audit_trusts() {
        let all = writes(ChildKind::Flush, &[ok(0), ok(0), ok(0)]);
        let view = |audit| OpView {
            flush_audit: Some(audit),
            ..op(OpKind::Flush, &all, &[])
        };
        // D14: c1 (and then c2) missed an acked write since the last good flush.
        let two = Audit::Flush {
            eligible: vec![true, false, true],
        };
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view(&two), Ok(None)), []);
        let one = Audit::Flush {
            eligible: vec![true, false, false],
        };
        assert_eq!(verdict(&ModelCfg::plain(3, 2), &view(&one), Err(Io)), []);
        assert_eq!(
            verdict(&ModelCfg::plain(3, 2), &view(&one), Ok(None)),
            [(Rule::I7, s("flush returned ok, the vote model says EIO"))]
        );
    }

    /// Block status of sectors 0..8 whose children answered `answers` in child order.
    fn block_status(answers: &[ChildResult], events: &[Event], got: u64) -> Vec<(Rule, String)> {
        let children = writes(ChildKind::Status, answers);
        let view = OpView {
            len: 4096,
            ..op(OpKind::BlockStatus, &children, events)
        };
        verdict(
            &ModelCfg::plain(answers.len(), 2),
            &view,
            Ok(Some(&got.to_le_bytes())),
        )
    }

    const ZERO: u64 = 1 << 63;

    #[test]
    fn block_status_is_zero_over_the_shortest_zero_or_data_over_the_longest_data() {
        // Q44: every child says zero: zero over the shortest of their lengths.
        let zeros = [ok(ZERO | 4096), ok(ZERO | 1024), ok(ZERO | 2048)];
        assert_eq!(block_status(&zeros, &[], ZERO | 1024), []);
        assert_eq!(
            block_status(&zeros, &[], ZERO | 4096),
            [(
                Rule::I7,
                s("block_status returned ok(data 8000000000001000), \
                   the vote model says ok(data 8000000000000400)")
            )]
        );
        // One child says data: data over the longest length among those that said data.
        let mixed = [ok(1024), ok(ZERO | 4096), ok(2048)];
        assert_eq!(block_status(&mixed, &[], 2048), []);
        assert_eq!(
            block_status(&mixed, &[], ZERO | 4096),
            [(
                Rule::I7,
                s("block_status returned ok(data 8000000000001000), \
                   the vote model says ok(data 0000000000000800)")
            )]
        );
    }

    #[test]
    fn block_status_stops_at_the_first_failed_child_and_answers_data_for_everything() {
        let report = [Event::QuorumReportBad {
            io: IoType::Read,
            error: Some(Io),
            node_name: "c1".into(),
            sector_num: 0,
            sectors_count: 8,
        }];
        // Q43: c1 failed: one report over the queried range, data over all of it, no error.
        let answers = [ok(ZERO | 4096), err(Io)];
        assert_eq!(block_status(&answers, &report, 4096), []);
        assert_eq!(
            block_status(&answers, &[], 4096),
            [(Rule::I8, s("events [], expected [\"RB read c1 EIO 0/8\"]"))]
        );
        assert_eq!(
            block_status(&[ok(ZERO | 4096), err(Io), ok(ZERO | 4096)], &report, 4096),
            [(Rule::I7, s("block status went on after c1 failed (Q43)"))]
        );
        let children = [ch(1, ChildKind::Status, ok(4096))];
        let view = OpView {
            len: 4096,
            ..op(OpKind::BlockStatus, &children, &[])
        };
        assert_eq!(
            verdict(
                &ModelCfg::plain(2, 2),
                &view,
                Ok(Some(&4096u64.to_le_bytes()))
            ),
            [(Rule::I7, s("block status asked c1 out of order"))]
        );
    }

    // Oracle defects these tests found (now fixed): a write or flush counted requests, not
    // children, and a fifo finding named a position in the read order, not a child.

    #[test]
    fn a_write_sent_twice_to_one_child_and_never_to_another_is_i7() {
        let children = [
            ch(0, ChildKind::Write, ok(0)),
            ch(0, ChildKind::Write, ok(0)),
            ch(1, ChildKind::Write, err(Io)),
        ];
        let events = [rb(IoType::Write, 1, Some(Io))];
        // Only c0 holds the data: two successes from it must not reach t = 2 (Q36).
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Write, &children, &events),
                Ok(None),
            ),
            [(
                Rule::I7,
                s("write went to [c0, c0, c1], not each of 3 children once")
            )]
        );
    }

    #[test]
    fn a_flush_sent_twice_to_one_child_and_never_to_another_is_i7() {
        let children = [
            ch(0, ChildKind::Flush, ok(0)),
            ch(0, ChildKind::Flush, ok(0)),
            ch(1, ChildKind::Flush, err(Io)),
        ];
        let events = [rb(IoType::Flush, 1, Some(Io))];
        // c2's cache was never flushed and c0's must not count twice toward t = 2.
        assert_eq!(
            verdict(
                &ModelCfg::plain(3, 2),
                &op(OpKind::Flush, &children, &events),
                Ok(None),
            ),
            [(
                Rule::I7,
                s("flush went to [c0, c0, c1], not each of 3 children once (Q41)")
            )]
        );
    }

    #[test]
    fn a_fifo_read_that_goes_on_after_an_answer_names_the_child_that_answered() {
        let (a, da) = version(1);
        let mut c = ModelCfg::plain(3, 1);
        c.fifo = true;
        let audit = Audit::Read {
            readers: vec![1, 2, 0],
            degraded: false,
        };
        let children = reads(&[ok(da), err(Io), ok(da)]);
        let children = [
            children[1].clone(),
            children[2].clone(),
            children[0].clone(),
        ];
        let events = [rb(IoType::Read, 1, Some(Io))];
        let view = OpView {
            audit: Some(&audit),
            ..op(OpKind::Read, &children, &events)
        };
        // Q29: c2 answered, so asking c0 afterwards is I7, and the finding says so.
        assert_eq!(
            verdict(&c, &view, Ok(Some(&a))),
            [(Rule::I7, s("fifo read went on after c2 succeeded"))]
        );
    }
}
