//! A shared/exclusive lock over ranges of cluster indices (REPLICATION.md R49).
//!
//! The overlay makes copy-on-write, preserve, a read that falls through to the backing, a commit
//! step and make_empty atomic against each other per cluster. Each takes the clusters it touches
//! here: reads that fall through take them shared (they only exclude the others), the rest take
//! them exclusive. A lock is taken for a whole range at once, so two holders never wait on each
//! other in a cycle within one lock; a holder that also locks another overlay's ranges does so
//! in chain order (active before hidden), which every path follows.

use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::waiter::wait_until;

#[derive(Debug, Default)]
struct Held {
    /// `(id, first, end, exclusive)` of every held range.
    ranges: Vec<(u64, u64, u64, bool)>,
    next_id: u64,
}

/// The lock. Cheap to create; one per overlay.
#[derive(Debug, Default)]
pub struct RangeLock {
    held: Mutex<Held>,
    released: Notify,
}

/// A held range; dropping it releases the range.
#[derive(Debug)]
pub struct RangeGuard {
    lock: Arc<RangeLock>,
    id: u64,
}

impl RangeLock {
    fn state(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `[first, end)` can be held in the requested mode, then holds it.
    pub async fn lock(self: &Arc<Self>, first: u64, end: u64, exclusive: bool) -> RangeGuard {
        let id = wait_until(&self.held, &self.released, |st| {
            let conflict = st
                .ranges
                .iter()
                .any(|&(_, a, b, x)| a < end && first < b && (x || exclusive));
            (!conflict).then(|| {
                let id = st.next_id;
                st.next_id += 1;
                st.ranges.push((id, first, end, exclusive));
                id
            })
        })
        .await;
        RangeGuard {
            lock: self.clone(),
            id,
        }
    }

    /// Ranges held now (for tests and the simulator's caps).
    pub fn held(&self) -> usize {
        self.state().ranges.len()
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        {
            let mut st = self.lock.state();
            if let Some(i) = st.ranges.iter().position(|r| r.0 == self.id) {
                st.ranges.swap_remove(i);
            }
        }
        self.lock.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn shared_ranges_coexist_and_exclusive_ones_wait() {
        let l = Arc::new(RangeLock::default());
        let a = l.lock(0, 4, false).await;
        let b = l.lock(2, 6, false).await;
        assert_eq!(l.held(), 2);
        let l2 = l.clone();
        let t = tokio::spawn(async move {
            let _g = l2.lock(3, 4, true).await;
            tokio::time::Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!t.is_finished());
        drop(a);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            !t.is_finished(),
            "still overlapped by the second shared range"
        );
        let released_at = tokio::time::Instant::now();
        drop(b);
        let got = t.await.unwrap();
        assert_eq!(got, released_at);
        assert_eq!(l.held(), 0);
        // Disjoint exclusive ranges do not wait for each other.
        let _x = l.lock(0, 1, true).await;
        let _y = l.lock(1, 2, true).await;
        assert_eq!(l.held(), 2);
    }
}
