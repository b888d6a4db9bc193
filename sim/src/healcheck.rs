//! The healing invariants checked from more than one place (HEALING.md §7): I18 before a
//! replica or the quorum host crashes and at a job's end, I20 as each write returns. Below
//! the harness (`heal`) and the network faults (`net`), which both call them.

use crate::ids::{Path, Rule};
use ballot::drivers::quorum::{SyncView, OUT_OF_SYNC_GRANULARITY_BYTES as GRANULE};

use crate::sector::SECTOR_U64;
use crate::vdisk::Stored;
use crate::world::World;

pub(crate) fn overlaps(ranges: &[(u64, u64)], a: u64, z: u64) -> bool {
    ranges.iter().any(|&(o, l)| o < z && a < o + l)
}

pub(crate) fn view(w: &World) -> Option<Vec<SyncView>> {
    let q = w.lock().quorum.clone()?;
    q.sync_view()
}

pub(crate) fn bump(w: &World, rule: Rule) {
    w.log.check(rule);
}

pub(crate) fn path(w: &World, p: Path, n: u64) {
    if n > 0 {
        w.log.paths(p, n);
    }
}

/// I18: every granule the record has in sync and flushed on a child holds the quorum's value
/// there, on the media as in the cache, so that a crash of the child right now loses nothing
/// the quorum does not know about (H12, H7). `which`: one child (a replica about to crash), or
/// every child (the quorum host about to crash, a job's end). `when` names the moment.
pub(crate) fn check_durable(w: &World, which: Option<usize>, when: &str) {
    let Some(v) = view(w) else { return };
    let excused = w.excused_set();
    let pending = w.lock().oracle.pending_ranges();
    let sectors = w.p.disk_size / SECTOR_U64;
    bump(w, Rule::I18);
    for (i, c) in v.iter().enumerate() {
        if which.is_some_and(|x| x != i) || i >= w.p.children {
            continue;
        }
        for s in 0..sectors {
            let (a, z) = (s * SECTOR_U64, (s + 1) * SECTOR_U64);
            if overlaps(&c.out_of_sync, a, z)
                || overlaps(&c.unflushed, a, z)
                || overlaps(&pending, a, z)
                || excused.contains(&s)
            {
                continue;
            }
            let (durable, current, marked) = w.disks.sector_state(i, s);
            if marked {
                continue;
            }
            let problem = if durable != current {
                Some("its cache holds data its media does not: a crash loses it")
            } else {
                let ok = match &current {
                    Stored::V(x) => w.lock().oracle.allows_now(s, *x),
                    Stored::Raw(_) => false,
                };
                (!ok && w.p.majority()).then_some("it is not the quorum's value there")
            };
            if let Some(why) = problem {
                w.fail(
                    Rule::I18,
                    format!(
                        "{when}: {} is in sync and flushed on sector {s} by the quorum's record, but {why}; sector {s}:{}",
                        c.node_name,
                        w.disks.describe_sector(s)
                    ),
                );
                return;
            }
        }
    }
}

/// I20 (H4): an acknowledged write is readable from t children: on every sector, at least
/// t children that the record has in sync there (or that the write covered whole, which puts
/// them back in sync at the next flush, H5) hold its data. Checked the instant the quorum
/// returns, before any later write can run (D8). A shortfall that the faults explain (copies
/// the ledger marks, a write O5 no longer guarantees, sectors beyond the budget) is excused.
pub(crate) fn check_write_readable(w: &World, id: u64, offset: u64, len: u64) {
    if !w.p.majority() {
        return;
    }
    let Some(v) = view(w) else { return };
    let t = w.p.threshold;
    bump(w, Rule::I20);
    let end = offset + len;
    for s in offset / SECTOR_U64..end.div_ceil(SECTOR_U64) {
        if !w.disks.excused_in(s..s + 1).is_empty() || !w.lock().oracle.guaranteed(s, id) {
            continue;
        }
        let g0 = (s * SECTOR_U64) / GRANULE * GRANULE;
        let g1 = (g0 + GRANULE).min(w.p.disk_size);
        let covered = offset <= g0 && g1 <= end;
        let want = Stored::V(crate::sector::Value::Data { id, sector: s });
        let (mut candidates, mut holders, mut marked) = (0usize, 0usize, 0usize);
        for (i, c) in v.iter().enumerate().take(w.p.children) {
            if !covered && overlaps(&c.out_of_sync, g0, g1) {
                continue;
            }
            candidates += 1;
            let (_, current, m) = w.disks.sector_state(i, s);
            if current == want {
                holders += 1;
            } else if m {
                marked += 1;
            }
        }
        if candidates < t || holders + marked >= t {
            continue;
        }
        w.fail(
            Rule::I20,
            format!(
                "write op {id} was acknowledged, but only {holders} of the {candidates} children the record can count on sector {s} hold it (threshold {t}, docs/healing.md H4); sector {s}:{}",
                w.disks.describe_sector(s)
            ),
        );
        return;
    }
}
