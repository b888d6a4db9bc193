//! The virtual disks' state (SIMULATION.md §3.4, V1-V7): what each disk stores (durable
//! sectors, the current view, pending writes in write order), its sticky faults and budget
//! marks, and the state all disks of a run share ([`Inner`]: fault rates, the budget, the op
//! log, the counters and the run log the disks trace into). The fault decisions on this state
//! are in `vfaults`, crashes in `crash`, the budget ledger's questions in `ledger`, and the
//! devices and their facade in `vdisk`. Depends on no other part of the virtual disk.

use crate::ids::{Fault, Rule};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use crate::oplog::{ChildKind, ChildOp, ChildResult};
use crate::params::{Budget, FaultRates, Latency};
use crate::rng::Rng;
use crate::runlog::RunLog;
use crate::sector::{encode_into, Stored, SECTOR};
use crate::trace::Record;

tokio::task_local! {
    /// The guest op a child request belongs to (0 outside guest ops).
    pub static GUEST_OP: u64;
}

/// The current guest op id, 0 outside one.
pub fn current_op() -> u64 {
    GUEST_OP.try_with(|id| *id).unwrap_or(0)
}

/// A sector fault that persists until the sector is rewritten.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sticky {
    /// F1: every read flips one content-seeded bit.
    Flip,
    /// F3: the write stored the sector corrupted.
    Rot,
    /// F4: reads fail with EIO.
    Latent,
}

/// The budget ledger's state of one copy (B1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Reads of the copy fail.
    Failing,
    /// The copy can answer with a value that is not the newest.
    Wrong,
}

/// A scripted fault armed on one disk (scenario `fault` entries, C3).
#[derive(Debug, Clone)]
pub struct Armed {
    /// Fault family (`F2`, `F3`, `F5`, `F6`, `F7`).
    pub family: Fault,
    /// Sector range the fault is limited to (None: any request).
    pub sectors: Option<Range<u64>>,
    /// Requests it still hits.
    pub count: u64,
    /// F5 `applied`: "none", "all" or "some".
    pub applied: &'static str,
}

#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) first: u64,
    pub(crate) data: Vec<Stored>,
}

pub(crate) struct DiskState {
    pub(crate) name: String,
    pub(crate) sectors: u64,
    pub(crate) durable: Vec<Stored>,
    pub(crate) current: Vec<Stored>,
    pub(crate) pending: Vec<Pending>,
    pub(crate) sticky: BTreeMap<u64, Sticky>,
    pub(crate) marks: BTreeMap<u64, Mark>,
    /// Sectors whose copy a fault left not holding the last write sent to it (stale, lost,
    /// torn, misdirected, reformatted), with that fault's family; a later write to the sector
    /// clears it. Reads that meet one are charged to the family (the report's fault ×
    /// outcome, like the sticky faults). Harness bookkeeping: no decision reads it.
    pub(crate) damage: BTreeMap<u64, Fault>,
    /// F6: the live misdirection (intended sectors, target sectors), at most one (F6).
    pub(crate) misdirect: Option<(Range<u64>, Range<u64>)>,
    pub(crate) armed: Vec<Armed>,
    pub(crate) latency: Latency,
    pub(crate) lat_rng: Rng,
    pub(crate) fault_rng: Rng,
    pub(crate) discard_zeroes: bool,
}

/// Counters the sweep report aggregates.

#[derive(Debug, Clone, Default)]
pub struct Counters {
    /// Faults injected, by family.
    pub injected: BTreeMap<Fault, u64>,
    /// Faults skipped by the budget check (B3), by family.
    pub skipped: BTreeMap<Fault, u64>,
    /// Child requests served.
    pub child_ops: u64,
    /// Every fault as the report charges it to guest ops, in time order.
    pub marks: Vec<FaultMark>,
    /// Child images (`topology.child_image`): checks made (I21, I22) and crashes that
    /// leaked clusters (P21).
    pub image_checks: BTreeMap<Rule, u64>,
    pub image_leaks: u64,
}

/// A fault as the sweep report charges it to guest ops: injected into a child request of guest
/// op `op`, or met again by a later read of that op (sticky sector faults F1, F3, F4, and
/// copies a fault left stale, lost, torn, misdirected or emptied: F5, F6, F8, F9, F14, F18, or
/// written by a write a crash cut off, F16), or a replica down when that op's request was
/// answered (F13 to F17). `op` 0
/// is a fault outside any guest op's request (a crash, a torn or lost write, a replica's disk
/// behind NBD, a harness-injected fault): the report charges it to every guest op in flight at
/// `t_ns`. Harness bookkeeping only: marks never enter the trace or its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultMark {
    /// Virtual nanoseconds since the run started.
    pub t_ns: u64,
    /// The guest op, 0 for none.
    pub op: u64,
    /// Fault family (`F1` ...).
    pub family: Fault,
    /// Virtual ns until which the fault lasts (a stall, a partition, a pause): an unowned
    /// mark is charged to every op in flight at any time in `t_ns..=until_ns`. Equal to
    /// `t_ns` for an instant.
    pub until_ns: u64,
}

pub(crate) struct Inner {
    pub(crate) disks: Vec<DiskState>,
    pub(crate) n: usize,
    pub(crate) t: usize,
    pub(crate) fifo: bool,
    pub(crate) budget: Budget,
    pub(crate) rates: FaultRates,
    pub(crate) injecting: bool,
    /// Sectors one request can span (B4's reach for fifo).
    pub(crate) window_sectors: u64,
    /// Tears fall between sectors only (runs with a metadata node, HEALING.md H22).
    pub(crate) sector_atomic: bool,
    pub(crate) seed: u64,
    pub(crate) oplog: BTreeMap<u64, Vec<ChildOp>>,
    /// Disks that count as failing on every sector (B1: unreachable, paused, crashed, or
    /// with a stale NBD connection that may still deliver old writes).
    pub(crate) down: Vec<bool>,
    pub(crate) counters: Counters,
    /// The run's log, whose trace the disks write.
    pub(crate) log: Arc<RunLog>,
    pub(crate) start: tokio::time::Instant,
    /// The write [`VDisk::apply_write`] last put in a disk's cache (disk, write): what a
    /// child image is sent next.
    pub(crate) landed: Option<(usize, Pending)>,
}

/// Result of a crash's resolution of pending writes (F8, F9), for the trace and counters.
#[derive(Debug, Clone, Default)]
pub struct CrashReport {
    /// Pending writes that survived intact.
    pub intact: u64,
    /// Pending writes lost.
    pub lost: u64,
    /// Pending writes torn.
    pub torn: u64,
}

/// In-flight requests per disk (V4).
pub(crate) const INFLIGHT_PER_DISK_MAX: usize = 16;

/// The bytes of a stored sector.
pub(crate) fn materialize(v: &Stored) -> [u8; SECTOR] {
    let mut out = [0u8; SECTOR];
    match v {
        Stored::V(v) => encode_into(*v, &mut out),
        Stored::Raw(b) => out.copy_from_slice(b),
    }
    out
}

pub(crate) fn flush_disk(d: &mut DiskState) {
    for p in std::mem::take(&mut d.pending) {
        for (k, v) in p.data.into_iter().enumerate() {
            d.durable[(p.first + k as u64) as usize] = v;
        }
    }
}

impl Inner {
    /// Appends a trace record stamped with the current virtual time.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &mut self,
        node: String,
        kind: &'static str,
        op: u64,
        offset: u64,
        len: u64,
        result: i64,
        digest: u64,
        note: String,
    ) {
        let t_ns = self.start.elapsed().as_nanos() as u64;
        self.log.record(Record {
            t_ns,
            node,
            kind,
            op,
            offset,
            len,
            result,
            digest,
            note,
        });
    }

    pub(crate) fn log(&mut self, op: u64, c: ChildOp) {
        self.counters.child_ops += 1;
        let (kind, res, dg) = (
            match c.kind {
                ChildKind::Read => "c-read",
                ChildKind::Write => "c-write",
                ChildKind::Zero => "c-zero",
                ChildKind::Discard => "c-discard",
                ChildKind::Flush => "c-flush",
                ChildKind::Status => "c-status",
            },
            match &c.result {
                ChildResult::Ok(_) => 0,
                ChildResult::Err(k) => *k as i64 + 1,
            },
            match &c.result {
                ChildResult::Ok(d) => *d ^ c.data,
                ChildResult::Err(_) => c.data,
            },
        );
        let node = self.disks[c.disk].name.clone();
        self.record(node, kind, op, c.offset, c.len, res, dg, String::new());
        if op != 0 {
            self.oplog.entry(op).or_default().push(c);
        }
    }
}
