//! The repair fence of `rewrite-corrupted` (README difference D7).
//!
//! A repair write carries data a read voted on. If a guest write to the same range was in
//! flight at any time since that read started, the voted data may already be older than what
//! the children hold, and writing it would resurrect a stale version after the guest write was
//! acknowledged — a lost write (found by ballot-sim, invariant I3). QEMU's quorum has no such
//! guard. The fence tracks, per 64 KiB granule, the last time a guest write started or ended
//! there and how many are in flight; a repair is skipped when either says "since the read
//! started", and a guest write waits for repairs in flight on its range before it starts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::waiter::wait_until;

/// Granule of the fence.
const GRANULE_BYTES: u64 = 64 * 1024;
/// Granule entries kept before idle ones are pruned.
const GRANULES_KEPT_MAX: usize = 4096;

#[derive(Debug, Default)]
struct Granule {
    inflight: u32,
    last_touch: u64,
}

#[derive(Debug, Default)]
struct State {
    epoch: u64,
    granules: BTreeMap<u64, Granule>,
    /// Start epochs of reads in flight (multiset).
    reading: BTreeMap<u64, usize>,
    /// Ranges being repaired now.
    repairing: Vec<(u64, u64, u64)>,
    next_repair: u64,
}

/// The fence of one quorum node.
#[derive(Debug, Default)]
pub struct RepairFence {
    state: Mutex<State>,
    repaired: tokio::sync::Notify,
}

fn granules(offset: u64, len: u64) -> std::ops::Range<u64> {
    offset / GRANULE_BYTES..(offset + len.max(1)).div_ceil(GRANULE_BYTES)
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

impl RepairFence {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a read that may repair; the guard ends it.
    pub fn begin_read(self: &Arc<Self>) -> ReadGuard {
        let mut st = self.lock();
        let epoch = st.epoch;
        *st.reading.entry(epoch).or_default() += 1;
        ReadGuard {
            fence: self.clone(),
            epoch,
        }
    }

    /// Registers a guest write of `[offset, offset + len)`, after repairs in flight on that
    /// range have finished; the guard ends it.
    pub async fn begin_write(self: &Arc<Self>, offset: u64, len: u64) -> WriteGuard {
        wait_until(&self.state, &self.repaired, |st| {
            if st
                .repairing
                .iter()
                .any(|r| overlaps((r.0, r.1), (offset, len)))
            {
                return None;
            }
            st.epoch += 1;
            let epoch = st.epoch;
            for g in granules(offset, len) {
                let e = st.granules.entry(g).or_default();
                e.inflight += 1;
                e.last_touch = epoch;
            }
            Some(())
        })
        .await;
        WriteGuard {
            fence: self.clone(),
            offset,
            len,
        }
    }
}

/// A read in flight.
pub struct ReadGuard {
    fence: Arc<RepairFence>,
    epoch: u64,
}

impl ReadGuard {
    /// Claims `[offset, offset + len)` for a repair, or `None` when a guest write there was in
    /// flight at some time since the read started (the repair must be skipped).
    pub fn claim_repair(&self, offset: u64, len: u64) -> Option<RepairGuard> {
        let mut st = self.fence.lock();
        let stale = granules(offset, len).any(|g| {
            st.granules
                .get(&g)
                .is_some_and(|e| e.inflight > 0 || e.last_touch > self.epoch)
        });
        if stale {
            return None;
        }
        st.next_repair += 1;
        let id = st.next_repair;
        st.repairing.push((offset, len, id));
        Some(RepairGuard {
            fence: self.fence.clone(),
            id,
        })
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        let mut st = self.fence.lock();
        if let Some(n) = st.reading.get_mut(&self.epoch) {
            *n -= 1;
            if *n == 0 {
                st.reading.remove(&self.epoch);
            }
        }
        // Granules no read in flight can be affected by are forgotten.
        let oldest = st.reading.keys().next().copied();
        if oldest.is_none() || st.granules.len() > GRANULES_KEPT_MAX {
            let horizon = oldest.unwrap_or(u64::MAX);
            st.granules
                .retain(|_, g| g.inflight > 0 || (horizon != u64::MAX && g.last_touch > horizon));
        }
    }
}

/// A guest write in flight.
pub struct WriteGuard {
    fence: Arc<RepairFence>,
    offset: u64,
    len: u64,
}

impl Drop for WriteGuard {
    fn drop(&mut self) {
        let mut st = self.fence.lock();
        st.epoch += 1;
        let epoch = st.epoch;
        for g in granules(self.offset, self.len) {
            if let Some(e) = st.granules.get_mut(&g) {
                e.inflight = e.inflight.saturating_sub(1);
                e.last_touch = epoch;
            }
        }
    }
}

/// A repair in flight; writes overlapping it wait.
pub struct RepairGuard {
    fence: Arc<RepairFence>,
    id: u64,
}

impl Drop for RepairGuard {
    fn drop(&mut self) {
        self.fence.lock().repairing.retain(|r| r.2 != self.id);
        self.fence.repaired.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn d7_repair_is_skipped_after_an_overlapping_write_started_or_ended() {
        let f = Arc::new(RepairFence::default());
        let r = f.begin_read();
        assert!(r.claim_repair(0, 4096).is_some());
        let w = f.begin_write(65536, 512).await;
        // In flight on another granule: no effect on [0, 4096).
        assert!(r.claim_repair(0, 4096).is_some());
        assert!(r.claim_repair(65536, 4096).is_none());
        drop(w);
        // Ended after the read started: still skipped.
        assert!(r.claim_repair(65536, 4096).is_none());
        // A read started after the write ended may repair.
        let r2 = f.begin_read();
        assert!(r2.claim_repair(65536, 4096).is_some());
    }

    #[tokio::test]
    async fn d7_a_write_waits_for_an_overlapping_repair() {
        let f = Arc::new(RepairFence::default());
        let r = f.begin_read();
        let repair = r.claim_repair(0, 4096).expect("claim");
        let f2 = f.clone();
        let t = tokio::spawn(async move {
            let _w = f2.begin_write(0, 512).await;
        });
        tokio::task::yield_now().await;
        assert!(!t.is_finished());
        drop(repair);
        t.await.expect("write proceeds after the repair");
        // Idle granules are forgotten once no read is in flight.
        drop(r);
        assert_eq!(f.lock().granules.len(), 0);
    }
}
