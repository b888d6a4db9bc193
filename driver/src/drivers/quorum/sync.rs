//! The per-child sync record (QUORUM.md Q47, HEALING.md H5–H9, H12): which granules of a
//! child may differ from what the quorum acknowledged (O_c), and which were written since the
//! child's last completed flush.
//!
//! - A failed write marks its granules (H6); a successful one joins the child's *unflushed*
//!   generation, and the granules it covers whole that were out of sync become *pending*: they
//!   leave O_c when a flush that started after the write completes (H5, H12).
//! - A flush takes a ticket that closes the current generation, so a write that completes
//!   during the flush is not covered by it; its success covers every generation up to its own.
//! - When the device's cache epoch changes (an `nbd` child reconnected: the server may have
//!   restarted and lost its volatile cache) or a flush fails, everything unflushed joins O_c
//!   and nothing pending is cleared (H7).

use std::collections::BTreeMap;

/// Q47: the granule, 64 KiB.
pub const GRANULE_BYTES: u64 = 64 * 1024;

/// A set of granule indices: 64-bit words keyed by word index, so a few scattered granules
/// cost a few words and a whole 1 TiB child 256 Ki words.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct GranuleSet {
    words: BTreeMap<u64, u64>,
    count: u64,
}

impl GranuleSet {
    /// Number of granules in the set.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether granule `g` is in the set.
    pub fn contains(&self, g: u64) -> bool {
        self.words
            .get(&(g / 64))
            .is_some_and(|w| w & (1 << (g % 64)) != 0)
    }

    /// Adds granules `[first, end)`.
    pub fn insert_range(&mut self, first: u64, end: u64) {
        let mut g = first;
        while g < end {
            let w = g / 64;
            let lo = g % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let word = self.words.entry(w).or_insert(0);
            self.count += u64::from((mask & !*word).count_ones());
            *word |= mask;
            g = w * 64 + hi;
        }
    }

    /// Removes granules `[first, end)`.
    pub fn remove_range(&mut self, first: u64, end: u64) {
        if self.count == 0 || first >= end {
            return;
        }
        let keys: Vec<u64> = self
            .words
            .range(first / 64..=(end - 1) / 64)
            .map(|(&k, _)| k)
            .collect();
        for w in keys {
            let lo = first.saturating_sub(w * 64).min(64);
            let hi = (end - w * 64).min(64);
            if lo >= hi {
                continue;
            }
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if let Some(word) = self.words.get_mut(&w) {
                self.count -= u64::from((mask & *word).count_ones());
                *word &= !mask;
                if *word == 0 {
                    self.words.remove(&w);
                }
            }
        }
    }

    /// Whether any granule of `[first, end)` is in the set.
    pub fn any_in(&self, first: u64, end: u64) -> bool {
        self.next_from(first).is_some_and(|g| g < end)
    }

    /// The smallest granule `>= g` in the set.
    pub fn next_from(&self, g: u64) -> Option<u64> {
        let w0 = g / 64;
        for (&w, &bits) in self.words.range(w0..) {
            let bits = if w == w0 {
                bits & (u64::MAX << (g % 64))
            } else {
                bits
            };
            if bits != 0 {
                return Some(w * 64 + u64::from(bits.trailing_zeros()));
            }
        }
        None
    }

    /// Number of granules `>= g` in the set.
    pub fn count_from(&self, g: u64) -> u64 {
        let w0 = g / 64;
        self.words
            .range(w0..)
            .map(|(&w, &bits)| {
                let b = if w == w0 {
                    bits & (u64::MAX << (g % 64))
                } else {
                    bits
                };
                u64::from(b.count_ones())
            })
            .sum()
    }

    /// The 64 granules `64 w .. 64 w + 64` as a word (bit k = granule `64 w + k`).
    pub fn word(&self, w: u64) -> u64 {
        self.words.get(&w).copied().unwrap_or(0)
    }

    /// Adds the granules of `bits` to word `w` (bit k = granule `64 w + k`).
    pub fn or_word(&mut self, w: u64, bits: u64) {
        if bits != 0 {
            let word = self.words.entry(w).or_insert(0);
            self.count += u64::from((bits & !*word).count_ones());
            *word |= bits;
        }
    }

    /// Indices of the words that hold a granule of the set, ascending.
    pub fn word_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.keys().copied()
    }

    /// Adds every granule of `other`.
    pub fn union_with(&mut self, other: &GranuleSet) {
        for (&w, &bits) in &other.words {
            let word = self.words.entry(w).or_insert(0);
            self.count += u64::from((bits & !*word).count_ones());
            *word |= bits;
        }
    }

    /// Removes every granule of `other`.
    pub fn subtract(&mut self, other: &GranuleSet) {
        for (&w, &bits) in &other.words {
            if let Some(word) = self.words.get_mut(&w) {
                self.count -= u64::from((bits & *word).count_ones());
                *word &= !bits;
                if *word == 0 {
                    self.words.remove(&w);
                }
            }
        }
    }

    /// Maximal runs `[first, end)` of consecutive granules, ascending.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&w, &bits) in &self.words {
            let mut b = bits;
            while b != 0 {
                let lo = u64::from(b.trailing_zeros());
                let ones = u64::from((!(b >> lo)).trailing_zeros());
                let (s, e) = (w * 64 + lo, w * 64 + lo + ones);
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => out.push((s, e)),
                }
                b = if lo + ones >= 64 {
                    0
                } else {
                    b & !(((1u64 << ones) - 1) << lo)
                };
            }
        }
        out
    }
}

/// Granules `[first, end)` that `[offset, offset + len)` touches.
pub fn touched(offset: u64, len: u64) -> (u64, u64) {
    if len == 0 {
        return (0, 0);
    }
    (
        offset / GRANULE_BYTES,
        offset.saturating_add(len).div_ceil(GRANULE_BYTES),
    )
}

/// Granules `[first, end)` that `[offset, offset + len)` covers whole, on a disk of
/// `disk_len` bytes (the last granule is whole when the range reaches the disk's end).
pub fn covered(offset: u64, len: u64, disk_len: u64) -> (u64, u64) {
    let end = offset.saturating_add(len);
    let first = offset.div_ceil(GRANULE_BYTES);
    let last = if end >= disk_len {
        disk_len.div_ceil(GRANULE_BYTES)
    } else {
        end / GRANULE_BYTES
    };
    if last <= first {
        (0, 0)
    } else {
        (first, last)
    }
}

/// Bytes of granules `[first, end)` on a disk of `disk_len` bytes (the last one clipped).
pub fn granule_bytes(first: u64, end: u64, disk_len: u64) -> u64 {
    (end * GRANULE_BYTES)
        .min(disk_len)
        .saturating_sub(first * GRANULE_BYTES)
}

/// One generation of writes between flush starts.
#[derive(Debug, Default)]
struct Generation {
    /// Granules written (H7).
    written: GranuleSet,
    /// Out-of-sync granules this generation's writes or resync compares made current; they
    /// leave O_c once a flush covers the generation (H5, H12).
    pending: GranuleSet,
}

/// A child's sync record.
#[derive(Debug, Default)]
pub struct ChildSync {
    /// O_c.
    oos: GranuleSet,
    /// The device's cache epoch the generations below belong to.
    epoch: u64,
    current: Generation,
    /// Generations closed by a flush that has not completed, by ticket.
    flushing: BTreeMap<u64, Generation>,
    next_ticket: u64,
    /// Pages of O_c's on-disk bitmap ([`PAGE_GRANULES`] granules each) changed since the
    /// metadata node last took them (HEALING.md H21).
    dirty_pages: std::collections::BTreeSet<u64>,
}

/// Granules in one 4 KiB page of an on-disk out-of-sync bitmap.
pub const PAGE_GRANULES: u64 = 4096 * 8;

/// A flush's ticket: [`ChildSync::flush_started`] gives it, [`ChildSync::flush_done`] takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlushTicket {
    ticket: u64,
    epoch: u64,
}

impl ChildSync {
    /// H21: takes the pages of O_c's bitmap changed since the last call (the metadata node
    /// writes them); [`ChildSync::redirty`] gives them back when that write failed.
    pub fn take_dirty_pages(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dirty_pages).into_iter().collect()
    }

    /// Marks `pages` changed again (a metadata write that failed).
    pub fn redirty(&mut self, pages: &[u64]) {
        self.dirty_pages.extend(pages.iter().copied());
    }

    /// Whether some page of O_c's bitmap changed since the metadata node last took them.
    pub fn has_dirty_pages(&self) -> bool {
        !self.dirty_pages.is_empty()
    }

    /// Page `page` of O_c's on-disk bitmap (4 KiB; bit `i % 8` of byte `i / 8` is granule
    /// `page * PAGE_GRANULES + i`), clipped to `granules`.
    pub fn page_bytes(&self, page: u64) -> Vec<u8> {
        let mut out = vec![0u8; (PAGE_GRANULES / 8) as usize];
        let w0 = page * PAGE_GRANULES / 64;
        for k in 0..PAGE_GRANULES / 64 {
            let w = self.oos.word(w0 + k);
            if w != 0 {
                out[(k * 8) as usize..(k * 8 + 8) as usize].copy_from_slice(&w.to_le_bytes());
            }
        }
        out
    }

    /// Adds the granules set in `bitmap` (an on-disk out-of-sync bitmap, granule 0 first) below
    /// `granules` to O_c: what a metadata node recorded (H19). Returns how many were set.
    pub fn load_out_of_sync(&mut self, bitmap: &[u8], granules: u64) -> u64 {
        let before = self.oos.len();
        for (w, chunk) in bitmap.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let mut bits = u64::from_le_bytes(b);
            let first = w as u64 * 64;
            if first >= granules {
                break;
            }
            if granules - first < 64 {
                bits &= (1u64 << (granules - first)) - 1;
            }
            self.oos.or_word(w as u64, bits);
        }
        self.oos.len() - before
    }

    fn dirty_range(&mut self, first: u64, end: u64) {
        if first < end {
            self.dirty_pages
                .extend(first / PAGE_GRANULES..=(end - 1) / PAGE_GRANULES);
        }
    }

    fn dirty_words(&mut self, set: &GranuleSet) {
        for w in set.word_keys() {
            self.dirty_pages.insert(w * 64 / PAGE_GRANULES);
        }
    }

    /// A record whose device is at `epoch`.
    pub fn new(epoch: u64) -> ChildSync {
        ChildSync {
            epoch,
            ..ChildSync::default()
        }
    }

    /// O_c.
    pub fn out_of_sync(&self) -> &GranuleSet {
        &self.oos
    }

    /// Granules written since the last completed flush (H9's `unflushed-bytes`).
    pub fn unflushed(&self) -> GranuleSet {
        let mut u = self.current.written.clone();
        for g in self.flushing.values() {
            u.union_with(&g.written);
        }
        u
    }

    /// H6, Q49 (and H13, H17): granules `[first, end)` may differ. Nothing pending on them is
    /// cleared by a later flush: the write that made them current is older than this news.
    pub fn mark(&mut self, first: u64, end: u64) {
        self.oos.insert_range(first, end);
        self.dirty_range(first, end);
        self.current.pending.remove_range(first, end);
        for g in self.flushing.values_mut() {
            g.pending.remove_range(first, end);
        }
    }

    /// H7 at open: whatever the device's volatile cache holds from before (a replica that
    /// outlived the previous process) is unflushed until the first completed flush, so a
    /// reconnection before it marks the whole disk out of sync.
    pub fn assume_unflushed(&mut self, granules: u64) {
        self.current.written.insert_range(0, granules);
    }

    /// Forgets H7's open-time assumption (a metadata node knows better, H19).
    pub fn forget_unflushed(&mut self) {
        self.current.written = GranuleSet::default();
    }

    /// H8, H23: every granule of a disk of `granules` granules may differ.
    pub fn mark_all(&mut self, granules: u64) {
        self.mark(0, granules);
    }

    /// H7: the device is at `epoch` now; if that is not the epoch the unflushed writes were
    /// made in, they may be lost and join O_c. Returns whether anything was lost.
    pub fn observe(&mut self, epoch: u64) -> bool {
        // Epochs only grow; a caller that read an older one is late, not news.
        if epoch <= self.epoch {
            return false;
        }
        self.epoch = epoch;
        self.lose_unflushed();
        true
    }

    fn lose_unflushed(&mut self) {
        let current = std::mem::take(&mut self.current);
        let mut lost = current.written;
        for (_, g) in std::mem::take(&mut self.flushing) {
            lost.union_with(&g.written);
        }
        self.oos.union_with(&lost);
        self.dirty_words(&lost);
    }

    /// A write to granules `[first, end)` completed: `ok`, started at device epoch `before`
    /// and ended at `after`. `whole` is the granules the write covered whole (H5).
    pub fn wrote(
        &mut self,
        first: u64,
        end: u64,
        whole: (u64, u64),
        ok: bool,
        before: u64,
        after: u64,
    ) {
        if !ok {
            self.mark(first, end);
            return;
        }
        self.observe(after);
        if before != after {
            // Part of it may have gone to a server that then lost it (H7).
            self.mark(first, end);
            return;
        }
        self.current.written.insert_range(first, end);
        for g in whole.0..whole.1 {
            if self.oos.contains(g) {
                self.current.pending.insert_range(g, g + 1);
            }
        }
    }

    /// H10, H12: the resync found granule `g` equal to the winner, reading it between device
    /// epochs `before` and `after`; it leaves O_c with the next completed flush, as a copy
    /// would.
    pub fn compared_equal(&mut self, g: u64, before: u64, after: u64) {
        self.observe(after);
        if before == after && self.epoch == after && self.oos.contains(g) {
            self.current.pending.insert_range(g, g + 1);
        }
    }

    /// A flush starts at device `epoch`: the current generation closes (H7).
    pub fn flush_started(&mut self, epoch: u64) -> FlushTicket {
        self.observe(epoch);
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        self.flushing
            .insert(ticket, std::mem::take(&mut self.current));
        FlushTicket {
            ticket,
            epoch: self.epoch,
        }
    }

    /// The flush of `t` completed with `ok` at device epoch `epoch`. Success on the same
    /// epoch makes every generation up to the ticket durable and clears its pending granules
    /// from O_c (H5, H12); failure, or a new epoch, loses everything unflushed (H7).
    pub fn flush_done(&mut self, t: FlushTicket, ok: bool, epoch: u64) {
        if !ok || epoch != t.epoch || self.epoch != t.epoch {
            self.epoch = self.epoch.max(epoch);
            self.lose_unflushed();
            return;
        }
        let later = self.flushing.split_off(&(t.ticket + 1));
        let done = std::mem::replace(&mut self.flushing, later);
        for (_, g) in done {
            self.oos.subtract(&g.pending);
            self.dirty_words(&g.pending);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn granule_sets_insert_remove_and_runs() {
        let mut s = GranuleSet::default();
        s.insert_range(3, 70);
        s.insert_range(60, 130);
        assert_eq!(s.len(), 127);
        assert_eq!(s.runs(), vec![(3, 130)]);
        s.remove_range(64, 128);
        assert_eq!(s.runs(), vec![(3, 64), (128, 130)]);
        assert_eq!(s.len(), 63);
        assert!(s.any_in(129, 200));
        assert!(!s.any_in(64, 128));
        assert_eq!(s.next_from(64), Some(128));
        assert_eq!(s.count_from(0), 63);
        assert_eq!(s.count_from(60), 6);
        assert_eq!(s.count_from(129), 1);
        let mut t = GranuleSet::default();
        t.insert_range(0, 10);
        s.subtract(&t);
        assert_eq!(s.runs(), vec![(10, 64), (128, 130)]);
        s.union_with(&t);
        assert_eq!(s.runs(), vec![(0, 64), (128, 130)]);
        assert_eq!(s.len(), 66);
        s.remove_range(0, 1 << 20);
        assert!(s.is_empty());
        assert_eq!(s.runs(), vec![]);
    }

    #[test]
    fn covered_and_touched_granules() {
        let g = GRANULE_BYTES;
        assert_eq!(touched(g - 1, 2), (0, 2));
        assert_eq!(covered(g - 1, 2, 10 * g), (0, 0));
        assert_eq!(covered(0, 2 * g, 10 * g), (0, 2));
        assert_eq!(covered(1, 3 * g, 10 * g), (1, 3));
        // The clipped last granule of a 70,144-byte disk is whole when the write reaches the end.
        assert_eq!(covered(g, 70_144 - g, 70_144), (1, 2));
        assert_eq!(granule_bytes(1, 2, 70_144), 70_144 - g);
    }

    #[test]
    fn h5_a_covering_write_clears_only_after_a_later_flush() {
        let mut c = ChildSync::new(0);
        c.mark(0, 4);
        c.wrote(0, 2, (0, 2), true, 0, 0);
        // A flush that started before the write covers nothing of it.
        assert_eq!(c.out_of_sync().runs(), vec![(0, 4)]);
        let t = c.flush_started(0);
        c.wrote(2, 3, (2, 3), true, 0, 0); // during the flush: not covered by it
        c.flush_done(t, true, 0);
        assert_eq!(c.out_of_sync().runs(), vec![(2, 4)]);
        let t = c.flush_started(0);
        c.flush_done(t, true, 0);
        assert_eq!(c.out_of_sync().runs(), vec![(3, 4)]);
        assert!(c.unflushed().is_empty());
    }

    #[test]
    fn h5_a_partial_write_clears_nothing_and_a_later_failure_cancels_pending() {
        let mut c = ChildSync::new(0);
        c.mark(0, 2);
        c.wrote(0, 1, (0, 0), true, 0, 0);
        c.wrote(1, 2, (1, 2), true, 0, 0);
        c.mark(1, 2); // a later write failed there
        let t = c.flush_started(0);
        c.flush_done(t, true, 0);
        assert_eq!(c.out_of_sync().runs(), vec![(0, 2)]);
    }

    #[test]
    fn h7_a_new_epoch_or_a_failed_flush_loses_the_unflushed_writes() {
        let mut c = ChildSync::new(1);
        c.wrote(5, 6, (5, 6), true, 1, 1);
        let t = c.flush_started(1);
        c.flush_done(t, true, 1);
        c.wrote(7, 9, (7, 9), true, 1, 1);
        assert_eq!(c.unflushed().runs(), vec![(7, 9)]);
        assert!(c.observe(2));
        assert_eq!(c.out_of_sync().runs(), vec![(7, 9)]);
        assert!(c.unflushed().is_empty());
        // A write that straddles a reconnect is marked at once.
        c.wrote(20, 21, (20, 21), true, 2, 3);
        assert_eq!(c.out_of_sync().runs(), vec![(7, 9), (20, 21)]);
        // A flush that fails loses the generation it closed and the current one.
        c.wrote(30, 31, (0, 0), true, 3, 3);
        let t = c.flush_started(3);
        c.wrote(32, 33, (0, 0), true, 3, 3);
        c.flush_done(t, false, 3);
        assert_eq!(
            c.out_of_sync().runs(),
            vec![(7, 9), (20, 21), (30, 31), (32, 33)]
        );
        // A flush answered on a new connection covers nothing.
        c.wrote(40, 41, (40, 41), true, 3, 3);
        let t = c.flush_started(3);
        c.flush_done(t, true, 4);
        assert!(c.out_of_sync().contains(40));
    }

    #[test]
    fn h12_compare_equal_clears_with_the_next_flush_unless_the_epoch_moves() {
        let mut c = ChildSync::new(0);
        c.mark_all(3);
        c.compared_equal(0, 0, 0);
        c.compared_equal(1, 0, 0);
        assert!(c.observe(1)); // reconnect before the flush: both stay out of sync
        assert!(!c.observe(0), "an older epoch is no news");
        c.compared_equal(2, 1, 1);
        c.compared_equal(1, 0, 1); // read on the old connection: proves nothing

        let t = c.flush_started(1);
        c.flush_done(t, true, 1);
        assert_eq!(c.out_of_sync().runs(), vec![(0, 2)]);
    }
}
