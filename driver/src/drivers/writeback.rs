//! Write-behind for `file` nodes: which parts of a file a stream of large buffered writes has
//! completely rewritten, so their write-back can start at once instead of at the next flush.
//!
//! A buffered write only dirties the page cache; the kernel writes it back when the dirty
//! limits or a flush force it. A guest copying a disk image then pays for the whole write-back
//! at its final flush, after the copy, where it could have overlapped the copy. The file driver
//! therefore starts write-back (`sync_file_range(SYNC_FILE_RANGE_WRITE)`, which waits for
//! nothing) of every [`CHUNK_BYTES`] chunk that writes have covered granule by granule since
//! its last write-back. Only whole [`GRANULE_BYTES`] granules count, so small random writes
//! (a database's 4 KiB pages, say) never start write-back early: they keep the page cache's
//! write combining, as without ballot. Durability is unchanged: flush is still `fdatasync`.

use std::collections::HashMap;

/// The unit of early write-back.
pub const CHUNK_BYTES: u64 = 8 << 20;

/// The unit of coverage: a write counts only for the granules it covers entirely.
pub const GRANULE_BYTES: u64 = 64 << 10;

const GRANULES_PER_CHUNK: u64 = CHUNK_BYTES / GRANULE_BYTES;

/// Chunks with partial coverage tracked at once; past this the partial coverage is forgotten
/// (bounded memory whatever the write pattern: 4096 entries of 24 bytes).
pub const TRACKED_CHUNKS_MAX: usize = 4096;

/// Granule coverage of the chunks written since their last write-back.
#[derive(Debug, Default)]
pub struct Coverage {
    chunks: HashMap<u64, u128>,
}

impl Coverage {
    /// Notes a completed write of `len` bytes at `offset`; returns the chunks (by index) it
    /// completed, whose coverage starts over.
    pub fn note(&mut self, offset: u64, len: u64) -> Vec<u64> {
        let first = offset.div_ceil(GRANULE_BYTES);
        let end = offset.saturating_add(len) / GRANULE_BYTES;
        let mut done = Vec::new();
        let mut g = first;
        while g < end {
            let chunk = g / GRANULES_PER_CHUNK;
            let lo = g % GRANULES_PER_CHUNK;
            let hi = (end - chunk * GRANULES_PER_CHUNK).min(GRANULES_PER_CHUNK);
            let bits = if hi - lo == 128 {
                u128::MAX
            } else {
                ((1u128 << (hi - lo)) - 1) << lo
            };
            if !self.chunks.contains_key(&chunk) && self.chunks.len() >= TRACKED_CHUNKS_MAX {
                self.chunks.clear();
            }
            let e = self.chunks.entry(chunk).or_default();
            *e |= bits;
            if *e == u128::MAX {
                self.chunks.remove(&chunk);
                done.push(chunk);
            }
            g = chunk * GRANULES_PER_CHUNK + hi;
        }
        done
    }

    /// Chunks with partial coverage.
    pub fn tracked(&self) -> usize {
        self.chunks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_sequential_stream_completes_each_chunk_once_it_is_covered() {
        let mut c = Coverage::default();
        let mut done = Vec::new();
        // 256 KiB writes over 20 MiB, in order.
        for i in 0..80 {
            done.extend(c.note(i * 256 * 1024, 256 * 1024));
            if i == 31 {
                assert_eq!(done, vec![0], "after the 32nd write: chunk 0 complete");
            }
        }
        assert_eq!(done, vec![0, 1]);
        assert_eq!(c.tracked(), 1, "chunk 2 is half covered");
    }

    #[test]
    fn out_of_order_writes_complete_a_chunk_when_the_last_gap_fills() {
        let mut c = Coverage::default();
        assert_eq!(c.note(4 * MIB, 4 * MIB), Vec::<u64>::new());
        assert_eq!(c.note(MIB, 3 * MIB), Vec::<u64>::new());
        assert_eq!(c.note(0, MIB), vec![0]);
        assert_eq!(c.tracked(), 0);
        // One write covering two whole chunks and part of a third.
        assert_eq!(c.note(8 * MIB, 17 * MIB), vec![1, 2]);
        assert_eq!(c.tracked(), 1);
    }

    #[test]
    fn small_and_unaligned_writes_cover_only_whole_granules() {
        let mut c = Coverage::default();
        // 4 KiB random writes cover no granule at all, however many.
        for i in 0..10_000u64 {
            assert!(c.note((i * 7919 % 2048) * 4096, 4096).is_empty());
        }
        assert_eq!(c.tracked(), 0);
        // A write from 1 byte into the chunk to its end misses granule 0 only.
        assert!(c.note(1, CHUNK_BYTES - 1).is_empty());
        assert_eq!(c.note(0, GRANULE_BYTES), vec![0]);
    }

    #[test]
    fn partial_coverage_is_bounded() {
        let mut c = Coverage::default();
        for i in 0..(TRACKED_CHUNKS_MAX as u64 + 10) {
            c.note(i * CHUNK_BYTES, GRANULE_BYTES);
        }
        assert_eq!(
            c.tracked(),
            10,
            "cleared once at the limit, then 10 new chunks"
        );
        // The end of the address space does not overflow.
        assert!(c.note(u64::MAX - GRANULE_BYTES, GRANULE_BYTES).is_empty());
    }
}
