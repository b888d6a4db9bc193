//! The madsim nodes of the run on this thread, so that the run can end them all (issue 22).

use std::time::Duration;

thread_local! {
    /// The madsim nodes of the run on this thread ([`track_node`]).
    static NODES: std::cell::RefCell<Vec<madsim::task::NodeId>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Forgets the nodes of an earlier run on this thread (a run that panicked).
pub(crate) fn begin() {
    NODES.with(|n| n.borrow_mut().clear());
}

/// Records a node the run created, for [`end_hosts`].
pub fn track_node(id: madsim::task::NodeId) {
    NODES.with(|n| n.borrow_mut().push(id));
}

/// Kills every node of the run and lets the executor drop their tasks. A task parked on
/// one of the world's notifiers or channels holds the world, and the world holds its waker:
/// without this, every run's world (disks, oracle, trace) stayed in memory until the process
/// ended, megabytes a run (issue 22).
pub(crate) async fn end_hosts() {
    let h = madsim::runtime::Handle::current();
    for id in NODES.with(|n| std::mem::take(&mut *n.borrow_mut())) {
        h.kill(id);
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
}
