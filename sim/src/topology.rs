//! The seam every simulated topology fills (issue 22): the runner builds it from the run's
//! parameters, drives its workload and faults, then judges it. A new topology is a type that
//! implements [`Topology`] in a module of its own, and one line in `runner`.

use crate::outcome::{RunOpts, RunResult};
use crate::params::Params;
use crate::scenario::Scenario;

/// One simulated topology.
#[async_trait::async_trait]
pub(crate) trait Topology: Sized + Send + Sync {
    /// Builds the run: disks, hosts, models, the scripted faults' timers. A run that cannot
    /// start returns its result at once (a harness or image violation).
    async fn build(p: Params, sc: Scenario, opts: RunOpts) -> Result<Self, RunResult>;

    /// Drives the run: the guest workload with the faults, the safety phase, and the
    /// liveness phase when the run has one.
    async fn drive(&self);

    /// Judges the run once driven: what must hold at the end, the scenario's expectations,
    /// and the run's result.
    async fn judge(&self) -> RunResult;
}

/// Builds, drives and judges one run of topology `T`.
pub(crate) async fn run<T: Topology>(p: Params, sc: Scenario, opts: RunOpts) -> RunResult {
    match T::build(p, sc, opts).await {
        Err(r) => r,
        Ok(t) => {
            t.drive().await;
            t.judge().await
        }
    }
}
