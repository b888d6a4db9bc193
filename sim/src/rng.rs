//! Seeded random streams (SIMULATION.md W3). Every random choice of a run comes from one
//! 64-bit seed, split at start into named streams, so pinning one parameter (which skips its
//! draws) leaves every other stream's draws unchanged. The streams are ChaCha8 streams
//! (`rand_chacha`); the distributions are `rand`'s and `rand_distr`'s.

use rand::distributions::{Distribution, WeightedIndex};
use rand::{Rng as _, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::Exp;

/// SplitMix64 step: the mixing function behind every stream and content hash.
pub const fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Hashes a sequence of words into one (order-sensitive).
pub fn hash_words(words: &[u64]) -> u64 {
    words
        .iter()
        .fold(0x6a09_e667_f3bc_c908, |h, &w| mix64(h ^ mix64(w)))
}

/// FNV-1a over a string: stream names to stream keys.
fn name_key(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// One random stream: ChaCha8 keyed by the run's seed, one ChaCha stream per name (W3), with
/// `rand`'s distributions on top.
#[derive(Debug, Clone)]
pub struct Rng {
    inner: ChaCha8Rng,
}

/// The ChaCha key of a run: the seed, spread over 256 bits.
fn key_of(seed: u64) -> [u8; 32] {
    let mut key = [0u8; 32];
    for (k, chunk) in key.chunks_exact_mut(8).enumerate() {
        chunk.copy_from_slice(&mix64(seed ^ (k as u64).wrapping_mul(0x9e37_79b9)).to_le_bytes());
    }
    key
}

impl Rng {
    /// The stream `name` of the run with `seed`.
    pub fn stream(seed: u64, name: &str) -> Rng {
        let mut inner = ChaCha8Rng::from_seed(key_of(seed));
        inner.set_stream(name_key(name));
        Rng { inner }
    }

    /// A sub-stream, e.g. one per child: the same key, a stream derived from this one's, the
    /// name, the index and how far this one has been drawn (so forks taken at different
    /// points differ).
    pub fn fork(&self, name: &str, index: u64) -> Rng {
        let mut inner = self.inner.clone();
        let pos = self.inner.get_word_pos();
        let at = mix64(pos as u64 ^ mix64((pos >> 64) as u64));
        inner.set_stream(mix64(
            self.inner.get_stream() ^ mix64(name_key(name) ^ mix64(index ^ at)),
        ));
        inner.set_word_pos(0);
        Rng { inner }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.inner.next_u64()
    }

    /// Uniform in `[0, n)`; `n` must be positive.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        self.inner.gen_range(0..n)
    }

    /// Uniform in `[lo, hi]`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "Rng::range({lo}, {hi})");
        self.inner.gen_range(lo..=hi)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.inner.gen::<f64>()
    }

    /// True with probability `p` (clamped to `[0, 1]`).
    pub fn chance(&mut self, p: f64) -> bool {
        if p.is_nan() || p <= 0.0 {
            return false;
        }
        self.inner.gen_bool(p.min(1.0))
    }

    /// Uniform in `[lo, hi)` as a float (`lo` when the range is empty).
    pub fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        if lo < hi {
            self.inner.gen_range(lo..hi)
        } else {
            lo
        }
    }

    /// Exponentially distributed with the given mean (0 when the mean is not positive).
    pub fn exponential(&mut self, mean: f64) -> f64 {
        match Exp::new(1.0 / mean) {
            Ok(d) if mean > 0.0 && mean.is_finite() => d.sample(&mut self.inner),
            _ => 0.0,
        }
    }

    /// An index drawn with the given weights (at least one positive).
    pub fn weighted(&mut self, weights: &[u64]) -> usize {
        let d = WeightedIndex::new(weights).expect("Rng::weighted needs a positive total");
        d.sample(&mut self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_are_reproducible_and_independent() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::stream(7, "workload");
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = Rng::stream(7, "workload");
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(
            Rng::stream(7, "workload").next_u64(),
            Rng::stream(7, "config").next_u64()
        );
        assert_ne!(
            Rng::stream(7, "workload").next_u64(),
            Rng::stream(8, "workload").next_u64()
        );
    }

    #[test]
    fn below_stays_in_range_and_weighted_respects_zero_weights() {
        let mut r = Rng::stream(1, "t");
        for n in 1..50u64 {
            assert!(r.below(n) < n);
        }
        for _ in 0..200 {
            assert_eq!(r.weighted(&[0, 5, 0]), 1);
        }
    }

    #[test]
    fn w3_forks_differ_by_name_index_and_position_and_repeat_exactly() {
        let base = Rng::stream(9, "faults");
        let a = base.fork("disk", 0).next_u64();
        assert_eq!(a, Rng::stream(9, "faults").fork("disk", 0).next_u64());
        assert_ne!(a, base.fork("disk", 1).next_u64());
        assert_ne!(a, base.fork("crash", 0).next_u64());
        let mut moved = base.clone();
        moved.next_u64();
        assert_ne!(a, moved.fork("disk", 0).next_u64());
    }

    #[test]
    fn distributions_stay_in_their_ranges() {
        let mut r = Rng::stream(3, "d");
        for _ in 0..1000 {
            let x = r.range(5, 9);
            assert!((5..=9).contains(&x), "{x}");
            let u = r.uniform(2.0, 3.0);
            assert!((2.0..3.0).contains(&u), "{u}");
            assert!(r.exponential(4.0) >= 0.0);
        }
        assert_eq!(r.exponential(0.0), 0.0);
        assert_eq!(r.uniform(1.0, 1.0), 1.0);
        assert!(!r.chance(0.0));
        assert!(r.chance(1.0));
        assert!(r.chance(7.0));
        let mean = (0..20_000).map(|_| r.exponential(4.0)).sum::<f64>() / 20_000.0;
        assert!((3.8..4.2).contains(&mean), "mean {mean}");
    }
}
