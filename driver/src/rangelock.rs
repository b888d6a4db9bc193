//! Shared/exclusive locks over ranges: [`RangeLock`] over cluster indices for the overlay
//! (REPLICATION.md R49), and [`OrderedRangeLock`] over byte ranges, first come first served,
//! for the quorum's request ordering (README difference D8).
//!
//! ## RangeLock
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

/// One request in an [`OrderedRangeLock`]'s queue, held or waiting.
#[derive(Debug, Clone, Copy)]
struct Ticket {
    id: u64,
    first: u64,
    end: u64,
    exclusive: bool,
    granted: bool,
}

impl Ticket {
    fn conflicts(&self, first: u64, end: u64, exclusive: bool) -> bool {
        // An empty range overlaps nothing.
        first < end
            && self.first < self.end
            && self.first < end
            && first < self.end
            && (self.exclusive || exclusive)
    }
}

#[derive(Debug, Default)]
struct Queue {
    /// Held and waiting requests in arrival order.
    tickets: Vec<Ticket>,
    next_id: u64,
}

/// A shared/exclusive lock over byte ranges that grants conflicting requests in the order they
/// arrived: a request waits only for earlier requests that overlap it with at least one of the
/// two exclusive, held or still waiting. Disjoint ranges and shared-with-shared never wait, a
/// stream of shared holders cannot starve an exclusive request, and no two requests wait on
/// each other (each waits only for earlier ones). Dropping the future of a waiting request
/// leaves the queue as if it had never arrived.
#[derive(Debug, Default)]
pub struct OrderedRangeLock {
    queue: Mutex<Queue>,
    released: Notify,
}

/// A request of an [`OrderedRangeLock`], held once [`OrderedRangeLock::lock`] returns it;
/// dropping it releases (or withdraws) the range.
#[derive(Debug)]
pub struct OrderedGuard {
    lock: Arc<OrderedRangeLock>,
    id: u64,
}

impl OrderedRangeLock {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until `[first, end)` can be held in the requested mode after every earlier
    /// conflicting request, then holds it. An empty range is held at once.
    pub async fn lock(self: &Arc<Self>, first: u64, end: u64, exclusive: bool) -> OrderedGuard {
        let (guard, granted) = {
            let mut q = self.queue();
            let id = q.next_id;
            q.next_id += 1;
            let granted = !q.tickets.iter().any(|t| t.conflicts(first, end, exclusive));
            q.tickets.push(Ticket {
                id,
                first,
                end,
                exclusive,
                granted,
            });
            (
                OrderedGuard {
                    lock: self.clone(),
                    id,
                },
                granted,
            )
        };
        if !granted {
            // The guard exists before the wait: a cancelled wait withdraws the ticket.
            wait_until(&self.queue, &self.released, |q| {
                let pos = q.tickets.iter().position(|t| t.id == guard.id)?;
                let blocked = q.tickets[..pos]
                    .iter()
                    .any(|t| t.conflicts(first, end, exclusive));
                (!blocked).then(|| q.tickets[pos].granted = true)
            })
            .await;
        }
        guard
    }

    /// `(held, waiting)` requests now (for tests).
    pub fn counts(&self) -> (usize, usize) {
        let q = self.queue();
        let held = q.tickets.iter().filter(|t| t.granted).count();
        (held, q.tickets.len() - held)
    }
}

impl Drop for OrderedGuard {
    fn drop(&mut self) {
        let waiters = {
            let mut q = self.lock.queue();
            if let Some(i) = q.tickets.iter().position(|t| t.id == self.id) {
                q.tickets.remove(i);
            }
            q.tickets.iter().any(|t| !t.granted)
        };
        if waiters {
            self.lock.released.notify_waiters();
        }
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

    #[tokio::test(start_paused = true)]
    async fn ordered_lock_grants_conflicts_in_arrival_order_and_never_starves_a_writer() {
        let l = Arc::new(OrderedRangeLock::default());
        let r1 = l.lock(0, 100, false).await;
        // A writer overlapping the held read waits...
        let l2 = l.clone();
        let w = tokio::spawn(async move {
            let g = l2.lock(50, 150, true).await;
            (tokio::time::Instant::now(), g)
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(l.counts(), (1, 1));
        // ...and a later read overlapping the waiting writer queues behind it, although it
        // does not conflict with the held read: no starvation by a stream of readers.
        let l3 = l.clone();
        let r2 = tokio::spawn(async move {
            let _g = l3.lock(120, 130, false).await;
            tokio::time::Instant::now()
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        // A read of a range nobody writes is held at once.
        let free = l.lock(150, 200, false).await;
        // Shared with shared: held at once, even over the held read.
        let r3 = l.lock(0, 10, false).await;
        assert_eq!(l.counts(), (3, 2));
        tokio::time::sleep(Duration::from_millis(10)).await;
        let released = tokio::time::Instant::now();
        drop(r1);
        let (w_at, wg) = w.await.unwrap();
        assert_eq!(
            w_at, released,
            "the writer goes when the read it waited for ends"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!r2.is_finished(), "the later read waits for the writer");
        let w_released = tokio::time::Instant::now();
        drop(wg);
        assert_eq!(r2.await.unwrap(), w_released);
        drop((free, r3));
        assert_eq!(l.counts(), (0, 0));
        // An empty range is held at once, even inside an exclusive one.
        let x = l.lock(0, 100, true).await;
        let _e = l.lock(10, 10, true).await;
        drop(x);
    }

    #[tokio::test(start_paused = true)]
    async fn ordered_lock_a_cancelled_wait_withdraws_its_ticket() {
        let l = Arc::new(OrderedRangeLock::default());
        let held = l.lock(0, 10, true).await;
        let l2 = l.clone();
        let waiting = tokio::spawn(async move {
            let _g = l2.lock(0, 10, true).await;
        });
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(l.counts(), (1, 1));
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(l.counts(), (1, 0));
        drop(held);
        // Nothing stale blocks the range.
        let _again = l.lock(0, 10, true).await;
        assert_eq!(l.counts(), (1, 0));
    }
}
