//! Waiting on shared state guarded by a mutex and signalled by a [`Notify`]: the one loop the
//! I/O gate and the range locks need (and the simulator's COLO harness).
//!
//! The notification is armed before the state is checked, so a change made between the check
//! and the wait is never missed.

use std::sync::Mutex;

use tokio::sync::Notify;

/// Calls `ready` on the locked state until it returns a value, waiting for `changed` between
/// tries. Whoever changes the state calls `changed.notify_waiters()` after releasing the lock.
pub async fn wait_until<S, T>(
    state: &Mutex<S>,
    changed: &Notify,
    mut ready: impl FnMut(&mut S) -> Option<T>,
) -> T {
    loop {
        let n = changed.notified();
        tokio::pin!(n);
        n.as_mut().enable();
        if let Some(v) = ready(&mut state.lock().unwrap_or_else(|p| p.into_inner())) {
            return v;
        }
        n.await;
    }
}
