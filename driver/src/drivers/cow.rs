//! Copy-on-write layers: what COLO's secondary needs of its active and hidden disks
//! (REPLICATION.md §10, R41–R52), implemented by ballot's in-memory `overlay` and by `qcow2`
//! images as seed 003 writes them (issue 19 item 4).
//!
//! A layer has a granule (its cluster size); every operation here works on whole granules.
//! The replication driver commits a chain of layers one granule at a time, holding that
//! granule on every layer of the chain ([`commit`]), so the layers of one chain must share
//! their granule (checked when replication starts).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{BlockDevice, Device, WriteFlags, ZeroFlags};
use crate::error::Result;
use crate::rangelock::RangeGuard;

/// A granule's content in a layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// Not allocated in this layer: the backing shows through.
    Unallocated,
    /// Reads as zeroes.
    Zero,
    /// Data, exactly the granule's length (shorter at the end of the disk).
    Data(Bytes),
}

/// A copy-on-write layer over a backing node.
#[async_trait]
pub trait CowLayer: BlockDevice {
    /// The node-name.
    fn layer_name(&self) -> &str;

    /// The granule (cluster size) in bytes, a power of two.
    fn granule(&self) -> u64;

    /// This layer as a plain device.
    fn as_device(self: Arc<Self>) -> Device;

    /// Whether the granule at `offset` is allocated here.
    async fn is_allocated_at(&self, offset: u64) -> Result<bool>;

    /// The offset of the first allocated granule at or after `offset`.
    async fn next_allocated_at(&self, offset: u64) -> Result<Option<u64>>;

    /// Bytes allocated here (whole granules), for a commit's progress.
    async fn allocated_bytes(&self) -> Result<u64>;

    /// R50: gives each unallocated granule of the range the backing's current content.
    /// Returns the number of granules preserved.
    async fn preserve(&self, offset: u64, len: u64) -> Result<u64>;

    /// R51: drops every granule, after the requests in flight. Returns how many.
    async fn make_empty(&self) -> Result<u64>;

    /// Holds the granule at `offset` exclusively against this layer's own I/O.
    async fn lock_granule(&self, offset: u64) -> RangeGuard;

    /// The granule's content; the caller holds it ([`CowLayer::lock_granule`]).
    async fn content_locked(&self, offset: u64) -> Result<Content>;

    /// Drops the granule; the caller holds it.
    async fn drop_locked(&self, offset: u64) -> Result<()>;
}

/// A layer of a chain, shared.
pub type Layer = Arc<dyn CowLayer>;

/// Counters of one commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Granules written into the base and dropped from the chain.
    pub granules: u64,
    /// Bytes written (zero granules count their length).
    pub bytes: u64,
}

/// R52: commits every granule allocated in any layer of `chain` (top first, each the backing
/// of the one before) into `base`, the backing of the last, ascending, one granule at a time,
/// atomically against I/O to it on every layer. Stops at the first error (uncommitted granules
/// stay), or at a granule boundary once `cancel` is set.
///
/// # Errors
/// A layer's or the base's error.
pub async fn commit(
    chain: &[Layer],
    base: &Device,
    cancel: Option<&AtomicBool>,
) -> Result<CommitStats> {
    let mut stats = CommitStats::default();
    let mut cursor = 0u64;
    loop {
        if cancel.is_some_and(|c| c.load(Ordering::SeqCst)) {
            return Ok(stats);
        }
        let mut next = None;
        for l in chain {
            if let Some(o) = l.next_allocated_at(cursor).await? {
                next = Some(next.map_or(o, |n: u64| n.min(o)));
            }
        }
        let Some(at) = next else {
            return Ok(stats);
        };
        let g = chain.first().map_or(1, |l| l.granule());
        cursor = at / g * g + g;
        let n = commit_granule(chain, base, at / g * g).await?;
        if n > 0 {
            stats.granules += 1;
            stats.bytes += n;
        }
    }
}

/// Commits the granule at `offset` of the chain into `base` (one step of R52 and R31 step 1).
/// Returns the bytes written; 0 when no layer holds it any more.
///
/// # Errors
/// The base's write error (the granule then stays in the chain).
pub async fn commit_granule(chain: &[Layer], base: &Device, offset: u64) -> Result<u64> {
    let mut guards = Vec::with_capacity(chain.len());
    for l in chain {
        guards.push(l.lock_granule(offset).await);
    }
    let mut content = Content::Unallocated;
    for l in chain {
        content = l.content_locked(offset).await?;
        if content != Content::Unallocated {
            break;
        }
    }
    let len = match content {
        Content::Unallocated => return Ok(0),
        Content::Data(d) => {
            let n = d.len() as u64;
            base.write(offset, d, WriteFlags::NONE).await?;
            n
        }
        Content::Zero => {
            let g = chain.first().map_or(0, |l| l.granule());
            let n = g.min(base.length()?.saturating_sub(offset));
            base.write_zeroes(
                offset,
                n,
                ZeroFlags {
                    fua: false,
                    may_unmap: true,
                },
            )
            .await?;
            n
        }
    };
    for l in chain {
        l.drop_locked(offset).await?;
    }
    drop(guards);
    Ok(len)
}

/// Bytes of the granules allocated in any layer of `chain` (each counted once).
///
/// # Errors
/// A layer's error.
pub async fn chain_allocated_bytes(chain: &[Layer]) -> Result<u64> {
    let g = chain.first().map_or(1, |l| l.granule());
    let mut cursor = 0u64;
    let mut n = 0u64;
    loop {
        let mut next = None;
        for l in chain {
            if let Some(o) = l.next_allocated_at(cursor).await? {
                next = Some(next.map_or(o, |x: u64| x.min(o)));
            }
        }
        let Some(at) = next else {
            return Ok(n * g);
        };
        n += 1;
        cursor = at / g * g + g;
    }
}
