//! A fresh single-threaded runtime per input, with paused time: timeouts fire as soon as
//! everything is idle, so a handshake timeout costs no wall time, and no task outlives its
//! input.

use std::future::Future;

/// Runs `f` to completion on a new current-thread runtime whose clock is paused.
///
/// # Panics
/// When the runtime cannot be built (the process is out of resources).
pub fn block_on<F: Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("building a current-thread runtime");
    rt.block_on(f)
}
