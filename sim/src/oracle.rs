//! The oracle (SIMULATION.md §6, §7): a reference model of which values each sector may hold,
//! and an independent model of the quorum's vote, checked on every guest operation.
//!
//! It sees only what the harness records: guest ops with their logical invoke and completion
//! times and results, the child requests each op caused (the vdisk log) and the events each op
//! emitted. From the child results it recomputes QUORUM.md's outcome for the op (result, data,
//! events, repairs: I5, I7, I8); from the history it computes the allowed set of each sector a
//! read returns (O3–O5: I1, I2, I3).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ballot::drivers::quorum::Audit;
use ballot::events::{Event, IoType};
use ballot::ErrorKind;

use crate::oplog::{ChildKind, ChildOp, ChildResult};
use crate::sector::{data_digest, decode, Decoded, Value, SECTOR, SECTOR_U64};

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

/// How a guest op ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not completed yet.
    Pending,
    /// Completed successfully (acked).
    Ok,
    /// Completed with an error.
    Fail(ErrorKind),
    /// Indeterminate: the issuing node crashed.
    Info,
}

/// One violated invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Rule id (`I1`, `I7`, ...).
    pub rule: &'static str,
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

#[derive(Debug, Clone)]
struct Op {
    kind: OpKind,
    offset: u64,
    len: u64,
    fua: bool,
    inv: u64,
    cmp: Option<u64>,
    outcome: Outcome,
    durable: bool,
}

/// Whether write `op` is overwritten for a read that `latest` overwriter precedes
/// ([`Oracle::latest_overwriter`]): it completed before that overwriter was invoked.
fn overwritten(op: &Op, latest: Option<u64>) -> bool {
    matches!((op.cmp, latest), (Some(c), Some(inv2)) if c < inv2)
}

/// Counters of outcomes and recovery paths (for the sweep report and I15).
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Outcomes by "kind/result" (e.g. `read/ok`, `write/EIO`).
    pub outcomes: BTreeMap<String, u64>,
    /// Recovery paths reached (P1...).
    pub paths: BTreeMap<&'static str, u64>,
    /// Invariant checks performed, by rule.
    pub checks: BTreeMap<&'static str, u64>,
    /// Errors in the safety phase (counted, not judged: O7).
    pub safety_errors: u64,
}

/// The reference model.
pub struct Oracle {
    cfg: ModelCfg,
    seq: u64,
    ops: BTreeMap<u64, Op>,
    /// Per sector, write ops that touched it (0 = the initial image), in invoke order.
    sectors: HashMap<u64, Vec<u64>>,
    /// Acked writes not yet durable.
    nondurable: Vec<u64>,
    /// (sector, write) pairs a crash left on too few children (O5).
    unguaranteed: HashSet<(u64, u64)>,
    /// O4: per sector, the latest observed write and when.
    observed: HashMap<u64, (u64, u64)>,
    /// In-flight reads by invoke time.
    inflight_reads: BTreeSet<(u64, u64)>,
    next_op: u64,
    /// What the quorum decided for each guest op in flight (HEALING.md H1, H4), by op id.
    pub audits: BTreeMap<u64, Vec<ballot::drivers::quorum::Audit>>,
    /// Sectors a resync filled beyond the budget (no version on t good copies when its copy
    /// began: a silent fault met a power cut's split, and H22's recover=lowest took some
    /// child's copy): reads there are out of model until a guest write covers them.
    pub recovered_any: BTreeSet<u64>,
    /// The flush decision of the op being checked (D14), for [`Oracle::flush_model`].
    flush_audit: Option<Audit>,
    /// Counters.
    pub tally: Tally,
}

impl Oracle {
    /// A model of a disk holding only the initial image.
    pub fn new(cfg: ModelCfg) -> Oracle {
        let mut ops = BTreeMap::new();
        ops.insert(
            0,
            Op {
                kind: OpKind::Write,
                offset: 0,
                len: 0,
                fua: true,
                inv: 0,
                cmp: Some(0),
                outcome: Outcome::Ok,
                durable: true,
            },
        );
        Oracle {
            cfg,
            seq: 1,
            ops,
            sectors: HashMap::new(),
            nondurable: Vec::new(),
            unguaranteed: HashSet::new(),
            observed: HashMap::new(),
            inflight_reads: BTreeSet::new(),
            next_op: 1,
            audits: BTreeMap::new(),
            recovered_any: BTreeSet::new(),
            flush_audit: None,
            tally: Tally::default(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// The value write `id` gives sector `s`.
    fn value_of(&self, id: u64, s: u64) -> Value {
        if id == 0 {
            return if self.cfg.initial_pattern {
                Value::Data { id: 0, sector: s }
            } else {
                Value::Zero
            };
        }
        match self.ops[&id].kind {
            OpKind::Write => Value::Data { id, sector: s },
            _ => Value::Zero,
        }
    }

    /// Registers a new guest op at its invocation and returns its id (writes: also the id their
    /// data carries).
    pub fn invoke(&mut self, kind: OpKind, offset: u64, len: u64, fua: bool) -> u64 {
        let id = self.next_op;
        self.next_op += 1;
        let inv = self.tick();
        self.ops.insert(
            id,
            Op {
                kind,
                offset,
                len,
                fua,
                inv,
                cmp: None,
                outcome: Outcome::Pending,
                durable: false,
            },
        );
        let writes = match kind {
            OpKind::Write | OpKind::WriteZeroes => true,
            OpKind::Trim => self.cfg.discard_forwarded,
            _ => false,
        };
        if writes {
            for s in offset / SECTOR_U64..(offset + len) / SECTOR_U64 {
                self.sectors.entry(s).or_insert_with(|| vec![0]).push(id);
            }
        }
        if kind == OpKind::Read {
            self.inflight_reads.insert((inv, id));
        }
        id
    }

    /// The bytes a write op carries (V6).
    pub fn write_data(id: u64, offset: u64, len: u64) -> bytes::Bytes {
        let mut buf = bytes::BytesMut::zeroed(len as usize);
        for (k, c) in buf.chunks_mut(SECTOR).enumerate() {
            crate::sector::encode_into(
                Value::Data {
                    id,
                    sector: offset / SECTOR_U64 + k as u64,
                },
                c,
            );
        }
        buf.freeze()
    }

    /// Byte ranges of writes (write, write-zeroes, trim) not yet completed.
    pub fn pending_write_ranges(&self) -> Vec<(u64, u64)> {
        self.ops
            .values()
            .filter(|o| {
                o.outcome == Outcome::Pending
                    && o.len > 0
                    && matches!(o.kind, OpKind::Write | OpKind::WriteZeroes | OpKind::Trim)
            })
            .map(|o| (o.offset, o.len))
            .collect()
    }

    /// Byte ranges of ops not yet completed.
    pub fn pending_ranges(&self) -> Vec<(u64, u64)> {
        self.ops
            .values()
            .filter(|o| o.outcome == Outcome::Pending && o.len > 0)
            .map(|o| (o.offset, o.len))
            .collect()
    }

    /// Ops not yet completed.
    pub fn pending_ops(&self) -> Vec<u64> {
        self.ops
            .iter()
            .filter(|(_, o)| o.outcome == Outcome::Pending)
            .map(|(id, _)| *id)
            .collect()
    }

    /// O5: the issuing node crashed. Pending ops become `info` (completed now, never acked);
    /// acked writes not yet durable stay guaranteed on a sector only where enough children
    /// still hold them (`holders(s, v)`, from the vdisk logs). Observations are forgotten.
    pub fn crash(&mut self, holders: impl Fn(u64, Value) -> usize) {
        let now = self.tick();
        for op in self.ops.values_mut() {
            if op.outcome == Outcome::Pending {
                op.outcome = Outcome::Info;
                op.cmp = Some(now);
            }
        }
        self.inflight_reads.clear();
        let (n, t, fifo) = (self.cfg.n, self.cfg.t, self.cfg.fifo);
        let any = self.cfg.recover_any;
        for id in std::mem::take(&mut self.nondurable) {
            let (off, len) = (self.ops[&id].offset, self.ops[&id].len);
            for s in off / SECTOR_U64..(off + len) / SECTOR_U64 {
                let h = holders(s, self.value_of(id, s));
                // Votes are over whole requests, so copies without the write may agree on
                // any range: only when fewer than t lack it can no stale version win.
                let guaranteed = if fifo || any {
                    h == n
                } else {
                    n - h.min(n) < t
                };
                if !guaranteed {
                    self.unguaranteed.insert((s, id));
                }
            }
            // What survived the crash is on the media now.
            if let Some(op) = self.ops.get_mut(&id) {
                op.durable = true;
            }
        }
        self.observed.clear();
    }

    /// O5 for damage that happens outside a crash of the issuing node (NBD children: a write
    /// some children missed, a late delivery, a replica's crash or reformat): on each of
    /// `sectors`, an acked write stops being guaranteed once too few children hold it
    /// (`holders`), and an observation of it is forgotten.
    pub fn reassess(&mut self, sectors: &[u64], holders: impl Fn(u64, Value) -> usize) {
        let (n, t, fifo) = (self.cfg.n, self.cfg.t, self.cfg.fifo);
        for &s in sectors {
            let Some(list) = self.sectors.get(&s) else {
                continue;
            };
            let mut lost = Vec::new();
            for &id in list {
                let acked = self.ops.get(&id).is_some_and(|o| o.outcome == Outcome::Ok);
                if !acked || self.unguaranteed.contains(&(s, id)) {
                    continue;
                }
                let h = holders(s, self.value_of(id, s));
                let guaranteed = if fifo { h == n } else { n - h.min(n) < t };
                if !guaranteed {
                    lost.push(id);
                }
            }
            for id in lost {
                self.unguaranteed.insert((s, id));
                if self.observed.get(&s).is_some_and(|(w, _)| *w == id) {
                    self.observed.remove(&s);
                }
            }
        }
    }

    fn is_overwriter(&self, id: u64, s: u64, need_durable: bool) -> Option<(u64, u64)> {
        let op = &self.ops[&id];
        if op.outcome != Outcome::Ok || self.unguaranteed.contains(&(s, id)) {
            return None;
        }
        if need_durable && !op.durable {
            return None;
        }
        Some((op.inv, op.cmp?))
    }

    /// The allowed values of sector `s` for a read invoked at `a` and completed at `b` (O3–O5).
    /// Returns (allowed values, every value ever written there since the floor).
    /// The invocation time of the latest write that overwrites older ones on sector `s` for a
    /// read invoked at `a`: a write is overwritten when some overwriter was invoked after it
    /// completed, that is, when it completed before this time.
    fn latest_overwriter(&self, s: u64, list: &[u64], a: u64) -> Option<u64> {
        // I3 applies only when 2t > N; otherwise only durable writes overwrite (I2's floor).
        let majority = 2 * self.cfg.t > self.cfg.n;
        let mut latest = list
            .iter()
            .filter_map(|&id| self.is_overwriter(id, s, !majority))
            .filter(|&(_, cmp)| cmp < a)
            .map(|(inv, _)| inv)
            .max();
        if let Some(&(id, at)) = self.observed.get(&s) {
            if at < a && !self.unguaranteed.contains(&(s, id)) {
                if let Some(op) = self.ops.get(&id) {
                    latest = latest.max(Some(op.inv));
                }
            }
        }
        latest
    }

    fn allowed(&self, s: u64, a: u64, b: u64) -> (Vec<Value>, Vec<Value>) {
        let initial = [0u64];
        let list = self.sectors.get(&s).map_or(&initial[..], |l| &l[..]);
        let latest = self.latest_overwriter(s, list, a);
        let mut allowed = Vec::new();
        let mut all = Vec::new();
        for &id in list {
            let op = &self.ops[&id];
            let v = self.value_of(id, s);
            all.push(v);
            if op.inv >= b {
                continue;
            }
            if !overwritten(op, latest) {
                allowed.push(v);
            }
        }
        (allowed, all)
    }

    /// HEALING.md I17, I18: whether a read of sector `s` invoked and completed now may return
    /// `v` (the quorum's value there, as the oracle knows it).
    pub fn allows_now(&self, s: u64, v: Value) -> bool {
        // `allowed(s, now, now).0.contains(&v)` without building the lists: whole-disk checks
        // (I18) ask this for every sector of every child.
        let now = self.seq + 1;
        let initial = [0u64];
        let list = self.sectors.get(&s).map_or(&initial[..], |l| &l[..]);
        let latest = self.latest_overwriter(s, list, now);
        list.iter().any(|&id| {
            let op = &self.ops[&id];
            op.inv < now && self.value_of(id, s) == v && !overwritten(op, latest)
        })
    }

    /// O5: whether acked write `id` is still guaranteed on sector `s`.
    pub fn guaranteed(&self, s: u64, id: u64) -> bool {
        !self.unguaranteed.contains(&(s, id))
    }

    /// Drops history no current or future read can be allowed to see: writes overwritten by a
    /// durable, guaranteed write that completed before every in-flight read was invoked.
    fn prune(&mut self, s: u64) {
        if self.cfg.late_writes {
            return;
        }
        let horizon = self
            .inflight_reads
            .iter()
            .next()
            .map(|(inv, _)| *inv)
            .unwrap_or(self.seq);
        let Some(list) = self.sectors.get(&s) else {
            return;
        };
        if list.len() < 12 {
            return;
        }
        let barrier = list
            .iter()
            .filter_map(|&id| self.is_overwriter(id, s, true))
            .filter(|&(_, cmp)| cmp < horizon)
            .map(|(inv, _)| inv)
            .max();
        let Some(barrier) = barrier else {
            return;
        };
        let keep: Vec<u64> = list
            .iter()
            .copied()
            .filter(|id| match self.ops[id].cmp {
                Some(c) => c >= barrier,
                None => true,
            })
            .collect();
        self.sectors.insert(s, keep);
    }

    /// Records the completion of guest op `id` and checks it. `data` is what a successful read
    /// returned; `children` the child requests it caused; `events` the internal events it
    /// emitted. `judge_errors` is false in the safety phase (O7: errors are counted there).
    pub fn complete(
        &mut self,
        id: u64,
        result: Result<Option<&[u8]>, ErrorKind>,
        children: &[ChildOp],
        events: &[Event],
        judge_errors: bool,
    ) -> Vec<Violation> {
        let b = self.tick();
        let mut v = Vec::new();
        let (kind, offset, len, fua, inv) = {
            let op = &self.ops[&id];
            (op.kind, op.offset, op.len, op.fua, op.inv)
        };
        {
            let op = self.ops.get_mut(&id).expect("op registered");
            op.cmp = Some(b);
            op.outcome = match &result {
                Ok(_) => Outcome::Ok,
                Err(k) => Outcome::Fail(*k),
            };
        }
        let label = match &result {
            Ok(_) => "ok".to_string(),
            Err(k) => k.errno_name().to_string(),
        };
        *self
            .tally
            .outcomes
            .entry(format!("{}/{label}", kind.as_str()))
            .or_default() += 1;
        if result.is_err() {
            self.tally.safety_errors += u64::from(!judge_errors);
        }
        if kind == OpKind::Read {
            self.inflight_reads.remove(&(inv, id));
        }
        // I7/I8/I5: the vote model.
        self.check_vote(
            id, kind, offset, len, fua, &result, children, events, &mut v,
        );
        match (&result, kind) {
            (Ok(Some(data)), OpKind::Read) => {
                self.check_read_data(id, offset, data, inv, b, &mut v)
            }
            (Ok(_), OpKind::Write | OpKind::WriteZeroes | OpKind::Trim) => {
                // A discard quorum does not forward changes nothing on the children.
                let lands = kind != OpKind::Trim || self.cfg.discard_forwarded;
                if lands && !self.recovered_any.is_empty() {
                    let r = offset / SECTOR_U64..(offset + len) / SECTOR_U64;
                    self.recovered_any.retain(|s| !r.contains(s));
                }
                if fua {
                    self.ops.get_mut(&id).expect("op").durable = true;
                } else if kind != OpKind::Trim || self.cfg.discard_forwarded {
                    self.nondurable.push(id);
                }
            }
            (Ok(_), OpKind::Flush) => {
                let ops = &mut self.ops;
                self.nondurable.retain(|w| {
                    let op = ops.get_mut(w).expect("op");
                    if op.cmp.is_some_and(|c| c < inv) {
                        op.durable = true;
                        false
                    } else {
                        true
                    }
                });
            }
            _ => {}
        }
        if judge_errors {
            if let Err(k) = &result {
                v.push(Violation {
                    rule: "I14",
                    op: id,
                    sector: None,
                    message: format!(
                        "{} at offset {offset} length {len} failed with {} in the liveness phase",
                        kind.as_str(),
                        k.errno_name()
                    ),
                });
            }
        }
        v
    }

    fn check_read_data(
        &mut self,
        id: u64,
        offset: u64,
        data: &[u8],
        a: u64,
        b: u64,
        v: &mut Vec<Violation>,
    ) {
        *self.tally.checks.entry("I1").or_default() += 1;
        for (k, chunk) in data.chunks(SECTOR).enumerate() {
            let s = offset / SECTOR_U64 + k as u64;
            if self.recovered_any.contains(&s) {
                *self.tally.paths.entry("out-of-model").or_default() += 1;
                continue;
            }
            let got = match decode(chunk) {
                Decoded::Value(Value::Data { id: w, sector }) if sector != s => {
                    v.push(Violation {
                        rule: "I1",
                        op: id,
                        sector: Some(s),
                        message: format!("misdirected data: got w{w} of sector {sector}"),
                    });
                    return;
                }
                Decoded::Value(x) => x,
                Decoded::Garbage => {
                    v.push(Violation {
                        rule: "I1",
                        op: id,
                        sector: Some(s),
                        message: "corrupt or torn bytes (decode to nothing)".to_string(),
                    });
                    return;
                }
            };
            let (allowed, all) = self.allowed(s, a, b);
            if !allowed.contains(&got) {
                let name = |x: &Value| match x {
                    Value::Zero => "zero".to_string(),
                    Value::Data { id, .. } => format!("w{id}"),
                };
                let set: Vec<String> = allowed.iter().map(name).collect();
                let rule = if all.contains(&got) {
                    if 2 * self.cfg.t > self.cfg.n {
                        "I3"
                    } else {
                        "I2"
                    }
                } else {
                    "I1"
                };
                if rule != "I1" && self.cfg.beyond && self.cfg.late_writes {
                    // B7, S7: over NBD, copies go stale without an injection (timeouts, late
                    // writes), and free silent faults can then agree with them; the vote (I7)
                    // has already checked the quorum against its children's answers. The read
                    // is out of model, not judged.
                    *self.tally.paths.entry("out-of-model").or_default() += 1;
                    return;
                }
                v.push(Violation {
                    rule,
                    op: id,
                    sector: Some(s),
                    message: format!(
                        "{} read: got={} allowed={{{}}}",
                        if rule == "I1" { "foreign" } else { "stale" },
                        name(&got),
                        set.join(",")
                    ),
                });
                return;
            }
            // O4: once seen, a version may not flicker back. Only for the vote (fifo serves
            // whichever child answers first), only where I3 applies (2t > N: with a weaker
            // threshold a version one child holds may win one read and lose the next), and
            // only for writes that had completed: while a write is in flight, children that
            // have it and children that do not are both legitimate answers.
            if let Value::Data { id: w, .. } = got {
                let done = self.ops.get(&w).is_some_and(|o| o.cmp.is_some());
                let majority = 2 * self.cfg.t > self.cfg.n;
                if !self.cfg.fifo && majority && done && (w != 0 || self.cfg.initial_pattern) {
                    self.observed.insert(s, (w, b));
                }
            }
            self.prune(s);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check_vote(
        &mut self,
        id: u64,
        kind: OpKind,
        offset: u64,
        len: u64,
        fua: bool,
        result: &Result<Option<&[u8]>, ErrorKind>,
        children: &[ChildOp],
        events: &[Event],
        v: &mut Vec<Violation>,
    ) {
        let (n, t) = (self.cfg.n, self.cfg.t);
        let audits = self.audits.remove(&id).unwrap_or_default();
        // HEALING.md H21: the metadata node failed this request (F29).
        let md_failed = audits.iter().any(|a| matches!(a, Audit::MetadataFailed));
        let audit = audits
            .iter()
            .find(|a| !matches!(a, Audit::Flush { .. } | Audit::MetadataFailed))
            .cloned();
        self.flush_audit = audits
            .into_iter()
            .find(|a| matches!(a, Audit::Flush { .. }));
        let (sn, sc) = ballot::events::sectors(offset, len);
        let mut want_events: Vec<String> = Vec::new();
        let want: Result<Option<u64>, ErrorKind>;
        let mut want_rewrites: Vec<(usize, u64)> = Vec::new();
        let prefix = self.cfg.prefix;
        let rb = |io: &str, child: usize, err: Option<ErrorKind>, sn: u64, sc: u64| {
            format!(
                "RB {io} {prefix}{child} {} {sn}/{sc}",
                err.map(|k| k.errno_name()).unwrap_or("-")
            )
        };
        let fail = |sn: u64, sc: u64| format!("FAILURE {sn}/{sc}");
        let bad = |v: &mut Vec<Violation>, rule: &'static str, m: String| {
            v.push(Violation {
                rule,
                op: id,
                sector: None,
                message: m,
            })
        };
        match kind {
            OpKind::Read => {
                let reads: Vec<&ChildOp> = children
                    .iter()
                    .filter(|c| c.kind == ChildKind::Read)
                    .collect();
                if self.cfg.fifo {
                    // Q29–Q32: children in order until one succeeds.
                    let mut expect_err = ErrorKind::Io;
                    let mut served = None;
                    // HEALING.md H1: in-sync children first, in child order, then the
                    // out-of-sync ones (README D9); the quorum's audit gives the order.
                    let order: Vec<usize> = match &audit {
                        Some(Audit::Read { readers, .. }) => readers.clone(),
                        _ => (0..n).collect(),
                    };
                    for (k, c) in reads.iter().enumerate() {
                        if order.get(k) != Some(&c.disk) {
                            bad(
                                v,
                                "I7",
                                format!(
                                    "fifo read child {} out of order (expected {:?})",
                                    c.disk,
                                    order.get(k)
                                ),
                            );
                            return;
                        }
                        match c.result {
                            ChildResult::Ok(d) => {
                                served = Some((k, d));
                                break;
                            }
                            ChildResult::Err(e) => {
                                want_events.push(rb("read", c.disk, Some(e), sn, sc));
                                expect_err = e;
                            }
                        }
                    }
                    match served {
                        Some((k, d)) => {
                            if reads.len() != k + 1 {
                                bad(v, "I7", format!("fifo read went on after c{k} succeeded"));
                            }
                            want = Ok(Some(d));
                            if k > 0 {
                                *self.tally.paths.entry("P5").or_default() += 1;
                            }
                            if self.cfg.rewrite {
                                want_rewrites = reads[..k].iter().map(|c| (c.disk, d)).collect();
                            }
                        }
                        None => {
                            if reads.len() != order.len() {
                                bad(
                                    v,
                                    "I7",
                                    format!(
                                        "fifo read tried {} of {n} children and failed",
                                        reads.len()
                                    ),
                                );
                            }
                            want = Err(expect_err);
                        }
                    }
                } else {
                    let mut res: Vec<Option<ChildResult>> = vec![None; n];
                    let mut twice = false;
                    for c in &reads {
                        if c.disk < n {
                            twice |= res[c.disk].is_some();
                            res[c.disk] = Some(c.result.clone());
                        }
                    }
                    // Q16 with HEALING.md H1: every voter once; children out of sync on the
                    // range do not vote while at least t others are in sync. The quorum's
                    // audit names the voters it chose; without one, every child.
                    let asked = res.iter().filter(|r| r.is_some()).count();
                    let voters: Vec<usize> = match &audit {
                        Some(Audit::Read { readers, .. }) => readers.clone(),
                        _ => (0..n).collect(),
                    };
                    let exact = (0..n).all(|i| res[i].is_some() == voters.contains(&i));
                    if twice || !exact || reads.len() != asked {
                        bad(
                            v,
                            "I7",
                            format!(
                                "quorum read asked {} children, not each of {n} once (Q16)",
                                reads.len()
                            ),
                        );
                        return;
                    }
                    let ok: Vec<(usize, u64)> = res
                        .iter()
                        .enumerate()
                        .filter_map(|(i, r)| match r {
                            Some(ChildResult::Ok(d)) => Some((i, *d)),
                            _ => None,
                        })
                        .collect();
                    let errs: Vec<ErrorKind> = res
                        .iter()
                        .filter_map(|r| match r {
                            Some(ChildResult::Err(e)) => Some(*e),
                            _ => None,
                        })
                        .collect();
                    for (i, r) in res.iter().enumerate() {
                        if let Some(ChildResult::Err(e)) = r {
                            want_events.push(rb("read", i, Some(*e), sn, sc));
                        }
                    }
                    if ok.len() < t {
                        want = Err(error_vote(&errs));
                        want_events.push(fail(sn, sc));
                        *self.tally.paths.entry("P4").or_default() += 1;
                    } else if self.cfg.blkverify && ok.iter().any(|(_, d)| *d != ok[0].1) {
                        // Q33, D6: a mismatch is fatal to the process (recorded here), the
                        // read fails, nothing is emitted or repaired.
                        want = Err(ErrorKind::Io);
                    } else if ok.iter().all(|(_, d)| *d == ok[0].1) {
                        want = Ok(Some(ok[0].1));
                        if errs.is_empty() {
                            *self.tally.paths.entry("P1").or_default() += 1;
                        }
                    } else {
                        let mut versions: Vec<(u64, Vec<usize>)> = Vec::new();
                        for &(i, d) in &ok {
                            match versions.iter_mut().find(|(x, _)| *x == d) {
                                Some((_, m)) => m.push(i),
                                None => versions.push((d, vec![i])),
                            }
                        }
                        let top = versions.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
                        let leaders: Vec<&(u64, Vec<usize>)> =
                            versions.iter().filter(|(_, m)| m.len() == top).collect();
                        if leaders.len() > 1 {
                            // I5 (Q23, D1): EIO + FAILURE, no mismatch event, no rewrite.
                            *self.tally.checks.entry("I5").or_default() += 1;
                            want = Err(ErrorKind::Io);
                            want_events.push(fail(sn, sc));
                            *self.tally.paths.entry("P4").or_default() += 1;
                        } else if top < t {
                            want = Err(ErrorKind::Io);
                            want_events.push(fail(sn, sc));
                            *self.tally.paths.entry("P4").or_default() += 1;
                        } else {
                            let (wd, winners) = leaders[0];
                            want = Ok(Some(*wd));
                            let losers: Vec<usize> = ok
                                .iter()
                                .map(|(i, _)| *i)
                                .filter(|i| !winners.contains(i))
                                .collect();
                            for &i in &losers {
                                want_events.push(rb("read", i, None, sn, sc));
                            }
                            *self.tally.paths.entry("P2").or_default() += 1;
                            if self.cfg.rewrite {
                                want_rewrites = losers.iter().map(|&i| (i, *wd)).collect();
                                *self.tally.paths.entry("P3").or_default() += 1;
                            }
                        }
                    }
                }
                // The repair writes: exactly the expected children, the winner's data, the
                // whole range (Q26, Q27, Q32); their failures change nothing (Q28).
                let mut got_rw: Vec<(usize, u64)> = children
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
                got_rw.sort_unstable();
                // The rewrite carries the winner's bytes; the model knows their read digest,
                // which equals the write digest (same bytes, same digest function).
                let mut want_rw = want_rewrites.clone();
                want_rw.sort_unstable();
                // D7, D8: the read holds its range through its repairs, so no guest write
                // can make a repair stale and none is ever skipped.
                if got_rw != want_rw {
                    let rule = if want_rewrites.is_empty() && want.is_err() {
                        "I5"
                    } else {
                        "I6"
                    };
                    bad(
                        v,
                        rule,
                        format!(
                            "repair writes {got_rw:?} (child, data digest), expected {want_rw:?}"
                        ),
                    );
                }
            }
            OpKind::Write | OpKind::WriteZeroes | OpKind::Trim => {
                let ck = match kind {
                    OpKind::Write => ChildKind::Write,
                    OpKind::WriteZeroes => ChildKind::Zero,
                    _ => ChildKind::Discard,
                };
                let writes: Vec<&ChildOp> = children.iter().filter(|c| c.kind == ck).collect();
                if kind == OpKind::Trim && !self.cfg.discard_forwarded {
                    want = Ok(None);
                    if !writes.is_empty() {
                        bad(
                            v,
                            "I7",
                            "discard reached the children without the zeroing guarantee (Q46)"
                                .into(),
                        );
                    }
                } else if md_failed && writes.is_empty() {
                    // H21: the intent could not be made durable; no child saw the write.
                    want = Err(ErrorKind::Io);
                } else {
                    // The children the quorum had when it wrote (F30: one may be swapped out).
                    let n = match &audit {
                        Some(Audit::Write { eligible, .. }) => eligible.len(),
                        _ => n,
                    };
                    if writes.len() != n {
                        bad(
                            v,
                            "I7",
                            format!(
                                "{} went to {} children, expected {n}",
                                kind.as_str(),
                                writes.len()
                            ),
                        );
                        return;
                    }
                    let mut errs = Vec::new();
                    for c in &writes {
                        if let ChildResult::Err(e) = c.result {
                            errs.push((c.disk, e));
                        }
                    }
                    errs.sort_by_key(|(d, _)| *d);
                    for (d, e) in &errs {
                        want_events.push(rb("write", *d, Some(*e), sn, sc));
                    }
                    // H4: a success counts if the quorum's audit says the child was eligible
                    // (in sync, covering, or a degraded range) and current (one epoch).
                    let s = writes
                        .iter()
                        .filter(|c| matches!(c.result, ChildResult::Ok(_)))
                        .filter(|c| match &audit {
                            Some(Audit::Write { eligible, current }) => {
                                eligible.get(c.disk).copied().unwrap_or(false)
                                    && current.get(c.disk).copied().unwrap_or(false)
                            }
                            _ => true,
                        })
                        .count();
                    if s >= t {
                        if !errs.is_empty() {
                            *self.tally.paths.entry("P6").or_default() += 1;
                        }
                        want = if fua && kind == OpKind::Write {
                            // H21: marks that could not be made durable (the write's or the
                            // FUA flush's) fail it; the flush's events stand.
                            let m = self.flush_model(children, &mut want_events);
                            if md_failed {
                                Err(ErrorKind::Io)
                            } else {
                                m
                            }
                        } else if md_failed {
                            Err(ErrorKind::Io)
                        } else {
                            Ok(None)
                        };
                    } else {
                        let kinds: Vec<ErrorKind> = errs.iter().map(|(_, e)| *e).collect();
                        want = Err(if kinds.is_empty() {
                            ErrorKind::Io
                        } else {
                            error_vote(&kinds)
                        });
                        want_events.push(fail(sn, sc));
                        *self.tally.paths.entry("P7").or_default() += 1;
                    }
                }
            }
            OpKind::Flush => {
                want = self.flush_model(children, &mut want_events);
            }

            OpKind::BlockStatus => {
                // Q43, Q44: children in order; the first failure answers DATA over the whole
                // count with one error event; otherwise the merge of all answers. The answer
                // travels as `zero << 63 | length` in the digest slot.
                let sts: Vec<&ChildOp> = children
                    .iter()
                    .filter(|c| c.kind == ChildKind::Status)
                    .collect();
                let mut answer = None;
                let (mut all_zero, mut zero_len, mut data_len) = (true, u64::MAX, 0u64);
                for (k, c) in sts.iter().enumerate() {
                    if c.disk != k {
                        bad(
                            v,
                            "I7",
                            format!(
                                "block status asked {}{} out of order",
                                self.cfg.prefix, c.disk
                            ),
                        );
                        return;
                    }
                    match c.result {
                        ChildResult::Err(e) => {
                            want_events.push(rb("read", k, Some(e), sn, sc));
                            answer = Some(len);
                            if sts.len() != k + 1 {
                                bad(
                                    v,
                                    "I7",
                                    format!("block status went on after c{k} failed (Q43)"),
                                );
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
                want = Ok(Some(match answer {
                    Some(l) => l,
                    None if sts.len() != n => {
                        bad(
                            v,
                            "I7",
                            format!("block status asked {} of {n} children", sts.len()),
                        );
                        return;
                    }
                    None if all_zero => (1 << 63) | zero_len,
                    None => data_len,
                }));
            }
        }
        *self.tally.checks.entry("I7").or_default() += 1;
        *self.tally.checks.entry("I8").or_default() += 1;
        // Result.
        let mut want = want;
        if md_failed
            && want.is_ok()
            && matches!(
                kind,
                OpKind::Write | OpKind::WriteZeroes | OpKind::Trim | OpKind::Flush
            )
        {
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
        if let (Ok(Some(_)), OpKind::Read) | (Ok(None), _) = (&got, kind) {
            // compared below
        }
        if got != want {
            let rule = match (&got, &want) {
                (Ok(_), Err(_)) if kind == OpKind::Read && !self.cfg.fifo => {
                    // A read that should have failed returned data: tie or threshold.
                    "I5"
                }
                _ => "I7",
            };
            let show = |r: &Result<Option<u64>, ErrorKind>| match r {
                Ok(Some(d)) => format!("ok(data {d:016x})"),
                Ok(None) => "ok".to_string(),
                Err(k) => k.errno_name().to_string(),
            };
            bad(
                v,
                rule,
                format!(
                    "{} returned {}, the vote model says {}",
                    kind.as_str(),
                    show(&got),
                    show(&want)
                ),
            );
        }
        // Events (I8): exactly the expected multiset; mismatch events in ascending order.
        let mut got_ev: Vec<String> = events
            .iter()
            .map(|e| match e {
                Event::QuorumReportBad {
                    io,
                    error,
                    node_name,
                    sector_num,
                    sectors_count,
                } => format!(
                    "RB {} {} {} {}/{}",
                    match io {
                        IoType::Read => "read",
                        IoType::Write => "write",
                        IoType::Flush => "flush",
                    },
                    node_name,
                    error.map(|k| k.errno_name()).unwrap_or("-"),
                    sector_num,
                    sectors_count
                ),
                Event::QuorumFailure {
                    sector_num,
                    sectors_count,
                    ..
                } => format!("FAILURE {sector_num}/{sectors_count}"),
                Event::BlockJobCompleted {
                    device,
                    offset,
                    len,
                    error,
                    ..
                } => format!(
                    "JOB {device} {offset}/{len} {}",
                    error.map(|k| k.errno_name()).unwrap_or("-")
                ),
                Event::JobStatusChange { id, status } => format!("JOBSTATUS {id} {status}"),
            })
            .collect();
        let mismatch_order: Vec<&String> = got_ev.iter().filter(|e| e.contains(" - ")).collect();
        let mut sorted_mm = mismatch_order.clone();
        sorted_mm.sort_by_key(|e| {
            e.split(' ')
                .nth(2)
                .map(|c| c[1..].parse::<usize>().unwrap_or(0))
        });
        if mismatch_order != sorted_mm {
            bad(
                v,
                "I8",
                format!("mismatch events out of child order: {mismatch_order:?}"),
            );
        }
        got_ev.sort();
        want_events.sort();
        if got_ev != want_events {
            let rule = if kind == OpKind::Read
                && want_events.iter().any(|e| e.starts_with("FAILURE"))
                && got_ev.iter().any(|e| e.contains(" - "))
            {
                "I5"
            } else {
                "I8"
            };
            bad(
                v,
                rule,
                format!("events {got_ev:?}, expected {want_events:?}"),
            );
        }
    }

    /// Q41: each child flushed once, in order; RB(flush) 0/0 per failure; ok iff s >= t.
    fn flush_model(
        &mut self,
        children: &[ChildOp],
        want_events: &mut Vec<String>,
    ) -> Result<Option<u64>, ErrorKind> {
        let flushes: Vec<&ChildOp> = children
            .iter()
            .filter(|c| c.kind == ChildKind::Flush)
            .collect();
        let mut errs = Vec::new();
        for c in &flushes {
            if let ChildResult::Err(e) = c.result {
                want_events.push(format!(
                    "RB flush {}{} {} 0/0",
                    self.cfg.prefix,
                    c.disk,
                    e.errno_name()
                ));
                errs.push(e);
            }
        }
        // The children the quorum had when it flushed (HEALING.md F30: one may be swapped out).
        let n = match &self.flush_audit {
            Some(Audit::Flush { eligible }) => eligible.len(),
            _ => self.cfg.n,
        };
        if flushes.len() != n {
            return Err(ErrorKind::NotSup); // forces a mismatch report: not every child flushed
        }
        // D14: a success counts if the quorum found the child in sync on what the flush had to
        // make durable.
        let counted = flushes
            .iter()
            .filter(|c| matches!(c.result, ChildResult::Ok(_)))
            .filter(|c| match &self.flush_audit {
                Some(Audit::Flush { eligible }) => eligible.get(c.disk).copied().unwrap_or(false),
                _ => true,
            })
            .count();
        if counted >= self.cfg.t {
            Ok(None)
        } else {
            *self.tally.paths.entry("P8").or_default() += 1;
            Err(if errs.is_empty() {
                ErrorKind::Io
            } else {
                error_vote(&errs)
            })
        }
    }

    /// Ops touching sector `s` (for failure reports), newest last.
    pub fn history(&self, s: Option<u64>, limit: usize) -> Vec<String> {
        let mut out: Vec<String> = self
            .ops
            .iter()
            .filter(|(id, op)| {
                **id != 0
                    && match s {
                        Some(s) => {
                            op.kind == OpKind::Flush
                                || (op.offset / SECTOR_U64 <= s
                                    && s < (op.offset + op.len).div_ceil(SECTOR_U64))
                        }
                        None => true,
                    }
            })
            .map(|(id, op)| {
                format!(
                    "  op={id:<6} {:<12} off={:<10} len={:<8}{} inv={} cmp={} {}{}",
                    op.kind.as_str(),
                    op.offset,
                    op.len,
                    if op.fua { " fua" } else { "" },
                    op.inv,
                    op.cmp.map(|c| c.to_string()).unwrap_or_else(|| "-".into()),
                    match op.outcome {
                        Outcome::Pending => "pending".to_string(),
                        Outcome::Ok => "ok".to_string(),
                        Outcome::Fail(k) => k.errno_name().to_string(),
                        Outcome::Info => "info".to_string(),
                    },
                    if op.durable && op.kind != OpKind::Read {
                        " durable"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        if out.len() > limit {
            out.drain(..out.len() - limit);
        }
        out
    }

    /// The value write `id` holds at sector `s`, for `contents` expectations.
    pub fn expected_value(&self, id: u64, s: u64) -> Value {
        self.value_of(id, s)
    }

    /// Ops registered so far (excluding the initial image).
    pub fn op_count(&self) -> u64 {
        self.next_op - 1
    }
}

/// Q20, independently: the most common kind; among equals, the one whose first occurrence is
/// latest.
pub fn error_vote(errs: &[ErrorKind]) -> ErrorKind {
    let mut tally: Vec<(ErrorKind, usize)> = Vec::new();
    for e in errs {
        match tally.iter_mut().find(|(k, _)| k == e) {
            Some((_, c)) => *c += 1,
            None => tally.push((*e, 1)),
        }
    }
    let top = tally.iter().map(|(_, c)| *c).max().unwrap_or(0);
    tally
        .iter()
        .rev()
        .find(|(_, c)| *c == top)
        .map(|(k, _)| *k)
        .unwrap_or(ErrorKind::Io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oplog::{ChildKind, ChildOp, ChildResult};

    fn cfg(n: usize, t: usize) -> ModelCfg {
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

    fn child(disk: usize, kind: ChildKind, len: u64, result: ChildResult) -> ChildOp {
        ChildOp {
            disk,
            kind,
            offset: 0,
            len,
            data: 0,
            result,
        }
    }

    #[test]
    fn o3_a_read_after_an_acked_write_that_returns_the_old_value_is_i3() {
        let mut o = Oracle::new(cfg(3, 2));
        let w = o.invoke(OpKind::Write, 0, 512, false);
        let writes: Vec<ChildOp> = (0..3)
            .map(|d| child(d, ChildKind::Write, 512, ChildResult::Ok(0)))
            .collect();
        assert!(o.complete(w, Ok(None), &writes, &[], false).is_empty());
        let old = Oracle::write_data(0, 0, 512);
        let r = o.invoke(OpKind::Read, 0, 512, false);
        let d = data_digest(&old);
        let reads: Vec<ChildOp> = (0..3)
            .map(|k| child(k, ChildKind::Read, 512, ChildResult::Ok(d)))
            .collect();
        let v = o.complete(r, Ok(Some(&old[..])), &reads, &[], false);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].rule, "I3");
        assert_eq!(v[0].sector, Some(0));
        assert_eq!(v[0].message, "stale read: got=w0 allowed={w1}");
    }

    #[test]
    fn i5_a_tie_that_returns_data_is_flagged_with_the_model_verdict() {
        let mut o = Oracle::new(cfg(4, 2));
        let data = Oracle::write_data(0, 0, 512);
        let (a, b) = (data_digest(&data), 7u64);
        let r = o.invoke(OpKind::Read, 0, 512, false);
        let reads = vec![
            child(0, ChildKind::Read, 512, ChildResult::Ok(a)),
            child(1, ChildKind::Read, 512, ChildResult::Ok(b)),
            child(2, ChildKind::Read, 512, ChildResult::Ok(a)),
            child(3, ChildKind::Read, 512, ChildResult::Ok(b)),
        ];
        let v = o.complete(r, Ok(Some(&data[..])), &reads, &[], false);
        assert_eq!(v[0].rule, "I5");
        assert_eq!(
            v[0].message,
            format!("read returned ok(data {a:016x}), the vote model says EIO")
        );
    }

    #[test]
    fn q20_error_vote_model_matches_qemu_rule() {
        use ErrorKind::*;
        assert_eq!(error_vote(&[Io, NoSpc]), NoSpc);
        assert_eq!(error_vote(&[NoSpc, Io, Io, NoSpc]), Io);
        assert_eq!(error_vote(&[]), Io);
    }
}
