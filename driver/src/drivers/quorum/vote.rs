//! The vote (QUORUM.md Q20–Q24): which copy wins among the children's answers. Used by guest
//! reads, the resync job (HEALING.md H10–H11) and the verify job (H17), so all three agree on
//! what "the quorum's data" is.

use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind};

/// The result of voting over successful copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// One version has the most votes and at least t: its members (child indices, in the
    /// order given) and the children whose copy differs.
    Winner {
        /// Children holding the winning version.
        members: Vec<usize>,
        /// Children holding another version, ascending as given.
        losers: Vec<usize>,
    },
    /// Two or more versions share the most votes (Q23, D1).
    Tie,
    /// The leading version has fewer than t votes (Q24).
    BelowThreshold,
}

/// Votes over `copies` (child index, data), all of one length, in child order, with threshold
/// `t`. Q21's fast path first: when every copy equals the first, no hash is computed.
pub fn vote(copies: &[(usize, &[u8])], t: usize) -> Outcome {
    let Some((_, first)) = copies.first() else {
        return Outcome::BelowThreshold;
    };
    if copies[1..].iter().all(|(_, b)| b == first) {
        return if copies.len() >= t {
            Outcome::Winner {
                members: copies.iter().map(|(i, _)| *i).collect(),
                losers: Vec::new(),
            }
        } else {
            Outcome::BelowThreshold
        };
    }
    // Q22: versions by SHA-256, in order of their first member.
    let mut versions: Vec<([u8; 32], Vec<usize>)> = Vec::new();
    for (i, b) in copies {
        let digest: [u8; 32] = Sha256::digest(b).into();
        match versions.iter_mut().find(|(d, _)| *d == digest) {
            Some((_, members)) => members.push(*i),
            None => versions.push((digest, vec![*i])),
        }
    }
    let top = versions.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
    assert!(top <= copies.len(), "vote count exceeds copies");
    let mut leaders = versions.iter().filter(|(_, m)| m.len() == top);
    let (Some((_, winner)), None) = (leaders.next(), leaders.next()) else {
        return Outcome::Tie;
    };
    if top < t {
        return Outcome::BelowThreshold;
    }
    Outcome::Winner {
        members: winner.clone(),
        losers: copies
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| !winner.contains(i))
            .collect(),
    }
}

/// Q20: the kind reported by the most failed children; among kinds sharing the top count, the
/// one whose first occurrence in child order comes latest (QEMU's rule).
pub fn error_vote<'e>(errors: impl Iterator<Item = &'e Error>) -> ErrorKind {
    // (kind, count), in order of first occurrence.
    let mut tally: Vec<(ErrorKind, usize)> = Vec::new();
    for e in errors {
        match tally.iter_mut().find(|(k, _)| *k == e.kind()) {
            Some((_, n)) => *n += 1,
            None => tally.push((e.kind(), 1)),
        }
    }
    let top = tally.iter().map(|(_, n)| *n).max().unwrap_or(0);
    tally
        .iter()
        .rev()
        .find(|(_, n)| *n == top)
        .map(|(k, _)| *k)
        .unwrap_or(ErrorKind::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(kind: ErrorKind) -> Error {
        Error::new(kind, "")
    }

    #[test]
    fn q20_error_vote_takes_most_common_then_latest_first_occurrence() {
        let v = [e(ErrorKind::Io), e(ErrorKind::NoSpc)];
        assert_eq!(error_vote(v.iter()), ErrorKind::NoSpc);
        let v = [e(ErrorKind::Io), e(ErrorKind::NoSpc), e(ErrorKind::Io)];
        assert_eq!(error_vote(v.iter()), ErrorKind::Io);
        let v = [
            e(ErrorKind::NoSpc),
            e(ErrorKind::Io),
            e(ErrorKind::Io),
            e(ErrorKind::NoSpc),
        ];
        assert_eq!(error_vote(v.iter()), ErrorKind::Io);
    }

    #[test]
    fn q21_q24_vote_outcomes() {
        let (a, b, c) = (&[1u8, 2][..], &[3u8, 4][..], &[5u8, 6][..]);
        assert_eq!(
            vote(&[(0, a), (1, a), (2, a)], 2),
            Outcome::Winner {
                members: vec![0, 1, 2],
                losers: vec![]
            }
        );
        assert_eq!(
            vote(&[(0, b), (2, a), (3, a)], 2),
            Outcome::Winner {
                members: vec![2, 3],
                losers: vec![0]
            }
        );
        assert_eq!(vote(&[(0, a), (1, b)], 1), Outcome::Tie);
        assert_eq!(vote(&[(0, a), (1, b), (2, c)], 1), Outcome::Tie);
        assert_eq!(vote(&[(0, a), (1, a), (2, b)], 3), Outcome::BelowThreshold);
        assert_eq!(vote(&[(0, a)], 2), Outcome::BelowThreshold);
        assert_eq!(vote(&[], 1), Outcome::BelowThreshold);
    }
}
