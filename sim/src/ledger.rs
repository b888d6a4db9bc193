//! The budget ledger's questions (SIMULATION.md §5, B1-B7): which disks hold a value
//! readable (O5), which sectors are excused because their copies break the budget or hide
//! behind a latent error (O7, I6), where the disks differ (I6, I18), what silent damage a
//! verify must find (I19), and one sector's copies for failure reports. Methods of the disks'
//! shared state ([`Inner`]), read under `vdisk`'s lock.

use crate::ids::Fault;
use std::collections::BTreeSet;
use std::ops::Range;

use crate::diskstate::{Inner, Sticky};
use crate::sector::{Stored, Value};

impl Inner {
    /// Sectors some disk holds damage on from a fault other than a crash (F16, F8, F9): the
    /// silent faults only a verify finds (HEALING.md I19 leaves them to I12).
    pub(crate) fn silently_damaged(&self) -> BTreeSet<u64> {
        self.disks
            .iter()
            .flat_map(|d| {
                d.damage
                    .iter()
                    .filter(|(_, f)| !matches!(**f, Fault::F16 | Fault::F8 | Fault::F9))
                    .map(|(s, _)| *s)
                    .chain(d.sticky.keys().copied())
            })
            .collect()
    }

    /// The sectors of `sectors` on which the readable disks differ now.
    pub(crate) fn divergent_among(&self, sectors: &BTreeSet<u64>) -> Vec<u64> {
        let mut out = Vec::new();
        // Runs of consecutive sectors, each checked as a range.
        let mut it = sectors.iter().copied().peekable();
        while let Some(a) = it.next() {
            let mut z = a + 1;
            while it.peek() == Some(&z) {
                it.next();
                z += 1;
            }
            out.extend(self.divergent_sectors_in(a..z, |_, _| false));
        }
        out
    }

    /// How many disks hold exactly `v` at sector `s`, readable and uncorrupted (O5).
    pub(crate) fn holders(&self, s: u64, v: Value) -> usize {
        self.disks
            .iter()
            .filter(|d| {
                s < d.sectors && d.current[s as usize] == Stored::V(v) && !d.sticky.contains_key(&s)
            })
            .count()
    }

    /// Whether disk `index` holds `v` at sector `s`, readable and uncorrupted.
    pub(crate) fn holds(&self, index: usize, s: u64, v: Value) -> bool {
        let d = &self.disks[index];
        s < d.sectors && d.current[s as usize] == Stored::V(v) && !d.sticky.contains_key(&s)
    }

    /// Sectors whose copies currently break B2 (errors there are permitted, O7; I6 excludes
    /// them), and sectors with a sticky latent error (I6 excludes them and lists them).
    pub(crate) fn excused_sectors(&self) -> (Vec<u64>, Vec<u64>) {
        let mut touched: BTreeSet<u64> = BTreeSet::new();
        for d in &self.disks {
            touched.extend(d.marks.keys().copied());
        }
        let over = touched
            .iter()
            .copied()
            .filter(|&s| !self.within_budget(s, None))
            .collect();
        let mut latent: Vec<u64> = self
            .disks
            .iter()
            .flat_map(|d| {
                d.sticky
                    .iter()
                    .filter(|(_, k)| **k == Sticky::Latent)
                    .map(|(s, _)| *s)
            })
            .collect();
        latent.sort_unstable();
        latent.dedup();
        (over, latent)
    }

    /// The excused sectors ([`DiskSet::excused_set`]) within `range`, looking there only.
    pub(crate) fn excused_in(&self, range: Range<u64>) -> BTreeSet<u64> {
        let mut out = BTreeSet::new();
        for d in &self.disks {
            out.extend(
                d.marks
                    .range(range.clone())
                    .filter(|(&s, _)| !self.within_budget(s, None))
                    .map(|(&s, _)| s),
            );
            out.extend(
                d.sticky
                    .range(range.clone())
                    .filter(|(_, k)| **k == Sticky::Latent)
                    .map(|(&s, _)| s),
            );
        }
        out
    }

    /// One line per disk describing sector `s` (failure reports).
    pub(crate) fn describe_sector(&self, s: u64) -> String {
        let mut out = String::new();
        for d in &self.disks {
            let v = match d.current.get(s as usize) {
                Some(Stored::V(Value::Zero)) => "zero".to_string(),
                Some(Stored::V(Value::Data { id, sector })) if *sector == s => format!("w{id}"),
                Some(Stored::V(Value::Data { id, sector })) => format!("w{id}@{sector}"),
                Some(Stored::Raw(_)) => "garbage".to_string(),
                None => "-".to_string(),
            };
            out += &format!(
                " {}={}{}{}",
                d.name,
                v,
                d.sticky
                    .get(&s)
                    .map(|k| format!("[{k:?}]"))
                    .unwrap_or_default(),
                d.marks
                    .get(&s)
                    .map(|k| format!("[{k:?}]"))
                    .unwrap_or_default()
            );
        }
        out
    }

    /// I6: sectors on which the readable disks differ (latent sectors skipped).
    pub(crate) fn divergent_sectors(&self, limit: usize) -> Vec<u64> {
        let sectors = self.disks.iter().map(|d| d.sectors).min().unwrap_or(0);
        let mut v = self.divergent_sectors_in(0..sectors, |_, _| false);
        v.truncate(limit);
        v
    }

    /// Sectors of `range` on which the readable disks differ, ignoring copies `skip` names.
    pub(crate) fn divergent_sectors_in(
        &self,
        range: Range<u64>,
        skip: impl Fn(usize, u64) -> bool,
    ) -> Vec<u64> {
        let sectors = self.disks.iter().map(|d| d.sectors).min().unwrap_or(0);
        let mut out = Vec::new();
        for s in range.start..range.end.min(sectors) {
            let mut first: Option<(&Stored, bool)> = None;
            for (di, d) in self.disks.iter().enumerate() {
                let sticky = d.sticky.get(&s).copied();
                if sticky == Some(Sticky::Latent) || skip(di, s) {
                    continue;
                }
                let this = (&d.current[s as usize], sticky.is_some());
                match first {
                    None => first = Some(this),
                    Some(f) => {
                        if f != this || this.1 {
                            out.push(s);
                            break;
                        }
                    }
                }
            }
        }
        out
    }
}
