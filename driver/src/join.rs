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
}
