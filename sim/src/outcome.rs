//! What one run is asked for and what it produced: the plain values every topology returns
//! and the sweep, the reports and the command line read. Depends on nothing in the simulator.

use crate::ids::{Fault, Path, Rule, Violation};
use std::collections::BTreeMap;

/// Options of one run.
#[derive(Debug, Clone, Default)]
pub struct RunOpts {
    /// Print every trace record (replay -v).
    pub verbose: bool,
    /// Op-id window for verbose printing.
    pub window: (u64, u64),
    /// Keep every trace record in the result.
    pub capture: bool,
}

/// What one run produced.
#[derive(Debug, Clone, Default)]
pub struct RunResult {
    /// The first violation.
    pub violation: Option<Violation>,
    /// Failure detail: history and trace tail.
    pub detail: String,
    /// Guest ops completed (all phases).
    pub ops: u64,
    /// Child requests.
    pub child_ops: u64,
    /// Virtual seconds.
    pub virtual_s: f64,
    /// Wall seconds.
    pub wall_s: f64,
    /// Trace hash (hex).
    pub trace_hash: String,
    /// Trace records.
    pub records: u64,
    /// Faults injected by family.
    pub injected: BTreeMap<Fault, u64>,
    /// Faults skipped by the budget.
    pub skipped: BTreeMap<Fault, u64>,
    /// Outcomes by kind/result.
    pub outcomes: BTreeMap<String, u64>,
    /// Recovery paths reached.
    pub paths: BTreeMap<Path, u64>,
    /// Invariant checks by rule.
    pub checks: BTreeMap<Rule, u64>,
    /// Errors counted in the safety phase.
    pub safety_errors: u64,
    /// Crashes.
    pub crashes: u64,
    /// Sectors excused from I6/I14 (over budget after crashes, latent errors).
    pub excused: u64,
    /// Every trace record, when captured.
    pub trace_lines: Vec<String>,
    /// Virtual latency histograms of guest ops by kind (`measure::bucket`).
    pub latency: BTreeMap<String, BTreeMap<u32, u64>>,
    /// Outcomes of the guest ops each fault family touched (`measure::fault_outcomes`).
    pub fault_outcomes: BTreeMap<String, BTreeMap<String, u64>>,
}

impl RunResult {
    /// The exit code of SIMULATION.md §10 for this run: 0, or its violation's rule's.
    pub fn exit_code(&self) -> i32 {
        self.violation.as_ref().map_or(0, Violation::exit_code)
    }
}
