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
    use ballot::events::IoType;
    use bytes::Bytes;

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

    /// Child `disk`'s request for guest write `id` of one sector at sector 0, carrying the
    /// guest's bytes (Q36).
    fn wrote(id: u64, disk: usize, result: ChildResult) -> ChildOp {
        ChildOp {
            data: crate::sector::write_digest(id, 0, 512),
            ..child(disk, ChildKind::Write, 512, result)
        }
    }

    #[test]
    fn the_write_digest_from_values_is_the_digest_of_the_bytes_a_write_carries() {
        for (id, offset, len) in [(1, 0, 512), (7, 4096, 65536), (u64::MAX >> 8, 512, 1536)] {
            let bytes = Oracle::write_data(id, offset, len);
            assert_eq!(
                crate::sector::write_digest(id, offset, len),
                data_digest(&bytes),
                "write {id} at {offset}+{len}"
            );
        }
        assert_ne!(
            crate::sector::write_digest(1, 0, 512),
            crate::sector::write_digest(2, 0, 512)
        );
    }

    #[test]
    fn o3_a_read_after_an_acked_write_that_returns_the_old_value_is_i3() {
        let mut o = Oracle::new(ModelCfg::plain(3, 2));
        let w = o.invoke(OpKind::Write, 0, 512, false);
        let writes: Vec<ChildOp> = (0..3).map(|d| wrote(w, d, ChildResult::Ok(0))).collect();
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
        let mut o = Oracle::new(ModelCfg::plain(4, 2));
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

    /// A QUORUM_REPORT_BAD of `child` for a one-sector request at sector 0.
    fn rb(io: IoType, child: usize, error: Option<ErrorKind>) -> Event {
        Event::QuorumReportBad {
            io,
            error,
            node_name: format!("c{child}"),
            sector_num: 0,
            sectors_count: 1,
        }
    }

    /// The findings of one op of `kind` on sector 0 whose children answered `answers`
    /// (children 0, 1, 2...), completed with `result` and `events`, after nothing else, in
    /// the safety phase (errors are allowed there, O7; wrong ones are not).
    fn judge(
        t: usize,
        kind: OpKind,
        answers: &[ChildResult],
        result: Result<Option<&[u8]>, ErrorKind>,
        events: &[Event],
    ) -> Vec<(Rule, String)> {
        judge_with(
            ModelCfg::plain(answers.len(), t),
            kind,
            answers,
            result,
            events,
        )
    }

    /// [`judge`] under configuration `c`.
    fn judge_with(
        c: ModelCfg,
        kind: OpKind,
        answers: &[ChildResult],
        result: Result<Option<&[u8]>, ErrorKind>,
        events: &[Event],
    ) -> Vec<(Rule, String)> {
        let mut o = Oracle::new(c);
        let len = if kind == OpKind::Flush { 0 } else { 512 };
        let id = o.invoke(kind, 0, len, false);
        let ck = match kind {
            OpKind::Read => ChildKind::Read,
            OpKind::Flush => ChildKind::Flush,
            OpKind::WriteZeroes => ChildKind::Zero,
            OpKind::Trim => ChildKind::Discard,
            _ => ChildKind::Write,
        };
        let children: Vec<ChildOp> = answers
            .iter()
            .enumerate()
            .map(|(d, r)| match ck {
                ChildKind::Write => wrote(id, d, r.clone()),
                _ => child(d, ck, len, r.clone()),
            })
            .collect();
        o.complete(id, result, &children, events, false)
            .into_iter()
            .map(|f| (f.rule, f.message))
            .collect()
    }

    fn initial() -> Bytes {
        Oracle::write_data(0, 0, 512)
    }

    #[test]
    fn i8_an_outvoted_child_is_reported_once_without_an_error() {
        let a = ChildResult::Ok(data_digest(&initial()));
        let answers = [a.clone(), a, ChildResult::Ok(7)];
        let data = initial();
        let ok = judge(
            2,
            OpKind::Read,
            &answers,
            Ok(Some(&data[..])),
            &[rb(IoType::Read, 2, None)],
        );
        assert_eq!(ok, []);
        let missing = judge(2, OpKind::Read, &answers, Ok(Some(&data[..])), &[]);
        assert_eq!(
            missing,
            [(
                Rule::I8,
                "events [], expected [\"RB read c2 - 0/1\"]".to_string()
            )]
        );
        let twice = [rb(IoType::Read, 2, None), rb(IoType::Read, 2, None)];
        let extra = judge(2, OpKind::Read, &answers, Ok(Some(&data[..])), &twice);
        assert_eq!(
            extra,
            [(Rule::I8, "events [\"RB read c2 - 0/1\", \"RB read c2 - 0/1\"], expected [\"RB read c2 - 0/1\"]".to_string())]
        );
    }

    #[test]
    fn i8_a_report_where_every_child_agreed_is_one_too_many() {
        let a = ChildResult::Ok(data_digest(&initial()));
        let data = initial();
        let got = judge(
            2,
            OpKind::Read,
            &[a.clone(), a.clone(), a],
            Ok(Some(&data[..])),
            &[rb(IoType::Read, 1, None)],
        );
        assert_eq!(
            got,
            [(
                Rule::I8,
                "events [\"RB read c1 - 0/1\"], expected []".to_string()
            )]
        );
    }

    #[test]
    fn i5_a_read_no_version_of_which_has_t_votes_must_not_return_data() {
        let data = initial();
        let answers = [
            ChildResult::Ok(data_digest(&data)),
            ChildResult::Ok(7),
            ChildResult::Ok(9),
        ];
        let failure = [Event::QuorumFailure {
            reference: "q0".into(),
            sector_num: 0,
            sectors_count: 1,
        }];
        assert_eq!(
            judge(2, OpKind::Read, &answers, Err(ErrorKind::Io), &failure),
            []
        );
        let got = judge(2, OpKind::Read, &answers, Ok(Some(&data[..])), &[]);
        let digest = data_digest(&data);
        assert_eq!(
            got,
            [
                (
                    Rule::I5,
                    format!("read returned ok(data {digest:016x}), the vote model says EIO")
                ),
                (
                    Rule::I8,
                    "events [], expected [\"FAILURE 0/1\"]".to_string()
                ),
            ]
        );
    }

    #[test]
    fn i7_a_write_is_acked_exactly_when_t_children_wrote_it() {
        let (ok, eio) = (ChildResult::Ok(0), ChildResult::Err(ErrorKind::Io));
        let failed_c2 = [rb(IoType::Write, 2, Some(ErrorKind::Io))];
        // Two of three wrote it: acked, with the failed child reported.
        assert_eq!(
            judge(
                2,
                OpKind::Write,
                &[ok.clone(), ok.clone(), eio.clone()],
                Ok(None),
                &failed_c2
            ),
            []
        );
        // ... and failing it anyway is I7.
        let got = judge(
            2,
            OpKind::Write,
            &[ok.clone(), ok.clone(), eio.clone()],
            Err(ErrorKind::Io),
            &failed_c2,
        );
        assert_eq!(
            got,
            [(
                Rule::I7,
                "write returned EIO, the vote model says ok".to_string()
            )]
        );
        // One of three: acking it is I7.
        let failed = [
            rb(IoType::Write, 1, Some(ErrorKind::Io)),
            rb(IoType::Write, 2, Some(ErrorKind::Io)),
        ];
        let got = judge(
            2,
            OpKind::Write,
            &[ok.clone(), eio.clone(), eio.clone()],
            Ok(None),
            &failed,
        );
        // I7 also asks a failed write for QUORUM_FAILURE, so its absence is I8 too.
        assert_eq!(
            got,
            [
                (Rule::I7, "write returned ok, the vote model says EIO".to_string()),
                (
                    Rule::I8,
                    "events [\"RB write c1 EIO 0/1\", \"RB write c2 EIO 0/1\"], expected [\"RB write c1 EIO 0/1\", \"RB write c2 EIO 0/1\", \"FAILURE 0/1\"]".to_string()
                ),
            ]
        );
        // Failed, with both reports and QUORUM_FAILURE: right.
        let mut all = failed.to_vec();
        all.push(Event::QuorumFailure {
            reference: "q0".into(),
            sector_num: 0,
            sectors_count: 1,
        });
        assert_eq!(
            judge(
                2,
                OpKind::Write,
                &[ok, eio.clone(), eio],
                Err(ErrorKind::Io),
                &all
            ),
            []
        );
    }

    #[test]
    fn i8_a_child_that_failed_a_write_is_reported_with_its_error() {
        let (ok, eio) = (ChildResult::Ok(0), ChildResult::Err(ErrorKind::Io));
        let got = judge(2, OpKind::Write, &[ok.clone(), ok, eio], Ok(None), &[]);
        assert_eq!(
            got,
            [(
                Rule::I8,
                "events [], expected [\"RB write c2 EIO 0/1\"]".to_string()
            )]
        );
    }

    #[test]
    fn i7_a_flush_succeeds_exactly_when_t_children_flushed() {
        let (ok, eio) = (ChildResult::Ok(0), ChildResult::Err(ErrorKind::Io));
        let failed = [
            Event::QuorumReportBad {
                io: IoType::Flush,
                error: Some(ErrorKind::Io),
                node_name: "c1".into(),
                sector_num: 0,
                sectors_count: 0,
            },
            Event::QuorumReportBad {
                io: IoType::Flush,
                error: Some(ErrorKind::Io),
                node_name: "c2".into(),
                sector_num: 0,
                sectors_count: 0,
            },
        ];
        let got = judge(
            2,
            OpKind::Flush,
            &[ok.clone(), eio.clone(), eio.clone()],
            Ok(None),
            &failed,
        );
        assert_eq!(
            got,
            [(
                Rule::I7,
                "flush returned ok, the vote model says EIO".to_string()
            )]
        );
        // A failed flush emits no QUORUM_FAILURE (I7): its reports alone are right.
        assert_eq!(
            judge(
                2,
                OpKind::Flush,
                &[ok, eio.clone(), eio],
                Err(ErrorKind::Io),
                &failed
            ),
            []
        );
    }

    #[test]
    fn i1_a_read_of_another_sectors_bytes_is_caught() {
        let mut o = Oracle::new(ModelCfg::plain(3, 2));
        let foreign = Oracle::write_data(0, 512, 512);
        let d = data_digest(&foreign);
        let r = o.invoke(OpKind::Read, 0, 512, false);
        let reads: Vec<ChildOp> = (0..3)
            .map(|k| child(k, ChildKind::Read, 512, ChildResult::Ok(d)))
            .collect();
        let v = o.complete(r, Ok(Some(&foreign[..])), &reads, &[], false);
        let got: Vec<(Rule, String)> = v.into_iter().map(|f| (f.rule, f.message)).collect();
        assert_eq!(
            got,
            [(Rule::I1, "misdirected data: got w0 of sector 1".to_string())]
        );
    }

    #[test]
    fn a_fifo_read_moves_on_from_a_failed_child_and_never_fails_the_quorum() {
        let data = initial();
        let mut c = ModelCfg::plain(3, 1);
        c.fifo = true;
        let run = |answers: &[ChildResult],
                   result: Result<Option<&[u8]>, ErrorKind>,
                   events: &[Event]| {
            judge_with(c.clone(), OpKind::Read, answers, result, events)
        };
        let eio = ChildResult::Err(ErrorKind::Io);
        let a = ChildResult::Ok(data_digest(&data));
        let c0 = [rb(IoType::Read, 0, Some(ErrorKind::Io))];
        // c0 failed, c1 answered: the read returns c1's data and reports c0 (P5).
        assert_eq!(run(&[eio.clone(), a.clone()], Ok(Some(&data[..])), &c0), []);
        let digest = data_digest(&data);
        assert_eq!(
            run(&[eio.clone(), a.clone()], Err(ErrorKind::Io), &c0),
            [(
                Rule::I7,
                format!("read returned EIO, the vote model says ok(data {digest:016x})")
            )]
        );
        let both = [
            rb(IoType::Read, 0, Some(ErrorKind::Io)),
            rb(IoType::Read, 1, Some(ErrorKind::Io)),
            rb(IoType::Read, 2, Some(ErrorKind::Io)),
        ];
        let mut with_failure = both.to_vec();
        with_failure.push(Event::QuorumFailure {
            reference: "q0".into(),
            sector_num: 0,
            sectors_count: 1,
        });
        // Every child failed: EIO with three reports, and no QUORUM_FAILURE (I7).
        assert_eq!(
            run(
                &[eio.clone(), eio.clone(), eio.clone()],
                Err(ErrorKind::Io),
                &both
            ),
            []
        );
        assert_eq!(
            run(&[eio.clone(), eio.clone(), eio], Err(ErrorKind::Io), &with_failure),
            [(
                Rule::I8,
                "events [\"RB read c0 EIO 0/1\", \"RB read c1 EIO 0/1\", \"RB read c2 EIO 0/1\", \"FAILURE 0/1\"], expected [\"RB read c0 EIO 0/1\", \"RB read c1 EIO 0/1\", \"RB read c2 EIO 0/1\"]".to_string()
            )]
        );
    }

    #[test]
    fn rewrite_corrupted_rewrites_the_outvoted_child() {
        let data = initial();
        let mut c = ModelCfg::plain(3, 2);
        c.rewrite = true;
        let a = ChildResult::Ok(data_digest(&data));
        let run = |extra: &[ChildOp]| {
            let mut o = Oracle::new(c.clone());
            let id = o.invoke(OpKind::Read, 0, 512, false);
            let mut children: Vec<ChildOp> = [a.clone(), a.clone(), ChildResult::Ok(7)]
                .iter()
                .enumerate()
                .map(|(d, r)| child(d, ChildKind::Read, 512, r.clone()))
                .collect();
            children.extend_from_slice(extra);
            o.complete(
                id,
                Ok(Some(&data[..])),
                &children,
                &[rb(IoType::Read, 2, None)],
                false,
            )
            .into_iter()
            .map(|f| (f.rule, f.message))
            .collect::<Vec<_>>()
        };
        let mut w = child(2, ChildKind::Write, 512, ChildResult::Ok(0));
        w.data = data_digest(&data);
        let d = data_digest(&data);
        // Q26/P3: the winner's data written back to c2, and only there.
        assert_eq!(run(&[w]), []);
        assert_eq!(
            run(&[]),
            [(
                Rule::I6,
                format!("repair writes [] (child, data digest), expected [(2, {d})]")
            )]
        );
        let mut wrong = child(1, ChildKind::Write, 512, ChildResult::Ok(0));
        wrong.data = d;
        assert_eq!(
            run(&[wrong]),
            [(
                Rule::I6,
                format!("repair writes [(1, {d})] (child, data digest), expected [(2, {d})]")
            )]
        );
    }

    /// Children 0..n that all answered `data` to a read (of the op's length).
    fn agreeing(n: usize, data: &[u8]) -> Vec<ChildOp> {
        (0..n)
            .map(|d| {
                child(
                    d,
                    ChildKind::Read,
                    data.len() as u64,
                    ChildResult::Ok(data_digest(data)),
                )
            })
            .collect()
    }

    /// Completes read `id` (at sector 0) with `data`, on which every child agreed; its
    /// findings as (rule, sector, message), each naming the read.
    fn finish_read(o: &mut Oracle, id: u64, data: &[u8]) -> Vec<(Rule, Option<u64>, String)> {
        let n = o.cfg.n;
        let v = o.complete(id, Ok(Some(data)), &agreeing(n, data), &[], false);
        assert!(v.iter().all(|f| f.op == id), "{v:?}");
        v.into_iter()
            .map(|f| (f.rule, f.sector, f.message))
            .collect()
    }

    /// A read of sector 0 invoked and completed now, returning `data`.
    fn read_now(o: &mut Oracle, data: &[u8]) -> Vec<(Rule, Option<u64>, String)> {
        let id = o.invoke(OpKind::Read, 0, data.len() as u64, false);
        finish_read(o, id, data)
    }

    /// A guest op of `kind` at `offset` that every child carried out; returns its id.
    fn acked(o: &mut Oracle, kind: OpKind, offset: u64, len: u64, fua: bool) -> u64 {
        let id = o.invoke(kind, offset, len, fua);
        let ck = match kind {
            OpKind::Flush => ChildKind::Flush,
            OpKind::Trim => ChildKind::Discard,
            OpKind::WriteZeroes => ChildKind::Zero,
            _ => ChildKind::Write,
        };
        let data = match ck {
            ChildKind::Write => crate::sector::write_digest(id, offset, len),
            _ => 0,
        };
        let children: Vec<ChildOp> = (0..o.cfg.n)
            .map(|d| ChildOp {
                offset,
                data,
                ..child(d, ck, len, ChildResult::Ok(0))
            })
            .collect();
        let children = if kind == OpKind::Trim && !o.cfg.discard_forwarded {
            Vec::new()
        } else {
            children
        };
        assert!(o.complete(id, Ok(None), &children, &[], false).is_empty());
        id
    }

    #[test]
    fn a_read_of_bytes_that_decode_to_nothing_is_i1_at_the_sector_they_fill() {
        let mut o = Oracle::new(ModelCfg::plain(3, 2));
        let good = Oracle::write_data(0, 0, 1024);
        assert_eq!(read_now(&mut o, &good), []);
        // V7: one flipped bit in the second sector fails its checksum (F1 served as is).
        let mut torn = good.to_vec();
        torn[600] ^= 1;
        assert_eq!(
            read_now(&mut o, &torn),
            [(
                Rule::I1,
                Some(1),
                "corrupt or torn bytes (decode to nothing)".to_string()
            )]
        );
    }

    #[test]
    fn a_read_of_a_value_no_write_left_in_that_sector_is_i1() {
        let mut o = Oracle::new(ModelCfg::plain(3, 2));
        // Write 1 went to sector 1 only; its data made for sector 0 never existed anywhere.
        let w = acked(&mut o, OpKind::Write, 512, 512, false);
        assert_eq!(w, 1);
        let never = Oracle::write_data(w, 0, 512);
        assert_eq!(
            read_now(&mut o, &never),
            [(
                Rule::I1,
                Some(0),
                "foreign read: got=w1 allowed={w0}".to_string()
            )]
        );
        // Zeros on a disk that started as write 0's pattern: no write left them either.
        assert_eq!(
            read_now(&mut o, &[0u8; 512]),
            [(
                Rule::I1,
                Some(0),
                "foreign read: got=zero allowed={w0}".to_string()
            )]
        );
        assert_eq!(read_now(&mut o, &initial()), []);
    }

    #[test]
    fn reads_that_overlap_a_write_may_return_either_value_and_later_ones_only_the_new() {
        let mut o = Oracle::new(ModelCfg::plain(3, 2));
        let w = o.invoke(OpKind::Write, 0, 512, false);
        let (r1, r2) = (
            o.invoke(OpKind::Read, 0, 512, false),
            o.invoke(OpKind::Read, 0, 512, false),
        );
        let writes: Vec<ChildOp> = (0..3).map(|d| wrote(w, d, ChildResult::Ok(0))).collect();
        assert!(o.complete(w, Ok(None), &writes, &[], false).is_empty());
        let new = Oracle::write_data(w, 0, 512);
        // O3: both reads began before the write ended, so each may see either value, and
        // r1 seeing the new one does not bind r2, which began before r1 ended (O4).
        assert_eq!(finish_read(&mut o, r1, &new), []);
        assert_eq!(finish_read(&mut o, r2, &initial()), []);
        // I3: a read that begins after the write was acked may not.
        assert_eq!(
            read_now(&mut o, &initial()),
            [(
                Rule::I3,
                Some(0),
                "stale read: got=w0 allowed={w1}".to_string()
            )]
        );
    }

    #[test]
    fn a_value_a_read_has_returned_may_not_flicker_back() {
        let mut o = Oracle::new(ModelCfg::plain(3, 2));
        // A write that failed (one success of three) may have landed or not (O2).
        let w = o.invoke(OpKind::Write, 0, 512, false);
        let writes = [
            wrote(w, 0, ChildResult::Ok(0)),
            wrote(w, 1, ChildResult::Err(ErrorKind::Io)),
            wrote(w, 2, ChildResult::Err(ErrorKind::Io)),
        ];
        let events = [
            rb(IoType::Write, 1, Some(ErrorKind::Io)),
            rb(IoType::Write, 2, Some(ErrorKind::Io)),
            Event::QuorumFailure {
                reference: "q0".into(),
                sector_num: 0,
                sectors_count: 1,
            },
        ];
        assert!(o
            .complete(w, Err(ErrorKind::Io), &writes, &events, false)
            .is_empty());
        let new = Oracle::write_data(w, 0, 512);
        assert_eq!(read_now(&mut o, &initial()), []);
        assert_eq!(read_now(&mut o, &new), []);
        // O4: once a read returned w1, later reads treat w1 as acked when that read ended.
        assert_eq!(
            read_now(&mut o, &initial()),
            [(
                Rule::I3,
                Some(0),
                "stale read: got=w0 allowed={w1}".to_string()
            )]
        );
    }

    #[test]
    fn without_a_majority_only_a_flushed_write_replaces_the_old_value() {
        // 2t <= N: I3 is not checked; I2's durable floor is.
        let mut o = Oracle::new(ModelCfg::plain(2, 1));
        let w = acked(&mut o, OpKind::Write, 0, 512, false);
        assert_eq!(read_now(&mut o, &initial()), []);
        acked(&mut o, OpKind::Flush, 0, 0, false);
        assert_eq!(
            read_now(&mut o, &initial()),
            [(
                Rule::I2,
                Some(0),
                "stale read: got=w0 allowed={w1}".to_string()
            )]
        );
        assert_eq!(read_now(&mut o, &Oracle::write_data(w, 0, 512)), []);
    }

    #[test]
    fn a_crash_that_leaves_an_unflushed_write_on_too_few_children_allows_the_old_value() {
        // O5: after the crash w1 (acked, not flushed) is on `holders` of the 3 children.
        let after_crash = |holders: usize| {
            let mut o = Oracle::new(ModelCfg::plain(3, 2));
            let w = acked(&mut o, OpKind::Write, 0, 512, false);
            o.crash(|_, _| holders);
            (read_now(&mut o, &initial()), o.guaranteed(0, w))
        };
        // One holder: two copies without w1 can outvote it, so w0 may be read again.
        assert_eq!(after_crash(1), (vec![], false));
        // Two holders: only one copy lacks it; w1 stays guaranteed and w0 is stale.
        assert_eq!(
            after_crash(2),
            (
                vec![(
                    Rule::I3,
                    Some(0),
                    "stale read: got=w0 allowed={w1}".to_string()
                )],
                true
            )
        );
    }

    #[test]
    fn an_error_is_counted_in_the_safety_phase_and_is_i14_in_the_liveness_phase() {
        let eio = ChildResult::Err(ErrorKind::Io);
        let reads: Vec<ChildOp> = (0..3)
            .map(|d| child(d, ChildKind::Read, 512, eio.clone()))
            .collect();
        let mut events: Vec<Event> = (0..3)
            .map(|d| rb(IoType::Read, d, Some(ErrorKind::Io)))
            .collect();
        events.push(Event::QuorumFailure {
            reference: "q0".into(),
            sector_num: 0,
            sectors_count: 1,
        });
        // Every child failed: EIO is the right answer (I7) in both phases.
        let run = |liveness: bool| {
            let mut o = Oracle::new(ModelCfg::plain(3, 2));
            let id = o.invoke(OpKind::Read, 0, 512, false);
            let v = o.complete(id, Err(ErrorKind::Io), &reads, &events, liveness);
            let got: Vec<(Rule, u64, String)> =
                v.into_iter().map(|f| (f.rule, f.op, f.message)).collect();
            (got, o.tally.safety_errors)
        };
        assert_eq!(run(false), (vec![], 1));
        assert_eq!(
            run(true),
            (
                vec![(
                    Rule::I14,
                    1,
                    "read at offset 0 length 512 failed with EIO in the liveness phase".to_string()
                )],
                0
            )
        );
    }

    #[test]
    fn a_forwarded_discard_replaces_the_old_value_with_zeros_and_a_local_one_does_not() {
        let zeros = [0u8; 512];
        // Q46: discard=unmap and every child reads discarded ranges as zeros.
        let mut c = ModelCfg::plain(3, 2);
        c.discard_forwarded = true;
        let mut o = Oracle::new(c);
        acked(&mut o, OpKind::Trim, 0, 512, false);
        assert_eq!(read_now(&mut o, &zeros), []);
        assert_eq!(
            read_now(&mut o, &initial()),
            [(
                Rule::I3,
                Some(0),
                "stale read: got=w0 allowed={zero}".to_string()
            )]
        );
        // D3: otherwise the discard touches no child, and the data stays what it was.
        let mut o = Oracle::new(ModelCfg::plain(3, 2));
        acked(&mut o, OpKind::Trim, 0, 512, false);
        assert_eq!(read_now(&mut o, &initial()), []);
        assert_eq!(
            read_now(&mut o, &zeros),
            [(
                Rule::I1,
                Some(0),
                "foreign read: got=zero allowed={w0}".to_string()
            )]
        );
    }
}
