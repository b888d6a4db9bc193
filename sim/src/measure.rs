//! Per-run measurements for the sweep report (issue 7): the virtual latency of every guest op
//! and the outcome of the ops each fault family touched.
//!
//! Harness bookkeeping only: nothing here enters the trace or its hash (M3), and nothing reads
//! wall time. Latencies are virtual nanoseconds, kept as log-scale histograms: bucket `b` holds
//! latencies in `(2^((b-1)/4), 2^(b/4)]` ns (four buckets per doubling, at most 19 % wide), so
//! histograms of shards and runs merge by adding counts.

use crate::ids::Fault;
use std::collections::{BTreeMap, BTreeSet};

use crate::vdisk::FaultMark;

/// Buckets per doubling of the latency histograms.
pub const BUCKETS_PER_DOUBLING: u32 = 4;

/// Row of the fault-outcome table for guest ops no fault touched.
pub const NO_FAULT: &str = "none";

/// One completed guest op.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpSpan {
    /// Guest op id (the trace's op id; unique within a run).
    pub id: u64,
    /// Virtual ns at which the op was issued.
    pub start_ns: u64,
    /// Virtual ns at which it completed.
    pub end_ns: u64,
    /// Latency class: the op kind (`read`, `write`, ... or `pvm/read`, ...).
    pub kind: String,
    /// Outcome: `<kind>/ok` or `<kind>/<errno name>`, as the oracle's outcome counters.
    pub outcome: String,
}

/// The histogram bucket of a latency of `ns` virtual nanoseconds.
pub fn bucket(ns: u64) -> u32 {
    if ns <= 1 {
        return 0;
    }
    // The smallest b with 2^(b/4) >= ns: 2^(b/4) >= ns iff 2^b >= ns^4, so b is the bit
    // length of ns^4 - 1, exact in u128 for ns <= 2^31. Longer latencies (over 2 s) are first
    // divided by 2^s, rounding up, which moves a latency into the next bucket only within
    // 2^-31 of an edge.
    let bits = 64 - ns.leading_zeros();
    let s = bits.saturating_sub(31);
    let n = ns.div_ceil(1u64 << s) as u128;
    128 - (n.pow(4) - 1).leading_zeros() + BUCKETS_PER_DOUBLING * s
}

/// The upper bound, in nanoseconds, of bucket `b`.
pub fn bucket_upper_ns(b: u32) -> f64 {
    2f64.powf(b as f64 / BUCKETS_PER_DOUBLING as f64)
}

/// Latency histograms by op kind.
pub fn latency_histograms(spans: &[OpSpan]) -> BTreeMap<String, BTreeMap<u32, u64>> {
    let mut out: BTreeMap<String, BTreeMap<u32, u64>> = BTreeMap::new();
    for s in spans {
        let b = bucket(s.end_ns.saturating_sub(s.start_ns));
        *out.entry(s.kind.clone()).or_default().entry(b).or_default() += 1;
    }
    out
}

/// Charges faults to guest ops and counts, per fault family, the outcomes of the ops it
/// touched; ops no fault touched count under [`NO_FAULT`]. A mark with a known op id is charged
/// to that op; a mark with op 0 (or an op that never completed) to every op in flight at its
/// time (`start_ns <= t_ns <= end_ns`), or, for a lasting fault, at any time until its
/// `until_ns`. An op touched by several families counts once in each
/// family's row, and once per family however many faults of it touched the op.
pub fn fault_outcomes(
    spans: &[OpSpan],
    marks: &[FaultMark],
) -> BTreeMap<String, BTreeMap<String, u64>> {
    let index: BTreeMap<u64, usize> = spans.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let mut touched: Vec<BTreeSet<Fault>> = vec![BTreeSet::new(); spans.len()];
    let mut unowned: Vec<&FaultMark> = Vec::new();
    for m in marks {
        match index.get(&m.op) {
            Some(&i) if m.op != 0 => {
                touched[i].insert(m.family);
            }
            _ => unowned.push(m),
        }
    }
    if !unowned.is_empty() {
        unowned.sort_by_key(|m| m.t_ns);
        let mut by_start: Vec<usize> = (0..spans.len()).collect();
        by_start.sort_by_key(|&i| (spans[i].start_ns, i));
        // Sweep in time: ops enter when they start and leave once they have ended.
        let mut next = 0;
        let mut active: BTreeSet<(u64, usize)> = BTreeSet::new();
        for m in unowned {
            while next < by_start.len() && spans[by_start[next]].start_ns <= m.t_ns {
                let i = by_start[next];
                active.insert((spans[i].end_ns, i));
                next += 1;
            }
            while let Some(&(end, i)) = active.first() {
                if end >= m.t_ns {
                    break;
                }
                active.remove(&(end, i));
            }
            for &(_, i) in &active {
                touched[i].insert(m.family);
            }
            // A lasting fault also touches the ops that start while it lasts.
            if m.until_ns > m.t_ns {
                for &i in &by_start[next..] {
                    if spans[i].start_ns > m.until_ns {
                        break;
                    }
                    touched[i].insert(m.family);
                }
            }
        }
    }
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for (s, fams) in spans.iter().zip(&touched) {
        if fams.is_empty() {
            *out.entry(NO_FAULT.into())
                .or_default()
                .entry(s.outcome.clone())
                .or_default() += 1;
        }
        for f in fams {
            *out.entry(f.to_string())
                .or_default()
                .entry(s.outcome.clone())
                .or_default() += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(id: u64, start_ns: u64, end_ns: u64, outcome: &str) -> OpSpan {
        OpSpan {
            id,
            start_ns,
            end_ns,
            kind: outcome.split('/').next().unwrap_or("").into(),
            outcome: outcome.into(),
        }
    }

    fn mark(t_ns: u64, op: u64, family: Fault) -> FaultMark {
        FaultMark {
            t_ns,
            op,
            family,
            until_ns: t_ns,
        }
    }

    #[test]
    fn buckets_are_quarter_doublings_with_exact_powers_on_their_upper_edge() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 0);
        assert_eq!(bucket(2), 4);
        assert_eq!(bucket(3), 7); // 2^(6/4) = 2.83 < 3 <= 2^(7/4) = 3.36
        assert_eq!(bucket(1024), 40);
        assert_eq!(bucket(1025), 41);
        assert_eq!(bucket(1_000_000), 80); // 2^19.75 = 881k < 1M <= 2^20 = 1.05M
        assert_eq!(bucket(u64::MAX), 256);
        assert_eq!(bucket(5_000_000_000), 129); // 2^32.0 < 5e9 <= 2^32.25
                                                // Every edge from 16 ns to 2 s: the largest integer below or at it is in the bucket,
                                                // the next integer in the bucket above.
        for b in 16..124u32 {
            let up = bucket_upper_ns(b);
            let ns = up.floor() as u64;
            assert_eq!(bucket(ns), b, "{ns} ns");
            assert_eq!(bucket(ns + 1), b + 1, "{} ns", ns + 1);
        }
    }

    #[test]
    fn latency_histogram_counts_per_kind() {
        let spans = vec![
            span(1, 0, 1024, "read/ok"),
            span(2, 10, 1034, "read/EIO"),
            span(3, 0, 2, "write/ok"),
        ];
        let h = latency_histograms(&spans);
        assert_eq!(h["read"], BTreeMap::from([(40, 2)]));
        assert_eq!(h["write"], BTreeMap::from([(4, 1)]));
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn owned_marks_charge_their_op_and_unowned_ones_every_op_in_flight() {
        let spans = vec![
            span(1, 0, 100, "read/ok"),
            span(2, 50, 150, "read/EIO"),
            span(3, 120, 200, "write/ok"),
            span(4, 300, 400, "write/ok"),
        ];
        let marks = vec![
            mark(10, 1, Fault::F2),   // op 1 only
            mark(20, 1, Fault::F2),   // same family twice: one count
            mark(100, 0, Fault::F16), // ops 1 (ends at 100) and 2
            mark(130, 9, Fault::F10), // unknown op: in flight at 130 are ops 2 and 3
            mark(250, 0, Fault::F13), // nothing in flight
        ];
        let h = fault_outcomes(&spans, &marks);
        assert_eq!(h["F2"], BTreeMap::from([("read/ok".into(), 1)]));
        assert_eq!(
            h["F16"],
            BTreeMap::from([("read/ok".into(), 1), ("read/EIO".into(), 1)])
        );
        assert_eq!(
            h["F10"],
            BTreeMap::from([("read/EIO".into(), 1), ("write/ok".into(), 1)])
        );
        assert_eq!(h[NO_FAULT], BTreeMap::from([("write/ok".into(), 1)]));
        assert!(!h.contains_key("F13"));
        assert_eq!(h.len(), 4);
    }

    #[test]
    fn a_lasting_fault_charges_the_ops_that_start_while_it_lasts() {
        let spans = vec![
            span(1, 0, 100, "read/ok"),
            span(2, 150, 160, "read/EIO"),
            span(3, 170, 400, "write/ok"),
            span(4, 300, 310, "read/ok"),
        ];
        // A partition from 50 to 200: op 1 is in flight at its start, ops 2 and 3 start during
        // it, op 4 starts after it although op 3, which it overlaps, is touched.
        let marks = vec![FaultMark {
            until_ns: 200,
            ..mark(50, 0, Fault::F13)
        }];
        let h = fault_outcomes(&spans, &marks);
        assert_eq!(
            h["F13"],
            BTreeMap::from([
                ("read/ok".into(), 1),
                ("read/EIO".into(), 1),
                ("write/ok".into(), 1)
            ])
        );
        assert_eq!(h[NO_FAULT], BTreeMap::from([("read/ok".into(), 1)]));
    }
}
