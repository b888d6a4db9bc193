//! The quorum read vote as QUORUM.md states it (Q16–Q33, D1, D6): one model that both the
//! simulator's oracle and the fuzz targets' reference (`check/`) judge the driver by. It is
//! written from the rules, not from the driver's code, and is generic over what a child's
//! answer is: the bytes themselves (`check/`) or their digest (the oracle).
//!
//! The caller decides who votes (every child, or the in-sync ones of HEALING.md H1, in the
//! order the quorum read them); the model says what the read must return, which events it
//! must emit, which children the winner is written back to, and how the vote went.
//! Depends on nothing in the simulator.

use ballot::ErrorKind;

/// The options that shape a vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoteRules {
    /// `vote-threshold`.
    pub threshold: usize,
    /// `rewrite-corrupted`: losers (quorum) or children tried before the one that answered
    /// (fifo) get the winner's data.
    pub rewrite: bool,
    /// `blkverify`: any disagreement fails the read and ends the process (D6).
    pub blkverify: bool,
}

/// An event the read must emit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Event {
    /// `QUORUM_REPORT_BAD` for `child`: with `error` when its read failed, without when it
    /// was outvoted.
    Bad {
        /// Child index.
        child: usize,
        /// The child's error, or none for a mismatch.
        error: Option<ErrorKind>,
    },
    /// `QUORUM_FAILURE`.
    Failure,
}

/// How the vote went: what a report counts as its recovery path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    /// Every answering voter agreed (errors from others are possible).
    Agreed,
    /// A version with at least t votes won over others (Q21; P2).
    Outvoted,
    /// Fewer than t voters answered (Q18; P4).
    TooFewAnswers,
    /// The top count is shared by two versions or more (Q23, D1; I5).
    Tie,
    /// The single top version has fewer than t votes (Q24; P4).
    TooFewVotes,
    /// blkverify saw two versions (Q33, D6).
    Mismatch,
    /// fifo: the child at this position of the order answered (Q29; P5 past the first).
    Served(usize),
    /// fifo: every child failed (Q30).
    AllFailed,
}

/// What a read must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<D> {
    /// The data returned, or the error kind.
    pub result: Result<D, ErrorKind>,
    /// Events, in the order the rules give them.
    pub events: Vec<Event>,
    /// Children the winning data is written back to (Q26–Q28, Q32).
    pub rewrites: Vec<usize>,
    /// A blkverify mismatch ends the process (D6).
    pub fatal: bool,
    /// How the vote went.
    pub how: How,
}

impl<D> Verdict<D> {
    fn new(result: Result<D, ErrorKind>, events: Vec<Event>, how: How) -> Verdict<D> {
        Verdict {
            result,
            events,
            rewrites: Vec::new(),
            fatal: false,
            how,
        }
    }
}

/// Q20's error vote: the kind reported by the most children; among kinds with that count,
/// the one whose first report came from the latest child. No error at all: EIO.
pub fn error_vote(errors: &[ErrorKind]) -> ErrorKind {
    let mut best: Option<(usize, usize, ErrorKind)> = None; // (count, first index, kind)
    for (i, k) in errors.iter().enumerate() {
        if errors[..i].contains(k) {
            continue;
        }
        let count = errors.iter().filter(|x| *x == k).count();
        if best.is_none_or(|(c, f, _)| (count, i) > (c, f)) {
            best = Some((count, i, *k));
        }
    }
    best.map_or(ErrorKind::Io, |(_, _, k)| k)
}

/// `read-pattern=fifo` (Q29–Q32): `answers` are the children tried, in order, up to and
/// including the first that answered. Each failure before it is reported with its error;
/// with `rewrite`, those children get the data. When all fail, the last error is returned
/// (EIO when none was tried).
pub fn fifo<D: Clone>(rules: VoteRules, answers: &[(usize, Result<D, ErrorKind>)]) -> Verdict<D> {
    let mut events = Vec::new();
    let mut last = ErrorKind::Io;
    for (k, (child, a)) in answers.iter().enumerate() {
        match a {
            Ok(d) => {
                let mut v = Verdict::new(Ok(d.clone()), events, How::Served(k));
                if rules.rewrite {
                    v.rewrites = answers[..k].iter().map(|(i, _)| *i).collect();
                }
                return v;
            }
            Err(e) => {
                events.push(Event::Bad {
                    child: *child,
                    error: Some(*e),
                });
                last = *e;
            }
        }
    }
    Verdict::new(Err(last), events, How::AllFailed)
}

/// `read-pattern=quorum` (Q16–Q28, Q33): `answers` holds every voter's answer. Failures are
/// reported in the order given; the error vote (Q20) counts them in child order. With fewer
/// than t copies the read fails with the voted error and `QUORUM_FAILURE`; otherwise the
/// copies form versions in the order of their first (lowest) child, and a single top version
/// with at least t votes wins: the others' children are reported without an error (in child
/// order) and, with `rewrite`, get the winner's data. A shared top count or a top below t
/// fails with EIO and `QUORUM_FAILURE` and repairs nothing; blkverify fails any disagreement.
pub fn quorum<D: Clone + PartialEq>(
    rules: VoteRules,
    answers: &[(usize, Result<D, ErrorKind>)],
) -> Verdict<D> {
    let mut events: Vec<Event> = answers
        .iter()
        .filter_map(|(child, a)| {
            a.as_ref().err().map(|e| Event::Bad {
                child: *child,
                error: Some(*e),
            })
        })
        .collect();
    let mut by_child: Vec<&(usize, Result<D, ErrorKind>)> = answers.iter().collect();
    by_child.sort_by_key(|(i, _)| *i);
    let ok: Vec<(usize, &D)> = by_child
        .iter()
        .filter_map(|(i, a)| a.as_ref().ok().map(|d| (*i, d)))
        .collect();
    if ok.len() < rules.threshold {
        let errors: Vec<ErrorKind> = by_child
            .iter()
            .filter_map(|(_, a)| a.as_ref().err().copied())
            .collect();
        events.push(Event::Failure);
        return Verdict::new(Err(error_vote(&errors)), events, How::TooFewAnswers);
    }
    let mut versions: Vec<(&D, Vec<usize>)> = Vec::new();
    for (i, d) in &ok {
        match versions.iter_mut().find(|(v, _)| v == d) {
            Some((_, m)) => m.push(*i),
            None => versions.push((d, vec![*i])),
        }
    }
    if versions.len() == 1 {
        return Verdict::new(Ok(versions[0].0.clone()), events, How::Agreed);
    }
    if rules.blkverify {
        let mut v = Verdict::new(Err(ErrorKind::Io), events, How::Mismatch);
        v.fatal = true;
        return v;
    }
    let top = versions.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
    let leaders: Vec<&(&D, Vec<usize>)> = versions.iter().filter(|(_, m)| m.len() == top).collect();
    if leaders.len() > 1 || top < rules.threshold {
        events.push(Event::Failure);
        let how = if leaders.len() > 1 {
            How::Tie
        } else {
            How::TooFewVotes
        };
        return Verdict::new(Err(ErrorKind::Io), events, how);
    }
    let (data, members) = leaders[0];
    let losers: Vec<usize> = ok
        .iter()
        .map(|(i, _)| *i)
        .filter(|i| !members.contains(i))
        .collect();
    events.extend(
        losers
            .iter()
            .map(|&child| Event::Bad { child, error: None }),
    );
    let mut v = Verdict::new(Ok((*data).clone()), events, How::Outvoted);
    if rules.rewrite {
        v.rewrites = losers;
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorKind::{Io, NoSpc};

    const T2: VoteRules = VoteRules {
        threshold: 2,
        rewrite: true,
        blkverify: false,
    };

    #[test]
    fn q20_error_vote_most_reported_then_latest_first_report() {
        assert_eq!(error_vote(&[Io, NoSpc]), NoSpc);
        assert_eq!(error_vote(&[NoSpc, Io, Io, NoSpc]), Io);
        assert_eq!(error_vote(&[NoSpc, NoSpc, Io]), NoSpc);
        assert_eq!(error_vote(&[]), Io);
    }

    #[test]
    fn q21_a_majority_wins_and_the_loser_is_reported_and_rewritten() {
        let v = quorum(T2, &[(0, Ok(7u64)), (1, Ok(9)), (2, Ok(7))]);
        assert_eq!(v.result, Ok(7));
        assert_eq!(
            v.events,
            [Event::Bad {
                child: 1,
                error: None
            }]
        );
        assert_eq!(
            (v.rewrites, v.how, v.fatal),
            (vec![1], How::Outvoted, false)
        );
    }

    #[test]
    fn q23_a_tie_fails_without_a_mismatch_report_or_repair() {
        let v = quorum(T2, &[(0, Ok(1u64)), (1, Ok(1)), (2, Ok(2)), (3, Ok(2))]);
        assert_eq!(v.result, Err(Io));
        assert_eq!(v.events, [Event::Failure]);
        assert_eq!((v.rewrites.len(), v.how), (0, How::Tie));
    }

    #[test]
    fn q18_too_few_answers_vote_the_error_in_child_order() {
        // Reported in the order read (2 before 0), voted in child order: NoSpc at 0 is
        // first, Io at 2 latest, one each: the latest child's kind.
        let v = quorum(T2, &[(2, Err(Io)), (1, Ok(5u64)), (0, Err(NoSpc))]);
        assert_eq!(v.result, Err(Io));
        assert_eq!(
            v.events,
            [
                Event::Bad {
                    child: 2,
                    error: Some(Io)
                },
                Event::Bad {
                    child: 0,
                    error: Some(NoSpc)
                },
                Event::Failure
            ]
        );
        assert_eq!(v.how, How::TooFewAnswers);
    }

    #[test]
    fn q24_a_single_top_below_threshold_fails() {
        let rules = VoteRules { threshold: 3, ..T2 };
        let v = quorum(rules, &[(0, Ok(1u64)), (1, Ok(1)), (2, Ok(2)), (3, Ok(3))]);
        assert_eq!((v.result, v.how), (Err(Io), How::TooFewVotes));
        assert_eq!(v.events, [Event::Failure]);
    }

    #[test]
    fn d6_blkverify_fails_any_disagreement_and_is_fatal() {
        let rules = VoteRules {
            threshold: 2,
            rewrite: false,
            blkverify: true,
        };
        let v = quorum(rules, &[(0, Ok(1u64)), (1, Ok(2))]);
        assert_eq!((v.result, v.fatal, v.how), (Err(Io), true, How::Mismatch));
        assert!(v.events.is_empty());
    }

    #[test]
    fn q29_fifo_serves_the_first_answer_and_rewrites_those_before() {
        let v = fifo(T2, &[(1, Err(NoSpc)), (0, Ok(4u64))]);
        assert_eq!(v.result, Ok(4));
        assert_eq!(
            v.events,
            [Event::Bad {
                child: 1,
                error: Some(NoSpc)
            }]
        );
        assert_eq!((v.rewrites, v.how), (vec![1], How::Served(1)));
        let v = fifo::<u64>(T2, &[(0, Err(NoSpc)), (1, Err(Io))]);
        assert_eq!((v.result, v.how), (Err(Io), How::AllFailed));
    }
}
