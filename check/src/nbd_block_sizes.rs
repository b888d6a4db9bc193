//! Fuzz target `nbd_block_sizes`: the NBD client's check of a server's INFO(BLOCK_SIZE)
//! (NBD.md N39) against a reference model written from the NBD spec's sentences, not from the
//! driver.
//!
//! The input is the three advertised sizes and the export size, drawn mostly from the values
//! servers really send (powers of two around the limits, their multiples, 0xffffffff, off-by-one
//! neighbours) so that every branch is reached. The model says whether the spec allows the
//! triple and what the client must obey: requests aligned to the minimum, payloads at most the
//! maximum (capped at 32 MiB) and a multiple of the minimum. The driver must agree on the
//! verdict and on both figures.

use arbitrary::{Arbitrary, Unstructured};
use ballot::nbd::proto::{check_block_sizes, BlockSizes, PAYLOAD_BYTES_MAX};

/// One advertised value: a pick from what servers send, or any `u32`.
#[derive(Debug, Arbitrary, Clone, Copy)]
enum Size {
    /// 2^k for k in 0..=31.
    Pow(u8),
    /// 2^k times a small factor (1–7).
    Multiple(u8, u8),
    /// 2^k plus or minus one.
    Near(u8, bool),
    /// 0xffffffff.
    NoLimit,
    /// Anything.
    Any(u32),
}

impl Size {
    fn value(self) -> u32 {
        let pow = |k: u8| 1u32 << (k % 32);
        match self {
            Size::Pow(k) => pow(k),
            Size::Multiple(k, f) => pow(k).wrapping_mul(u32::from(f % 7) + 1),
            Size::Near(k, up) => {
                if up {
                    pow(k).wrapping_add(1)
                } else {
                    pow(k).wrapping_sub(1)
                }
            }
            Size::NoLimit => u32::MAX,
            Size::Any(v) => v,
        }
    }
}

/// The spec's rules, one sentence each (NBD protocol, "Block size constraints").
pub fn model(minimum: u32, preferred: u32, maximum: u32, size: u64) -> Option<BlockSizes> {
    // "The minimum block size MUST be a power of 2 and MUST NOT be larger than 2^16."
    let min_ok = minimum.count_ones() == 1 && minimum <= 1 << 16;
    // "The preferred block size MUST be a power of 2 ... and SHOULD be at least the minimum";
    // ballot treats the SHOULD as a MUST (N39).
    let pref_ok = preferred.count_ones() == 1 && preferred >= minimum;
    // "The maximum block size MUST be either an integer multiple of the minimum block size or
    // 0xffffffff (no inherent limit), MUST be at least as large as the smaller of the preferred
    // block size or export size."
    let max_ok = maximum == u32::MAX
        || (maximum > 0
            && min_ok
            && maximum % minimum == 0
            && u64::from(maximum) >= u64::from(preferred).min(size));
    if !(min_ok && pref_ok && max_ok) {
        return None;
    }
    let payload_max = if maximum > PAYLOAD_BYTES_MAX {
        PAYLOAD_BYTES_MAX
    } else {
        maximum
    };
    Some(BlockSizes {
        minimum,
        payload_max,
    })
}

/// One case: the driver's verdict and figures equal the model's.
pub fn check(minimum: u32, preferred: u32, maximum: u32, size: u64) {
    let got = check_block_sizes(minimum, preferred, maximum, size);
    let want = model(minimum, preferred, maximum, size);
    match (&got, want) {
        (Ok(g), Some(w)) => {
            assert_eq!(*g, w, "{minimum}/{preferred}/{maximum} size {size}");
            assert_eq!(g.payload_max % g.minimum, 0);
            assert!(g.payload_max >= 1 && g.payload_max <= PAYLOAD_BYTES_MAX);
        }
        (Err(msg), None) => assert!(
            msg.starts_with(&format!(
                "server sent invalid block sizes {minimum}/{preferred}/{maximum}: "
            )),
            "{msg}"
        ),
        _ => panic!("{minimum}/{preferred}/{maximum} size {size}: driver {got:?}, model {want:?}"),
    }
}

/// The fuzz entry point.
pub fn fuzz(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok((mi, pr, ma, size)) = <(Size, Size, Size, Size)>::arbitrary(&mut u) else {
        return;
    };
    check(mi.value(), pr.value(), ma.value(), u64::from(size.value()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peers_values_are_allowed() {
        // nbdkit --filter=cache, qemu-nbd, nbdkit --filter=blocksize-policy minimum 4096.
        for (mi, pr, ma) in [
            (1, 65536, u32::MAX),
            (1, 4096, 32 << 20),
            (4096, 4096, 3 << 12),
        ] {
            check(mi, pr, ma, 1 << 30);
            assert!(model(mi, pr, ma, 1 << 30).is_some());
        }
        assert_eq!(model(512, 4096, 6000, 1 << 30), None);
    }
}
