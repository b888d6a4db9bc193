//! Crashes of the virtual disks (SIMULATION.md §5: F8, F9, F16): each disk's pending writes
//! survive, are lost, or tear (per 4 KiB page intact, dropped or damaged, within the budget:
//! B2, B6), a disk over a child image takes what its reopened image holds, and the ledger
//! marks the copies a crash left differing from the most common value as wrong (B1).
//! Methods of the disks' shared state ([`Inner`]); `vdisk::DiskSet::crash_disks` calls them.

use crate::ids::{Fault, Rule};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::childimage::{ChildImage, Fail};
use crate::diskstate::{materialize, CrashReport, Inner, Mark, Pending};
use crate::params::Budget;
use crate::rng::{hash_words, Rng};
use crate::sector::{decode, Decoded, Stored, SECTOR};

impl Inner {
    /// The crash of disk `di` (a raw disk): its pending writes resolve in write order (F8
    /// with the rate's chance to survive, F9 with the rate's chance to tear), the durable
    /// layer becomes what survived, and every sector they covered is `touched`. `damaged`
    /// counts the damaged copies per sector over the disks of this crash (B2).
    pub(crate) fn crash_disk(
        &mut self,
        di: usize,
        damaged: &mut BTreeMap<u64, usize>,
        report: &mut CrashReport,
        touched: &mut BTreeSet<u64>,
    ) {
        let pending = std::mem::take(&mut self.disks[di].pending);
        let mut current = self.disks[di].durable.clone();
        let mut damage = std::mem::take(&mut self.disks[di].damage);
        for (wi, p) in pending.iter().enumerate() {
            let mut rng = self.disks[di].fault_rng.fork("crash", wi as u64);
            touched.extend(p.first..p.first + p.data.len() as u64);
            let survives = match self.rates.f8 {
                Some(keep) => rng.chance(keep),
                None => true,
            };
            if !survives {
                report.lost += 1;
                for k in 0..p.data.len() as u64 {
                    damage.insert(p.first + k, Fault::F8);
                }
                continue;
            }
            let tears = self.rates.f9.is_some_and(|p| rng.chance(p));
            if !tears {
                report.intact += 1;
                for (k, v) in p.data.iter().enumerate() {
                    current[(p.first + k as u64) as usize] = v.clone();
                    damage.remove(&(p.first + k as u64));
                }
                continue;
            }
            report.torn += 1;
            let mut torn = Torn {
                di,
                rng: &mut rng,
                current: &mut current,
                damage: &mut damage,
                damaged,
            };
            self.tear(p, &mut torn);
        }
        self.disks[di].durable = current.clone();
        self.disks[di].current = current;
        self.disks[di].damage = damage;
    }

    /// F9 on pending write `p`: per 4 KiB page intact, dropped, or sector by sector written,
    /// dropped or damaged ([`Inner::damage_sector`]).
    fn tear(&self, p: &Pending, t: &mut Torn<'_>) {
        let mut k = 0usize;
        while k < p.data.len() {
            let s0 = p.first + k as u64;
            let page_end = ((s0 / 8 + 1) * 8 - p.first) as usize;
            let page_end = page_end.min(p.data.len());
            let fate = t.rng.below(3);
            for kk in k..page_end {
                let s = p.first + kk as u64;
                let new = &p.data[kk];
                // Written whole below clears it; dropped or damaged keeps F9.
                t.damage.insert(s, Fault::F9);
                match fate {
                    0 => t.write(s, new),
                    1 => {}
                    _ => {
                        let roll = t.rng.below(4);
                        if roll == 0 {
                            t.write(s, new);
                        } else if roll == 3 {
                            // dropped
                        } else if self.sector_atomic {
                            // Whole sectors only: written or dropped.
                            if t.rng.chance(0.5) {
                                t.write(s, new);
                            }
                        } else {
                            self.damage_sector(s, new, t);
                        }
                    }
                }
            }
            k = page_end;
        }
    }

    /// A sector torn inside: old and new bytes split at a word boundary, or garbage unique
    /// to the disk and sector. Damage is a silent fault: within B2 (at most t - 1 damaged
    /// copies, none for fifo), and past it only where a vote can outnumber distinct garbage
    /// (B6); otherwise the sector is dropped instead.
    fn damage_sector(&self, s: u64, new: &Stored, t: &mut Torn<'_>) {
        let n_dmg = t.damaged.get(&s).copied().unwrap_or(0);
        let free = self.budget == Budget::Beyond && !self.fifo && self.t >= 2;
        if !free && (self.fifo || n_dmg + 1 > self.t.saturating_sub(1)) {
            return;
        }
        *t.damaged.entry(s).or_default() += 1;
        let old = materialize(&t.current[s as usize]);
        let newb = materialize(new);
        let mut out = [0u8; SECTOR];
        let split = 8 * t.rng.range(1, 63) as usize;
        let side = t.rng.below(3);
        let garbage = free || t.rng.chance(0.5);
        for (b, o) in out.iter_mut().enumerate() {
            let take_new = match side {
                0 => b < split,
                1 => b >= split,
                _ => true,
            };
            *o = if take_new { newb[b] } else { old[b] };
        }
        if garbage || side == 2 {
            // Garbage unique to this disk and sector.
            let g0 = hash_words(&[self.seed, t.di as u64, s, 0x7042]);
            for (i, w) in out.chunks_mut(8).enumerate() {
                if i % 3 == 0 {
                    let x = hash_words(&[g0, i as u64]);
                    w.copy_from_slice(&x.to_le_bytes());
                }
            }
        }
        // A tear between equal old and new bytes is no tear.
        t.current[s as usize] = match decode(&out) {
            Decoded::Value(v) => Stored::V(v),
            Decoded::Garbage => Stored::Raw(Arc::from(&out[..])),
        };
    }

    /// The ledger after a crash (B1): on each sector it touched, copies that differ from the
    /// most common value become wrong, and the others lose a mark no sticky fault keeps.
    pub(crate) fn remark_after_crash(&mut self, touched: &BTreeSet<u64>) {
        for &s in touched {
            let mut tally: Vec<(Stored, usize)> = Vec::new();
            for d in &self.disks {
                if s >= d.sectors {
                    continue;
                }
                let v = &d.current[s as usize];
                match tally.iter_mut().find(|(x, _)| x == v) {
                    Some((_, c)) => *c += 1,
                    None => tally.push((v.clone(), 1)),
                }
            }
            let top = tally.iter().map(|(_, c)| *c).max().unwrap_or(0);
            let reference = tally
                .iter()
                .find(|(_, c)| *c == top)
                .map(|(v, _)| v.clone());
            for d in &mut self.disks {
                if s >= d.sectors {
                    continue;
                }
                if Some(&d.current[s as usize]) != reference.as_ref() {
                    d.marks.insert(s, Mark::Wrong);
                } else if !d.sticky.contains_key(&s) {
                    d.marks.remove(&s);
                }
            }
        }
    }

    /// Counts a crash's lost (F8) and torn (F9) writes as injected faults.
    pub(crate) fn count_crash(&mut self, report: &CrashReport) {
        if report.lost > 0 {
            *self.counters.injected.entry(Fault::F8).or_default() += report.lost;
            self.mark(Fault::F8);
        }
        if report.torn > 0 {
            *self.counters.injected.entry(Fault::F9).or_default() += report.torn;
            self.mark(Fault::F9);
        }
    }
}

/// What a torn write works on: its disk, its random stream, the disk's new current layer and
/// damage map, and the damaged copies per sector of the crash so far.
struct Torn<'a> {
    di: usize,
    rng: &'a mut Rng,
    current: &'a mut Vec<Stored>,
    damage: &'a mut BTreeMap<u64, Fault>,
    damaged: &'a mut BTreeMap<u64, usize>,
}

impl Torn<'_> {
    /// Sector `s` takes the write's value whole.
    fn write(&mut self, s: u64, new: &Stored) {
        self.current[s as usize] = new.clone();
        self.damage.remove(&s);
    }
}

/// A crash of disk `di`, which is over child image `img`: the image resolves its cache
/// (F8 with `keep`, F9 with `tear`) and the disk takes what the reopened image holds, which
/// must be, per sector, the flushed value or a write sent since (I21). Sectors that changed
/// are `touched` (the ledger) and damaged (F8, for the report); the image's lost and torn
/// writes join `report`.
pub(crate) fn image_crash(
    g: &mut Inner,
    di: usize,
    img: &ChildImage,
    keep: f64,
    tear: f64,
    report: &mut CrashReport,
    touched: &mut BTreeSet<u64>,
) -> std::result::Result<(), Fail> {
    let pending = std::mem::take(&mut g.disks[di].pending);
    for p in &pending {
        touched.extend(p.first..p.first + p.data.len() as u64);
    }
    let d = &mut g.disks[di];
    let c = match img.crash(keep, tear) {
        Ok(c) => c,
        Err(f) => {
            // The image is unusable: keep the model's flushed state so the run can end.
            d.current = d.durable.clone();
            return Err(f);
        }
    };
    report.lost += c.lost;
    report.torn += c.torn;
    for s in 0..d.sectors {
        let got = &c.sectors[s as usize];
        let su = s as usize;
        let allowed = *got == d.durable[su]
            || pending.iter().any(|p| {
                s >= p.first
                    && s < p.first + p.data.len() as u64
                    && p.data[(s - p.first) as usize] == *got
            });
        if !allowed {
            d.current = d.durable.clone();
            return Err((
                Rule::I21,
                format!(
                    "after a crash {}'s image holds {got:?} at sector {s}: neither the flushed {:?} nor a write sent since",
                    d.name, d.durable[su]
                ),
            ));
        }
        if std::env::var("CHILDDBG")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            == Some(s)
        {
            eprintln!(
                "crash {}: sector {s} got {got:?} current {:?} durable {:?} pending {:?}",
                d.name,
                d.current[su],
                d.durable[su],
                pending
                    .iter()
                    .filter(|p| s >= p.first && s < p.first + p.data.len() as u64)
                    .map(|p| p.data[(s - p.first) as usize].clone())
                    .collect::<Vec<_>>()
            );
        }
        if *got != d.current[su] {
            d.damage.insert(s, Fault::F8);
            touched.insert(s);
        }
    }
    d.durable = c.sectors.clone();
    d.current = c.sectors;
    *g.counters.image_checks.entry(Rule::I21).or_default() += 1;
    *g.counters.image_checks.entry(Rule::I22).or_default() += 1;
    g.counters.image_leaks += u64::from(c.leaked);
    Ok(())
}
