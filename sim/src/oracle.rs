//! The oracle (SIMULATION.md §6, §7): a reference model of which values each sector may hold,
//! and an independent model of the quorum's vote, checked on every guest operation.
//!
//! It sees only what the harness records: guest ops with their logical invoke and completion
//! times and results, the child requests each op caused (the vdisk log) and the events each op
//! emitted. From the child results it recomputes QUORUM.md's outcome for the op (result, data,
//! events, repairs: I5, I7, I8); from the history it computes the allowed set of each sector a
//! read returns (O3–O5: I1, I2, I3).

use crate::ids::{Path, Rule};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ballot::drivers::quorum::Audit;
use ballot::events::Event;
use ballot::ErrorKind;

use crate::oplog::ChildOp;
use crate::sector::{decode, Decoded, Value, SECTOR, SECTOR_U64};
pub use crate::verdict::{Finding, ModelCfg, OpKind, Tally};

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
    ) -> Vec<Finding> {
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
        // I7/I8/I5: the op's verdict from its children's answers.
        let audits = self.audits.remove(&id).unwrap_or_default();
        let view = crate::verdict::OpView {
            id,
            kind,
            offset,
            len,
            fua,
            children,
            events,
            audit: audits
                .iter()
                .find(|a| !matches!(a, Audit::Flush { .. } | Audit::MetadataFailed)),
            flush_audit: audits.iter().find(|a| matches!(a, Audit::Flush { .. })),
            md_failed: audits.iter().any(|a| matches!(a, Audit::MetadataFailed)),
        };
        crate::verdict::judge(&self.cfg, &mut self.tally, &view, &result, &mut v);
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
                v.push(Finding {
                    rule: Rule::I14,
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
        v: &mut Vec<Finding>,
    ) {
        *self.tally.checks.entry(Rule::I1).or_default() += 1;
        for (k, chunk) in data.chunks(SECTOR).enumerate() {
            let s = offset / SECTOR_U64 + k as u64;
            if self.recovered_any.contains(&s) {
                *self.tally.paths.entry(Path::OutOfModel).or_default() += 1;
                continue;
            }
            let got = match decode(chunk) {
                Decoded::Value(Value::Data { id: w, sector }) if sector != s => {
                    v.push(Finding {
                        rule: Rule::I1,
                        op: id,
                        sector: Some(s),
                        message: format!("misdirected data: got w{w} of sector {sector}"),
                    });
                    return;
                }
                Decoded::Value(x) => x,
                Decoded::Garbage => {
                    v.push(Finding {
                        rule: Rule::I1,
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
                        Rule::I3
                    } else {
                        Rule::I2
                    }
                } else {
                    Rule::I1
                };
                if rule != Rule::I1 && self.cfg.beyond && self.cfg.late_writes {
                    // B7, S7: over NBD, copies go stale without an injection (timeouts, late
                    // writes), and free silent faults can then agree with them; the vote (I7)
                    // has already checked the quorum against its children's answers. The read
                    // is out of model, not judged.
                    *self.tally.paths.entry(Path::OutOfModel).or_default() += 1;
                    return;
                }
                v.push(Finding {
                    rule,
                    op: id,
                    sector: Some(s),
                    message: format!(
                        "{} read: got={} allowed={{{}}}",
                        if rule == Rule::I1 { "foreign" } else { "stale" },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oplog::{ChildKind, ChildOp, ChildResult};
    use crate::sector::data_digest;

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
        assert_eq!(v[0].rule, Rule::I3);
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
        assert_eq!(v[0].rule, Rule::I5);
        assert_eq!(
            v[0].message,
            format!("read returned ok(data {a:016x}), the vote model says EIO")
        );
    }
}
