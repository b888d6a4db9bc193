//! Fault injection on the virtual disks (SIMULATION.md §4, §5): whether a fault may strike
//! (the budget, B2-B4, and fifo's window), the random and scripted faults of a request (F1-F7:
//! bit flips, rot, latent errors, misdirected writes, lost and torn writes), and how a read
//! meets the sticky faults of the sectors it covers (V5). Methods of the disks' shared state
//! ([`Inner`]); `vdisk` calls them under its lock.

use crate::ids::Fault;
use std::collections::BTreeSet;
use std::ops::Range;

use bytes::BytesMut;

use crate::diskstate::{current_op, Armed, FaultMark, Inner, Mark, Sticky};
use crate::params::Budget;
use crate::rng::hash_words;
use crate::sector::{encode_into, fingerprint, fingerprint_bytes, Stored, SECTOR, SECTOR_U64};

impl Inner {
    /// B2 (or B4 for fifo) for sector `s`, with disk `over.0`'s copy taken as `over.1`
    /// (`None`: as it is).
    pub(crate) fn within_budget(&self, s: u64, over: Option<(usize, Option<Mark>)>) -> bool {
        let mark_of = |i: usize| -> Option<Mark> {
            match over {
                Some((j, m)) if j == i => m,
                _ if self.down[i] => Some(Mark::Failing),
                _ => self.disks[i].marks.get(&s).copied(),
            }
        };
        let (mut failing, mut wrong) = (0usize, 0usize);
        for i in 0..self.n {
            match mark_of(i) {
                Some(Mark::Failing) => failing += 1,
                Some(Mark::Wrong) => wrong += 1,
                None => {}
            }
        }
        if failing + wrong > self.n - self.t {
            return false;
        }
        if self.fifo {
            // B4: the first child that can read the sector must hold the right value.
            return match (0..self.n).find(|&i| mark_of(i) != Some(Mark::Failing)) {
                Some(i) => mark_of(i).is_none(),
                None => true,
            };
        }
        wrong < self.t
    }

    /// B4 at request granularity: a fifo read fails on a child when any sector of the request
    /// is unreadable there, so for every stale copy near `range` (within one request of it),
    /// the children before it must hold the right value up to the first child with no
    /// unreadable sector within a request's reach.
    pub(crate) fn fifo_window_ok(&self, range: Range<u64>) -> bool {
        let w = self.window_sectors;
        let lo = range.start.saturating_sub(w);
        let hi = range.end.saturating_add(w);
        let mut stale: Vec<u64> = Vec::new();
        for d in &self.disks {
            stale.extend(
                d.marks
                    .range(lo..hi)
                    .filter(|(_, m)| **m == Mark::Wrong)
                    .map(|(s, _)| *s),
            );
        }
        stale.sort_unstable();
        stale.dedup();
        stale.iter().all(|&s| {
            for d in &self.disks {
                if d.marks.get(&s) == Some(&Mark::Wrong) {
                    return false;
                }
                let reach = s.saturating_sub(w)..s.saturating_add(w + 1);
                if !d.marks.range(reach).any(|(_, m)| *m == Mark::Failing) {
                    return true;
                }
            }
            true
        })
    }

    /// Inserts `mark` on `sectors` of `disk` if fifo's request-level B4 still holds after it;
    /// otherwise leaves the marks as they were. Returns whether it did.
    pub(crate) fn fifo_try_mark(&mut self, disk: usize, sectors: Range<u64>, mark: Mark) -> bool {
        let saved: Vec<(u64, Option<Mark>)> = sectors
            .clone()
            .map(|s| (s, self.disks[disk].marks.insert(s, mark)))
            .collect();
        let ok = self.fifo_window_ok(sectors);
        if !ok {
            for (s, m) in saved {
                match m {
                    Some(m) => self.disks[disk].marks.insert(s, m),
                    None => self.disks[disk].marks.remove(&s),
                };
            }
        }
        ok
    }

    /// B3: may disk `disk` take `mark` on every sector of `sectors`? Counts a skip if not.
    pub(crate) fn allow(
        &mut self,
        family: Fault,
        disk: usize,
        sectors: Range<u64>,
        mark: Mark,
    ) -> bool {
        let silent = matches!(
            family,
            Fault::F1 | Fault::F2 | Fault::F3 | Fault::F6 | Fault::F7
        );
        self.allow_kind(family, silent, disk, sectors, mark)
    }

    /// [`Inner::allow`] for a family whose faults are `silent` (wrong data, no error) or not.
    pub(crate) fn allow_kind(
        &mut self,
        family: Fault,
        silent: bool,
        disk: usize,
        sectors: Range<u64>,
        mark: Mark,
    ) -> bool {
        // B6 lets silent faults past B2 only where a vote can outnumber distinct wrong values:
        // the quorum pattern with t >= 2. With t = 1 or fifo a lone wrong copy is served.
        let free = self.budget == Budget::Beyond && (!silent || (!self.fifo && self.t >= 2));
        let ok = if self.fifo && silent && !free {
            false
        } else if free && family != Fault::F5 {
            // B6: beyond budget, faults that fail or produce distinct wrong values are free;
            // stale copies (F5) stay within B2 (B7). fifo reads the first child that answers,
            // so a copy that starts failing must not leave a stale copy behind it to be served
            // (B4 still holds; the B2 count does not): B7's exposure, for a read with no vote.
            !self.fifo || self.fifo_try_mark(disk, sectors.clone(), mark)
        } else {
            sectors
                .clone()
                .all(|s| self.within_budget(s, Some((disk, Some(mark)))))
                && (!self.fifo || self.fifo_try_mark(disk, sectors.clone(), mark))
        };
        if !ok {
            *self.counters.skipped.entry(family).or_default() += 1;
        }
        ok
    }

    /// Notes fault `family` against the current guest op (0 outside one).
    pub(crate) fn mark(&mut self, family: Fault) {
        self.mark_lasting(family, 0);
    }

    /// [`Inner::mark`] for a fault that lasts `ns` from now; returns the mark's index.
    pub(crate) fn mark_lasting(&mut self, family: Fault, ns: u64) -> usize {
        let t_ns = self.start.elapsed().as_nanos() as u64;
        self.counters.marks.push(FaultMark {
            t_ns,
            op: current_op(),
            family,
            until_ns: t_ns.saturating_add(ns),
        });
        self.counters.marks.len() - 1
    }

    pub(crate) fn injected(&mut self, disk: usize, family: Fault, sectors: Range<u64>) {
        *self.counters.injected.entry(family).or_default() += 1;
        self.mark(family);
        let node = self.disks[disk].name.clone();
        self.record(
            node,
            "fault",
            current_op(),
            sectors.start * SECTOR_U64,
            (sectors.end - sectors.start) * SECTOR_U64,
            0,
            0,
            family.to_string(),
        );
    }

    pub(crate) fn take_armed(
        &mut self,
        disk: usize,
        family: Fault,
        sectors: &Range<u64>,
    ) -> Option<Armed> {
        let d = &mut self.disks[disk];
        let pos = d.armed.iter().position(|a| {
            a.family == family
                && a.count > 0
                && a.sectors
                    .as_ref()
                    .is_none_or(|r| r.start < sectors.end && sectors.start < r.end)
        })?;
        d.armed[pos].count -= 1;
        let a = d.armed[pos].clone();
        if d.armed[pos].count == 0 {
            d.armed.remove(pos);
        }
        Some(a)
    }

    /// Draws whether random family `family` fires now on disk `disk`.
    pub(crate) fn draw(&mut self, disk: usize, rate: Option<f64>) -> bool {
        if !self.injecting {
            return false;
        }
        match rate {
            Some(p) => self.disks[disk].fault_rng.chance(p),
            None => false,
        }
    }

    pub(crate) fn pick_sector(&mut self, disk: usize, r: &Range<u64>) -> u64 {
        r.start + self.disks[disk].fault_rng.below(r.end - r.start)
    }
}

impl Inner {
    /// F6 on a write of `range`: where the whole write lands instead (its own first sector
    /// when it does not), marking the range it left stale.
    pub(crate) fn draw_misdirect(&mut self, i: usize, range: &Range<u64>) -> u64 {
        let (first, n) = (range.start, range.end - range.start);
        let armed6 = self.take_armed(i, Fault::F6, range);
        let rate6 = self.rates.f6;
        let fire6 = armed6.is_some() || self.draw(i, rate6);
        let mut target = first;
        if fire6 && self.disks[i].misdirect.is_none() {
            let sectors = self.disks[i].sectors;
            if sectors >= 2 * n + 8 {
                let pages = (sectors - n) / 8;
                let mut cand = self.disks[i].fault_rng.below(pages + 1) * 8;
                if cand < first + n && first < cand + n {
                    cand = if first + n + n <= sectors {
                        (first + n).div_ceil(8) * 8
                    } else {
                        0
                    };
                }
                let cand_range = cand..cand + n;
                let disjoint = cand + n <= first || first + n <= cand;
                if disjoint
                    && cand + n <= sectors
                    && (armed6.is_some()
                        || (self.allow(Fault::F6, i, range.clone(), Mark::Wrong)
                            && self.allow(Fault::F6, i, cand_range.clone(), Mark::Wrong)))
                {
                    self.injected(i, Fault::F6, range.clone());
                    target = cand;
                    let d = &mut self.disks[i];
                    d.misdirect = Some((range.clone(), cand_range.clone()));
                    for s in range.clone() {
                        d.marks.insert(s, Mark::Wrong);
                        d.damage.insert(s, Fault::F6);
                    }
                }
            }
        }
        target
    }

    /// F4 and F1 on a read: a sector of the range becomes unreadable, or starts returning a
    /// flipped bit, until rewritten.
    pub(crate) fn draw_sticky_read_faults(&mut self, i: usize, range: &Range<u64>) {
        // F4: a sector becomes unreadable until rewritten.
        let rate4 = self.rates.f4;
        if self.draw(i, rate4) {
            let s = self.pick_sector(i, range);
            if self.allow(Fault::F4, i, s..s + 1, Mark::Failing) {
                self.injected(i, Fault::F4, s..s + 1);
                self.disks[i].sticky.insert(s, Sticky::Latent);
                self.disks[i].marks.insert(s, Mark::Failing);
            }
        }
        // F1: a sector starts returning a flipped bit until rewritten.
        let rate1 = self.rates.f1;
        if self.draw(i, rate1) {
            let s = self.pick_sector(i, range);
            if !self.disks[i].sticky.contains_key(&s)
                && self.allow(Fault::F1, i, s..s + 1, Mark::Wrong)
            {
                self.injected(i, Fault::F1, s..s + 1);
                self.disks[i].sticky.insert(s, Sticky::Flip);
                self.disks[i].marks.insert(s, Mark::Wrong);
            }
        }
    }

    /// F7 and F2 on a read: the sector it reads from instead (once), and the sector that
    /// comes back with one transient flipped bit.
    pub(crate) fn draw_read_faults(&mut self, i: usize, range: &Range<u64>) -> (u64, Option<u64>) {
        // F7: the read returns another aligned offset's bytes, once.
        let mut source = range.start;
        let armed7 = self.take_armed(i, Fault::F7, range);
        let rate7 = self.rates.f7;
        let n = range.end - range.start;
        if armed7.is_some() || self.draw(i, rate7) {
            let sectors = self.disks[i].sectors;
            if sectors >= n + 8 {
                let cand = self.disks[i].fault_rng.below((sectors - n) / 8 + 1) * 8;
                if cand != range.start
                    && (armed7.is_some() || self.allow(Fault::F7, i, range.clone(), Mark::Wrong))
                {
                    self.injected(i, Fault::F7, range.clone());
                    source = cand;
                }
            }
        }
        // F2: one transient flipped bit in this read.
        let armed2 = self.take_armed(i, Fault::F2, range);
        let rate2 = self.rates.f2;
        let mut transient = None;
        if armed2.is_some() || self.draw(i, rate2) {
            let s = match &armed2 {
                Some(Armed {
                    sectors: Some(r), ..
                }) => r.start.max(range.start),
                _ => self.pick_sector(i, range),
            };
            if armed2.is_some() || self.allow(Fault::F2, i, s..s + 1, Mark::Wrong) {
                self.injected(i, Fault::F2, s..s + 1);
                transient = Some(s);
            }
        }
        (source, transient)
    }

    /// The bytes a read of `range` returns from `source` on, with the transient flip, the
    /// faults it met again and its sectors' fingerprints.
    pub(crate) fn fill_read(
        &self,
        i: usize,
        range: &Range<u64>,
        source: u64,
        transient: Option<u64>,
        len: usize,
    ) -> (BytesMut, BTreeSet<Fault>, Vec<u64>) {
        let seed = self.seed;
        let d = &self.disks[i];
        let mut buf = BytesMut::zeroed(len);
        // Faults met again by this read, charged to it (their injection was charged to an
        // earlier op): sticky flips and rot, and copies a fault damaged (`damage`).
        let mut met: BTreeSet<Fault> = BTreeSet::new();
        // The read's digest from the sectors' fingerprints: a clean value's comes from the
        // value, so only damaged sectors are hashed (sector::data_digest's contract).
        let mut fps = Vec::with_capacity(buf.len() / SECTOR);
        // Most reads meet no damage and no sticky fault: look those maps up per sector
        // only when the read's range has an entry at all.
        let src_range = source..source + (buf.len() / SECTOR) as u64;
        let any_damage = d.damage.range(src_range.clone()).next().is_some();
        let any_sticky = d.sticky.range(src_range).next().is_some();
        for (k, chunk) in buf.chunks_mut(SECTOR).enumerate() {
            let src = source + k as u64;
            let s = range.start + k as u64;
            if let Some(f) = any_damage.then(|| d.damage.get(&src)).flatten() {
                met.insert(*f);
            }
            let pristine = match &d.current[src as usize] {
                Stored::V(v) => {
                    encode_into(*v, chunk);
                    fingerprint(*v)
                }
                Stored::Raw(b) => {
                    chunk.copy_from_slice(b);
                    fingerprint_bytes(b)
                }
            };
            let corrupt = match any_sticky.then(|| d.sticky.get(&src)).flatten() {
                Some(Sticky::Flip) => Some(Fault::F1),
                Some(Sticky::Rot) => Some(Fault::F3),
                _ => None,
            };
            let mut fp = pristine;
            if let Some(f) = corrupt {
                met.insert(f);
                flip_bit(seed, i, src, chunk, pristine, 1);
                fp = fingerprint_bytes(chunk);
            }
            if transient == Some(s) {
                flip_bit(seed, i, s, chunk, fp, 2);
                fp = fingerprint_bytes(chunk);
            }
            fps.push(fp);
        }
        (buf, met, fps)
    }

    pub(crate) fn allow_one(&mut self, family: Fault, disk: usize, s: u64, mark: Mark) -> bool {
        let silent = matches!(
            family,
            Fault::F1 | Fault::F2 | Fault::F3 | Fault::F6 | Fault::F7
        );
        if self.budget == Budget::Beyond
            && family != Fault::F5
            && (!silent || (!self.fifo && self.t >= 2))
        {
            return true;
        }
        self.within_budget(s, Some((disk, Some(mark))))
            && (!self.fifo || self.fifo_try_mark(disk, s..s + 1, mark))
    }
}

/// V5: flips one bit of sector `s`'s bytes `buf`, at a position that is a hash of seed, disk,
/// sector, the pristine bytes (`pristine`, their fingerprint) and `salt`.
fn flip_bit(seed: u64, disk: usize, s: u64, buf: &mut [u8], pristine: u64, salt: u64) {
    let bit = hash_words(&[seed, disk as u64, s, pristine, salt]) % (SECTOR as u64 * 8);
    buf[(bit / 8) as usize] ^= 1 << (bit % 8);
}
