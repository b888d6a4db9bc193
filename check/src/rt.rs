//! Single-threaded runtimes with paused time: timeouts fire as soon as everything is idle, so a
//! handshake timeout costs no wall time. A fuzz input gets a fresh one, so no task outlives it.

use std::future::Future;

/// A new current-thread runtime whose clock is paused.
///
/// # Panics
/// When the runtime cannot be built (the process is out of resources).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("building a current-thread runtime")
}

/// Runs `f` to completion on a new [`runtime`].
pub fn block_on<F: Future>(f: F) -> F::Output {
    runtime().block_on(f)
}
