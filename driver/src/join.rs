//! Concurrent fan-out without spawning: poll every child's future in child order and report
//! each completion as it happens (QUORUM.md Q17, Q37: a child's event is emitted as soon as
//! that child completes). Polling order is the child order, so a simulated run is repeatable.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::Poll;

/// A boxed, sendable future (what `async_trait` methods return).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Runs `futs` concurrently and returns their outputs in input order. `on_done(i, &out)` is
/// called when future `i` completes, in completion order.
pub async fn join_all_with<'a, T, F>(futs: Vec<BoxFuture<'a, T>>, mut on_done: F) -> Vec<T>
where
    F: FnMut(usize, &T),
{
    let n = futs.len();
    let mut pending: Vec<Option<BoxFuture<'a, T>>> = futs.into_iter().map(Some).collect();
    let mut outs: Vec<Option<T>> = (0..n).map(|_| None).collect();
    let mut left = n;
    poll_fn(|cx| {
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(fut) = slot {
                if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                    on_done(i, &out);
                    outs[i] = Some(out);
                    *slot = None;
                    left -= 1;
                }
            }
        }
        if left == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    outs.into_iter().flatten().collect()
}

/// A bounded set of futures in flight, polled in slot order (so a simulated run repeats);
/// [`Window::next`] yields the output of whichever completes first.
pub struct Window<'a, T> {
    slots: Vec<Option<BoxFuture<'a, T>>>,
}

impl<'a, T> Default for Window<'a, T> {
    fn default() -> Self {
        Window::new()
    }
}

impl<'a, T> Window<'a, T> {
    /// An empty window.
    pub fn new() -> Window<'a, T> {
        Window { slots: Vec::new() }
    }

    /// Futures in flight.
    pub fn len(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Whether nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Adds `fut` in the first free slot.
    pub fn push(&mut self, fut: BoxFuture<'a, T>) {
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some(fut),
            None => self.slots.push(Some(fut)),
        }
    }

    /// The output of the next future to complete (the lowest slot among those ready), or
    /// `None` at once when the window is empty.
    pub async fn next(&mut self) -> Option<T> {
        poll_fn(|cx| {
            if self.is_empty() {
                return Poll::Ready(None);
            }
            for slot in self.slots.iter_mut() {
                if let Some(fut) = slot {
                    if let Poll::Ready(out) = fut.as_mut().poll(cx) {
                        *slot = None;
                        return Poll::Ready(Some(out));
                    }
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn outputs_in_input_order_callbacks_in_completion_order() {
        let delays = [30u64, 10, 20];
        let futs: Vec<BoxFuture<'_, u64>> = delays
            .iter()
            .map(|&d| -> BoxFuture<'_, u64> {
                Box::pin(async move {
                    tokio::time::sleep(Duration::from_millis(d)).await;
                    d
                })
            })
            .collect();
        let mut order = Vec::new();
        let outs = join_all_with(futs, |i, _| order.push(i)).await;
        assert_eq!(outs, vec![30, 10, 20]);
        assert_eq!(order, vec![1, 2, 0]);
    }

    #[tokio::test(start_paused = true)]
    async fn window_yields_in_completion_order_and_refills_free_slots() {
        let mut w: Window<'_, u64> = Window::new();
        assert_eq!(w.next().await, None);
        for d in [30u64, 10, 20] {
            w.push(Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(d)).await;
                d
            }));
        }
        assert_eq!(w.len(), 3);
        assert_eq!(w.next().await, Some(10));
        // The freed slot takes the next future; the others keep running meanwhile.
        w.push(Box::pin(async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            5
        }));
        assert_eq!(w.next().await, Some(5));
        assert_eq!(w.next().await, Some(20));
        assert_eq!(w.next().await, Some(30));
        assert!(w.is_empty());
        assert_eq!(w.next().await, None);
    }
}
