//! The run log (issue 22 item 2): what a run records for its result, kept the same way by
//! every topology: the trace (SIMULATION.md M3), the first violation (a run reports the
//! first rule it broke; later ones are dropped), and the counters a sweep adds up — faults
//! injected, rules checked, recovery paths reached and op outcomes. A topology records into
//! its log as it runs, and [`RunLog::result`] is the common part of its [`RunResult`].
//! Depends only on the trace, the ids and the result types.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use crate::ids::{Fault, Path, Rule, Violation};
use crate::outcome::{RunOpts, RunResult};
use crate::trace::{Record, Trace};

/// How many trace records a failed run's detail shows.
const DETAIL_RECORDS: usize = 40;

/// The counters and the first violation of a run.
#[derive(Debug, Default)]
pub struct Counts {
    /// The first violation.
    pub violation: Option<Violation>,
    /// Faults injected, by family.
    pub injected: BTreeMap<Fault, u64>,
    /// Checks made, by rule.
    pub checks: BTreeMap<Rule, u64>,
    /// Recovery paths reached (and the counters beside them).
    pub paths: BTreeMap<Path, u64>,
    /// Op outcomes, as `who/kind/result`.
    pub outcomes: BTreeMap<String, u64>,
}

/// One run's log.
pub struct RunLog {
    trace: Mutex<Trace>,
    counts: Mutex<Counts>,
}

impl RunLog {
    /// An empty log whose trace prints and keeps records as `opts` asks (replay `-v`,
    /// captured traces).
    pub fn new(opts: &RunOpts) -> RunLog {
        let mut trace = Trace::new(opts.verbose, opts.window);
        if opts.capture {
            trace.keep_all();
        }
        RunLog {
            trace: Mutex::new(trace),
            counts: Mutex::new(Counts::default()),
        }
    }

    /// Appends a trace record.
    pub fn record(&self, r: Record) {
        self.with_trace(|t| t.push(r));
    }

    /// Runs `f` on the trace.
    pub fn with_trace<R>(&self, f: impl FnOnce(&mut Trace) -> R) -> R {
        f(&mut self.trace.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The counters.
    pub fn counts(&self) -> MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a violation of `rule`; only the first counts. Whether this one was the first.
    pub fn fail(&self, rule: Rule, message: String) -> bool {
        let mut c = self.counts();
        if c.violation.is_some() {
            return false;
        }
        c.violation = Some(Violation::new(rule, message));
        true
    }

    /// Whether the run broke a rule.
    pub fn failed(&self) -> bool {
        self.counts().violation.is_some()
    }

    /// Counts an injected fault of `family`.
    pub fn inject(&self, family: Fault) {
        *self.counts().injected.entry(family).or_default() += 1;
    }

    /// Counts a check of `rule`.
    pub fn check(&self, rule: Rule) {
        *self.counts().checks.entry(rule).or_default() += 1;
    }

    /// Counts a recovery path taken.
    pub fn path(&self, p: Path) {
        self.paths(p, 1);
    }

    /// Counts `n` takings of a recovery path (or a counter beside them); the path is listed
    /// even when `n` is 0.
    pub fn paths(&self, p: Path, n: u64) {
        *self.counts().paths.entry(p).or_default() += n;
    }

    /// How often path `p` was counted so far.
    pub fn path_count(&self, p: Path) -> u64 {
        self.counts().paths.get(&p).copied().unwrap_or(0)
    }

    /// Counts an op outcome.
    pub fn outcome(&self, o: String) {
        *self.counts().outcomes.entry(o).or_default() += 1;
    }

    /// The result as far as the log knows it: the first violation (with the trace's last
    /// records as its detail), the counters, the trace hash, its length and, when captured,
    /// its records. The topology adds what only it knows (ops, timings, latencies).
    pub fn result(&self) -> RunResult {
        let c = std::mem::take(&mut *self.counts());
        self.with_trace(|t| {
            let detail = if c.violation.is_some() {
                let tail: Vec<String> = t.tail().map(|r| format!("  {r}")).collect();
                let from = tail.len().saturating_sub(DETAIL_RECORDS);
                format!("trace tail:\n{}\n", tail[from..].join("\n"))
            } else {
                String::new()
            };
            RunResult {
                violation: c.violation,
                detail,
                trace_hash: t.hash_hex(),
                records: t.records(),
                trace_lines: t.take_all(),
                injected: c.injected,
                checks: c.checks,
                paths: c.paths,
                outcomes: c.outcomes,
                ..RunResult::default()
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(op: u64) -> Record {
        Record {
            t_ns: op * 10,
            node: "guest".into(),
            kind: "write",
            op,
            offset: 0,
            len: 512,
            result: 0,
            digest: 0,
            note: String::new(),
        }
    }

    #[test]
    fn the_first_violation_wins_and_later_ones_are_dropped() {
        let log = RunLog::new(&RunOpts::default());
        assert!(!log.failed());
        assert!(log.fail(Rule::I4, "first".into()));
        assert!(!log.fail(Rule::I14, "second".into()));
        let r = log.result();
        let v = r.violation.clone().expect("a violation");
        assert_eq!((v.rule, v.message.as_str()), (Rule::I4, "first"));
        assert_eq!(r.exit_code(), 1);
    }

    #[test]
    fn the_result_carries_counters_trace_and_detail() {
        let log = RunLog::new(&RunOpts {
            capture: true,
            ..RunOpts::default()
        });
        for op in 1..=50 {
            log.record(rec(op));
        }
        log.inject(Fault::F3);
        log.inject(Fault::F3);
        log.check(Rule::I1);
        log.path(Path::P2);
        log.outcome("guest/write/ok".into());
        log.fail(Rule::C5, "expect".into());
        let r = log.result();
        assert_eq!(r.records, 50);
        assert_eq!(r.trace_lines.len(), 50);
        assert_eq!(r.injected.get(&Fault::F3), Some(&2));
        assert_eq!(r.checks.get(&Rule::I1), Some(&1));
        assert_eq!(r.paths.get(&Path::P2), Some(&1));
        assert_eq!(r.outcomes.get("guest/write/ok"), Some(&1));
        // The detail shows the last 40 records: ops 11 to 50.
        let lines: Vec<&str> = r.detail.lines().collect();
        assert_eq!(lines.len(), 41);
        assert_eq!(lines[0], "trace tail:");
        assert!(lines[1].contains("op=11 "), "{}", lines[1]);
        assert!(lines[40].contains("op=50 "), "{}", lines[40]);
    }

    #[test]
    fn equal_records_give_equal_hashes_and_a_different_one_does_not() {
        let (a, b, c) = (
            RunLog::new(&RunOpts::default()),
            RunLog::new(&RunOpts::default()),
            RunLog::new(&RunOpts::default()),
        );
        for op in 1..=3 {
            a.record(rec(op));
            b.record(rec(op));
            c.record(rec(if op == 3 { 4 } else { op }));
        }
        let (ra, rb, rc) = (a.result(), b.result(), c.result());
        assert_eq!(ra.trace_hash, rb.trace_hash);
        assert_ne!(ra.trace_hash, rc.trace_hash);
        assert_eq!(ra.detail, "");
    }
}
