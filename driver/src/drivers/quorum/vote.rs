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

/// The voted content of a range, as the background jobs build it (HEALING.md H10, H17).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembled {
    /// The winner's bytes; inside `holes`, the first copy's bytes (placeholders).
    pub data: Vec<u8>,
    /// Byte ranges with no winner.
    pub holes: Vec<(usize, usize)>,
    /// Children whose copy differs from `data` outside the holes, ascending as given.
    pub losers: Vec<usize>,
}

impl Assembled {
    /// Whether byte `a` is in a hole.
    pub fn in_hole(&self, a: usize) -> bool {
        self.holes.iter().any(|&(h0, h1)| h0 <= a && a < h1)
    }

    /// Bytes `[a, z)` now have data (H13's lowest-index fill): they leave the holes.
    pub fn fill(&mut self, a: usize, z: usize) {
        let mut out = Vec::new();
        for &(h0, h1) in &self.holes {
            if h0 < a {
                out.push((h0, h1.min(a)));
            }
            if h1 > z {
                out.push((h0.max(z), h1));
            }
        }
        self.holes = out;
    }
}

/// README D9 for the background jobs: the voters (H1) first; sectors where they have no winner
/// (or no voter answered at all) are voted again among `all` the copies, out-of-sync children
/// included, as a degraded range would be. A child whose copy loses there is a loser too.
pub fn vote_with_fallback(
    voters: &[Copy<'_>],
    all: &[Copy<'_>],
    t: usize,
    unit: usize,
) -> Option<Assembled> {
    let Some(mut voted) = vote_assembled(voters, t, unit) else {
        return vote_assembled(all, t, unit);
    };
    if voted.holes.is_empty() || all.len() <= voters.len() {
        return Some(voted);
    }
    let Some(wide) = vote_assembled(all, t, unit) else {
        return Some(voted);
    };
    let len = voted.data.len();
    for (h0, h1) in voted.holes.clone() {
        for a in (h0..h1).step_by(unit.max(1)) {
            let z = (a + unit).min(len);
            if wide.in_hole(a) {
                continue;
            }
            voted.data[a..z].copy_from_slice(&wide.data[a..z]);
            voted.fill(a, z);
            for c in all {
                if c.good(a / unit)
                    && c.data[a..z] != wide.data[a..z]
                    && !voted.losers.contains(&c.child)
                {
                    voted.losers.push(c.child);
                }
            }
        }
    }
    voted.losers.sort_unstable();
    Some(voted)
}

/// One child's copy of a range, for [`vote_assembled`].
#[derive(Debug, Clone, Copy)]
pub struct Copy<'a> {
    /// The child.
    pub child: usize,
    /// Its bytes (meaningless where not `good`).
    pub data: &'a [u8],
    /// Per unit, whether the child could read it (a latent sector error); empty: all good.
    pub good: &'a [bool],
}

impl Copy<'_> {
    fn good(&self, u: usize) -> bool {
        self.good.get(u).copied().unwrap_or(true)
    }
}

/// The whole-range vote first; when it has no winner (different children damaged in different
/// places) or some copy is missing sectors, each `unit` bytes (a sector) is voted on its own
/// among the copies that have it, and the winners assembled, so every sector that has a winner
/// is recovered. `None` only for no copies.
pub fn vote_assembled(copies: &[Copy<'_>], t: usize, unit: usize) -> Option<Assembled> {
    let first = copies.first()?;
    let all_good = copies.iter().all(|c| c.good.iter().all(|g| *g));
    if all_good {
        let whole: Vec<(usize, &[u8])> = copies.iter().map(|c| (c.child, c.data)).collect();
        if let Outcome::Winner { members, losers } = vote(&whole, t) {
            let data = copies.iter().find(|c| c.child == members[0])?.data.to_vec();
            return Some(Assembled {
                data,
                holes: Vec::new(),
                losers,
            });
        }
    }
    let len = first.data.len();
    let unit = unit.max(1);
    let mut data = Vec::with_capacity(len);
    let mut holes: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < len {
        let end = (at + unit).min(len);
        let u = at / unit;
        let parts: Vec<(usize, &[u8])> = copies
            .iter()
            .filter(|c| c.good(u))
            .map(|c| (c.child, &c.data[at..end]))
            .collect();
        match vote(&parts, t) {
            Outcome::Winner { members, .. } => {
                let w = parts.iter().find(|(i, _)| *i == members[0])?.1;
                data.extend_from_slice(w);
            }
            Outcome::Tie | Outcome::BelowThreshold => {
                data.extend_from_slice(&first.data[at..end]);
                match holes.last_mut() {
                    Some(h) if h.1 == at => h.1 = end,
                    _ => holes.push((at, end)),
                }
            }
        }
        at = end;
    }
    let in_hole = |a: usize| holes.iter().any(|&(h0, h1)| h0 <= a && a < h1);
    let losers = copies
        .iter()
        .filter(|c| {
            (0..len).step_by(unit).any(|a| {
                let z = (a + unit).min(len);
                c.good(a / unit) && !in_hole(a) && c.data[a..z] != data[a..z]
            })
        })
        .map(|c| c.child)
        .collect();
    Some(Assembled {
        data,
        holes,
        losers,
    })
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
    fn h10_a_range_damaged_in_different_sectors_on_each_child_is_assembled() {
        let good = vec![7u8; 1024];
        let mut a = good.clone();
        a[3] = 0;
        let mut b = good.clone();
        b[600] = 0;
        let c = good.clone();
        let cp = |child, data: &'static [u8]| Copy {
            child,
            data,
            good: &[],
        };
        let (a, b, c, good) = (
            Vec::leak(a) as &[u8],
            Vec::leak(b) as &[u8],
            Vec::leak(c) as &[u8],
            Vec::leak(good) as &[u8],
        );
        let copies = [cp(0, a), cp(1, b), cp(2, c)];
        assert_eq!(vote(&[(0, a), (1, b), (2, c)], 2), Outcome::Tie);
        assert_eq!(
            vote_assembled(&copies, 2, 512),
            Some(Assembled {
                data: good.to_vec(),
                holes: vec![],
                losers: vec![0, 1]
            })
        );
        // The first sector damaged differently on two of three: a hole there (three versions);
        // the second sector is still voted; nobody loses outside the hole.
        let mut d = good.to_vec();
        d[3] = 1;
        let d = Vec::leak(d) as &[u8];
        let copies = [cp(0, a), cp(1, d), cp(2, c)];
        let got = vote_assembled(&copies, 2, 512).expect("copies");
        assert_eq!(got.holes, vec![(0, 512)]);
        assert_eq!(&got.data[512..], &good[512..]);
        assert_eq!(got.losers, Vec::<usize>::new());
        // Child 1 damaged in both sectors: it loses the second one.
        let mut e = d.to_vec();
        e[700] = 9;
        let e = Vec::leak(e) as &[u8];
        let copies = [cp(0, a), cp(1, e), cp(2, c)];
        assert_eq!(
            vote_assembled(&copies, 2, 512).expect("copies").losers,
            vec![1]
        );
        assert_eq!(
            vote_assembled(&copies, 1, 512).expect("copies").holes,
            vec![(0, 512)]
        );
        // A copy that cannot read its first sector still votes on the second.
        let unreadable = [false, true];
        let copies = [
            Copy {
                child: 0,
                data: a,
                good: &unreadable,
            },
            cp(1, d),
            cp(2, c),
        ];
        let got = vote_assembled(&copies, 2, 512).expect("copies");
        assert_eq!(got.holes, vec![(0, 512)], "c1 and c2 disagree on sector 0");
        assert_eq!(got.losers, Vec::<usize>::new(), "they agree on sector 1");
        assert_eq!(vote_assembled(&[], 1, 512), None);
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
