//! The healing harness's part of a run's state (HEALING.md §7), kept apart from the harness
//! (`heal`) so that the world can hold it without importing the harness.

use std::collections::BTreeSet;

use crate::rng::Rng;

/// The healing harness's part of a run's state.
pub(crate) struct HealState {
    /// F25: disks whose copy a fault interrupted, until they are found in sync (P16).
    pub(crate) interrupted: BTreeSet<usize>,
    /// Jobs created so far (`JOB_STATUS_CHANGE` to `created`).
    pub(crate) jobs_created: u64,
    /// F25's decision for job number `.0`: runs to let pass before it fires (None: not
    /// this job, or fired).
    pub(crate) f25: (u64, Option<u64>),
    /// F30 under way: the last child is out of the quorum.
    pub(crate) swapping: bool,
    /// F30 has been triggered (once per run).
    pub(crate) swapped: bool,
    /// I17: sectors of the runs being copied that were beyond the budget when their copy
    /// began (the copy's own writes clear the ledger's marks before I17 looks).
    pub(crate) copy_excused: BTreeSet<u64>,
    pub(crate) rng: Rng,
}

impl HealState {
    pub(crate) fn new(seed: u64) -> HealState {
        HealState {
            interrupted: BTreeSet::new(),
            jobs_created: 0,
            f25: (0, None),
            swapping: false,
            swapped: false,
            copy_excused: BTreeSet::new(),
            rng: Rng::stream(seed, "faults/heal"),
        }
    }
}
