//! The simulator's identifiers as types: fault families (F1–F30, SIMULATION.md §4), rules
//! (the invariants I1–I22, scenario expectations C5 and the harness itself) and recovery
//! paths (P1–P21). Each is parsed once, where it enters (a scenario file, a command-line
//! option, a summary being merged), with an error naming what was wrong; everything inside
//! the simulator matches on the enum, so a typo is a compile error rather than a fault that
//! silently never fires. Each prints as its id (`F13`, `I7`, `P4`), so traces, summaries and
//! reports read as before. The order of each enum is the numeric one (F2 before F10).
//! Depends on nothing.

use std::fmt;
use std::str::FromStr;

/// Declares an id enum: its variants and their ids, `ALL`, `as_str`, `Display` and `FromStr`.
macro_rules! id_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal, { $($(#[$vdoc:meta])* $v:ident = $s:literal,)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $v,)+
        }

        impl $name {
            /// Every value, in numeric order.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            /// The id as scenario files, traces and reports spell it.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$v => $s,)+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownId;

            fn from_str(s: &str) -> Result<Self, UnknownId> {
                match s {
                    $($s => Ok($name::$v),)+
                    _ => Err(UnknownId {
                        what: $what,
                        id: s.to_string(),
                        known: $name::ALL.iter().map(|v| v.as_str()).collect(),
                    }),
                }
            }
        }
    };
}

/// An id that names no fault family, rule or path this simulator knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownId {
    /// "fault family", "rule" or "recovery path".
    pub what: &'static str,
    /// The text that did not parse.
    pub id: String,
    /// Every id it could have been.
    pub known: Vec<&'static str>,
}

impl fmt::Display for UnknownId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Numbered ids as a range, the rest (C5, harness) by name.
        let prefix = &self.known[0][..1];
        let (numbered, extra): (Vec<&str>, Vec<&str>) =
            self.known.iter().partition(|k| k.starts_with(prefix));
        write!(
            f,
            "unknown {} '{}' (known: {}-{}",
            self.what,
            self.id,
            numbered[0],
            numbered[numbered.len() - 1]
        )?;
        for e in extra {
            write!(f, ", {e}")?;
        }
        f.write_str(")")
    }
}

impl std::error::Error for UnknownId {}

id_enum!(
    /// A fault family (SIMULATION.md §4).
    Fault, "fault family", {
        /// Bit flip on read.
        F1 = "F1",
        /// Bit flip on write.
        F2 = "F2",
        /// Bit rot at rest.
        F3 = "F3",
        /// Latent sector error.
        F4 = "F4",
        /// Lost write.
        F5 = "F5",
        /// Misdirected write.
        F6 = "F6",
        /// Torn write inside a request.
        F7 = "F7",
        /// Crash: unflushed writes lost.
        F8 = "F8",
        /// Crash: torn sectors.
        F9 = "F9",
        /// Gray failure (slow child).
        F10 = "F10",
        /// Child fails at open.
        F11 = "F11",
        /// Network latency.
        F12 = "F12",
        /// Partition.
        F13 = "F13",
        /// Replica disk fault behind NBD.
        F14 = "F14",
        /// Swizzle clog.
        F15 = "F15",
        /// Child (replica) crash and restart.
        F16 = "F16",
        /// Replica process pause.
        F17 = "F17",
        /// Replica comes back empty.
        F18 = "F18",
        /// COLO: failure during a checkpoint.
        F19 = "F19",
        /// COLO: failure between checkpoint stages.
        F20 = "F20",
        /// COLO: failover races.
        F21 = "F21",
        /// COLO: the forward fails.
        F22 = "F22",
        /// COLO: split brain.
        F23 = "F23",
        /// COLO: the old primary forwards after failover.
        F24 = "F24",
        /// Resync target cut off, crashed or reformatted mid-copy.
        F25 = "F25",
        /// A voter's copy flips or fails during resync.
        F26 = "F26",
        /// Guest write aimed at the run being copied.
        F27 = "F27",
        /// Power cut of the quorum host.
        F28 = "F28",
        /// Metadata disk faults.
        F29 = "F29",
        /// Hot swap for an empty disk.
        F30 = "F30",
    }
);

id_enum!(
    /// A rule a run is judged by: an invariant (docs/simulator.md), a scenario expectation
    /// (C5), or the harness itself going wrong.
    Rule, "rule", {
        /// No silent corruption.
        I1 = "I1",
        /// Durability after flush.
        I2 = "I2",
        /// No stale read in a majority configuration.
        I3 = "I3",
        /// No lost acked write.
        I4 = "I4",
        /// Tie safety.
        I5 = "I5",
        /// Repair converges.
        I6 = "I6",
        /// Error semantics.
        I7 = "I7",
        /// Event accounting.
        I8 = "I8",
        /// COLO checkpoint consistency.
        I9 = "I9",
        /// COLO failover contents.
        I10 = "I10",
        /// Single writer.
        I11 = "I11",
        /// Resync correctness.
        I12 = "I12",
        /// Determinism.
        I13 = "I13",
        /// Liveness with a healthy core.
        I14 = "I14",
        /// Robustness (no panic, bounded buffers).
        I16 = "I16",
        /// Resync and verify never undo newer data.
        I17 = "I17",
        /// In sync means on the media.
        I18 = "I18",
        /// Power-cut recovery leaves the children equal.
        I19 = "I19",
        /// Out-of-sync children never vote.
        I20 = "I20",
        /// qcow2 crash consistency.
        I21 = "I21",
        /// qcow2 reference counts.
        I22 = "I22",
        /// REPLICATION.md R9, checked by the COLO topology: a secondary's request before
        /// replication starts fails with EIO.
        R9 = "R9",
        /// REPLICATION.md R30: a second failover request during the commit is refused.
        R30 = "R30",
        /// REPLICATION.md R53: after a checkpoint the secondary equals the primary at the
        /// pause point.
        R53 = "R53",
        /// A scenario's expectation (C5).
        C5 = "C5",
        /// The harness itself went wrong (not the code under test).
        Harness = "harness",
    }
);

impl Rule {
    /// The exit code of a run that broke this rule (docs/simulator.md "Exit codes"): liveness
    /// 2, determinism 3, the harness 70, every other rule 1.
    pub const fn exit_code(self) -> i32 {
        match self {
            Rule::I14 => 2,
            Rule::I13 => 3,
            Rule::Harness => 70,
            _ => 1,
        }
    }
}

id_enum!(
    /// A recovery path (docs/simulator.md "Recovery paths").
    Path, "recovery path", {
        /// P1: quorum fast path: all children returned identical data.
        P1 = "P1",
        /// P2: A hash vote with at least one outvoted child.
        P2 = "P2",
        /// P3: `rewrite-corrupted` rewrote an outvoted child.
        P3 = "P3",
        /// P4: A read that missed the threshold: EIO and `QUORUM_FAILURE`.
        P4 = "P4",
        /// P5: A fifo read that moved on to a later child.
        P5 = "P5",
        /// P6: A write that succeeded although some children failed it.
        P6 = "P6",
        /// P7: A write that failed for lack of t successes.
        P7 = "P7",
        /// P8: A flush that failed for lack of t successes.
        P8 = "P8",
        /// P9: an NBD request sent again on a new connection within `reconnect-delay`.
        P9 = "P9",
        /// P10: an NBD request that failed at once because `reconnect-delay` had run out (or was
        /// 0).
        P10 = "P10",
        /// P11: an open that succeeded after `open-timeout` retries.
        P11 = "P11",
        /// P12: events merged by the QMP rate limiter.
        P12 = "P12",
        /// P13: A checkpoint that had overlay data to discard.
        P13 = "P13",
        /// P14: A failover commit that completed.
        P14 = "P14",
        /// P15: writes split between overlay and disk in FAILOVER_FAILED.
        P15 = "P15",
        /// P16: A resync target interrupted by a fault and later in sync everywhere.
        P16 = "P16",
        /// P17: A resync that found a granule already equal and skipped the write.
        P17 = "P17",
        /// P18: A verify that repaired a mismatching granule.
        P18 = "P18",
        /// P19: recovery after a crash driven by the write-intent bitmap.
        P19 = "P19",
        /// P20: A granule reported as unrecoverable.
        P20 = "P20",
        /// P21: A qcow2 image reopened after a crash with leaked clusters.
        P21 = "P21",
        /// Not a recovery path: a read the oracle leaves unjudged because a recovery copied
        /// data it cannot follow (README D19) or copies went stale beyond the budget (B7).
        /// Counted beside the paths, never required by I15.
        OutOfModel = "out-of-model",
        /// Not a recovery path: NBD connections lost (counted beside the paths).
        NbdLosses = "NBD-losses",
        /// Not a recovery path: NBD reconnections.
        NbdReconnects = "NBD-reconnects",
        /// Not a recovery path: TLS handshakes the replicas' servers completed (K11).
        TlsSessions = "TLS-sessions",
    }
);

impl Path {
    /// The recovery paths I15 requires a whole sweep to reach: P1-P21, not the counters
    /// beside them.
    pub const RECOVERY: &'static [Path] = Path::ALL.split_at(21).0;
}

/// A violated rule and what was wrong: the first one ends a run, and its rule gives the
/// run's exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The rule broken.
    pub rule: Rule,
    /// What was wrong, for a person.
    pub message: String,
}

impl Violation {
    /// A violation of `rule`.
    pub fn new(rule: Rule, message: impl Into<String>) -> Violation {
        Violation {
            rule,
            message: message.into(),
        }
    }

    /// The run's exit code ([`Rule::exit_code`]).
    pub fn exit_code(&self) -> i32 {
        self.rule.exit_code()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_sort_numerically() {
        for f in Fault::ALL {
            assert_eq!(f.as_str().parse::<Fault>(), Ok(*f));
        }
        for r in Rule::ALL {
            assert_eq!(r.as_str().parse::<Rule>(), Ok(*r));
        }
        for p in Path::ALL {
            assert_eq!(p.as_str().parse::<Path>(), Ok(*p));
        }
        assert_eq!(
            (Fault::ALL.len(), Rule::ALL.len(), Path::ALL.len()),
            (30, 26, 25)
        );
        assert!(Fault::F2 < Fault::F10 && Path::P9 < Path::P10 && Rule::I14 < Rule::I16);
        assert_eq!(Fault::F13.to_string(), "F13");
    }

    #[test]
    fn unknown_ids_name_the_text_and_the_range() {
        assert_eq!(
            "F31".parse::<Fault>().unwrap_err().to_string(),
            "unknown fault family 'F31' (known: F1-F30)"
        );
        assert_eq!(
            "I15".parse::<Rule>().unwrap_err().to_string(),
            "unknown rule 'I15' (known: I1-I22, R9, R30, R53, C5, harness)"
        );
        assert_eq!(
            "p3".parse::<Path>().unwrap_err().to_string(),
            "unknown recovery path 'p3' (known: P1-P21, out-of-model, NBD-losses, NBD-reconnects, TLS-sessions)"
        );
        assert_eq!(Path::RECOVERY.len(), 21);
        assert!(!Path::RECOVERY.contains(&Path::OutOfModel));
    }

    #[test]
    fn exit_codes_follow_the_rule() {
        // docs/simulator.md "Exit codes": liveness 2, determinism 3, harness 70, the rest 1.
        assert_eq!(Rule::I14.exit_code(), 2);
        assert_eq!(Rule::I13.exit_code(), 3);
        assert_eq!(Rule::Harness.exit_code(), 70);
        for r in [Rule::I1, Rule::I7, Rule::I22, Rule::C5] {
            assert_eq!(Violation::new(r, "x").exit_code(), 1);
        }
    }
}
