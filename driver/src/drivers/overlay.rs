//! `overlay`: a copy-on-write layer over a backing node, ballot's own driver for COLO's active
//! and hidden disks (REPLICATION.md §10, R41–R52; QEMU uses qcow2 images there).
//!
//! The map is a `BTreeMap` from cluster index to slot (R42): ordered, so commit walks clusters
//! in ascending order and no hash order reaches a decision; its size is the number of
//! allocated clusters, so make_empty and commit cost what is allocated, never the disk length.
//! Data lives in memory (one 64 KiB buffer per data cluster, shared with the request that wrote
//! it when it covered the whole cluster) or, with `file=`, in that node at the cluster's own
//! offset. Per-cluster atomicity (R49) comes from a shared/exclusive [`RangeLock`].

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::device::{
    check_request, Access, BlockDevice, BlockStatus, Device, WriteFlags, ZeroFlags,
};
use crate::error::{ConfigError, Result};
use crate::rangelock::RangeLock;

/// The fixed cluster size (R42).
pub const CLUSTER_BYTES: u64 = 64 * 1024;

/// What one allocated cluster holds.
#[derive(Debug, Clone)]
enum Slot {
    /// Data in memory; exactly the cluster's length.
    Mem(Bytes),
    /// Data in the `file` node at the cluster's offset.
    File,
    /// Reads as zeroes.
    Zero,
}

/// How one cluster of a request is served.
#[derive(Debug, Clone)]
enum Part {
    Mem(Bytes),
    File,
    Zero,
    Unallocated,
}

impl Part {
    fn same_run(&self, other: &Part) -> bool {
        matches!(
            (self, other),
            (Part::File, Part::File)
                | (Part::Zero, Part::Zero)
                | (Part::Unallocated, Part::Unallocated)
        )
    }
}

/// Counters of one overlay (for tests, the simulator's caps and the benchmark).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OverlayStats {
    /// Allocated clusters (data and zero).
    pub allocated: u64,
    /// Data clusters held in memory.
    pub mem_clusters: u64,
}

/// An overlay node.
#[derive(Debug)]
pub struct Overlay {
    name: String,
    backing: Device,
    file: Option<Device>,
    length: u64,
    map: Mutex<BTreeMap<u64, Slot>>,
    locks: Arc<RangeLock>,
}

fn clusters(offset: u64, len: u64) -> (u64, u64) {
    (
        offset / CLUSTER_BYTES,
        (offset + len).div_ceil(CLUSTER_BYTES),
    )
}

impl Overlay {
    /// Opens an empty overlay named `name` over `backing` (R41), with data in `file` if given.
    ///
    /// # Errors
    /// The backing's length cannot be read, or `file` is shorter than the backing (R41).
    pub fn open(
        name: &str,
        (backing_name, backing): (&str, Device),
        file: Option<(&str, Device)>,
    ) -> Result<Overlay, ConfigError> {
        let length = backing.length().map_err(|e| {
            ConfigError::new(format!("Could not get the length of '{backing_name}': {e}"))
        })?;
        let file = match file {
            None => None,
            Some((file_name, dev)) => {
                let n = dev.length().map_err(|e| {
                    ConfigError::new(format!("Could not get the length of '{file_name}': {e}"))
                })?;
                if n < length {
                    return Err(ConfigError::new(format!(
                        "Overlay file node '{file_name}' ({n} bytes) is smaller than backing node '{backing_name}' ({length} bytes)"
                    )));
                }
                Some(dev)
            }
        };
        Ok(Overlay {
            name: name.to_string(),
            backing,
            file,
            length,
            map: Mutex::new(BTreeMap::new()),
            locks: Arc::new(RangeLock::default()),
        })
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<u64, Slot>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backing node.
    pub fn backing(&self) -> &Device {
        &self.backing
    }

    /// Number of clusters of the disk.
    pub fn cluster_count(&self) -> u64 {
        self.length.div_ceil(CLUSTER_BYTES)
    }

    fn cluster_len(&self, c: u64) -> u64 {
        (self.length - c * CLUSTER_BYTES).min(CLUSTER_BYTES)
    }

    /// Counters now.
    pub fn stats(&self) -> OverlayStats {
        let m = self.map();
        OverlayStats {
            allocated: m.len() as u64,
            mem_clusters: m.values().filter(|s| matches!(s, Slot::Mem(_))).count() as u64,
        }
    }

    /// Whether cluster `c` is allocated here.
    pub fn is_allocated(&self, c: u64) -> bool {
        self.map().contains_key(&c)
    }

    /// The first allocated cluster at or after `c`.
    pub fn next_allocated(&self, c: u64) -> Option<u64> {
        self.map().range(c..).next().map(|(k, _)| *k)
    }

    /// The allocated clusters, ascending (for tests and the simulator's checks).
    pub fn allocated_clusters(&self) -> Vec<u64> {
        self.map().keys().copied().collect()
    }

    fn parts(&self, first: u64, end: u64) -> Vec<Part> {
        let m = self.map();
        (first..end)
            .map(|c| match m.get(&c) {
                Some(Slot::Mem(b)) => Part::Mem(b.clone()),
                Some(Slot::File) => Part::File,
                Some(Slot::Zero) => Part::Zero,
                None => Part::Unallocated,
            })
            .collect()
    }

    /// Reads `[offset, offset + len)` given the parts of its clusters; the caller holds the
    /// clusters whose part is `Unallocated` (R49).
    async fn read_parts(&self, offset: u64, len: u64, first: u64, parts: &[Part]) -> Result<Bytes> {
        let end = offset + len;
        // Runs of clusters served the same way, clipped to the request.
        let mut runs: Vec<(u64, u64, Part)> = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let c = first + i as u64;
            let a = (c * CLUSTER_BYTES).max(offset);
            let b = (c * CLUSTER_BYTES + CLUSTER_BYTES).min(end);
            match runs.last_mut() {
                Some(last) if last.2.same_run(p) => last.1 = b,
                _ => runs.push((a, b, p.clone())),
            }
        }
        if runs.len() == 1 {
            let (a, b, p) = &runs[0];
            return self.read_run(*a, *b, p).await;
        }
        let mut out = BytesMut::with_capacity(len as usize);
        for (a, b, p) in &runs {
            out.extend_from_slice(&self.read_run(*a, *b, p).await?);
        }
        Ok(out.freeze())
    }

    async fn read_run(&self, a: u64, b: u64, p: &Part) -> Result<Bytes> {
        let n = (b - a) as usize;
        match p {
            Part::Mem(buf) => {
                let start = (a % CLUSTER_BYTES) as usize;
                Ok(buf.slice(start..start + n))
            }
            Part::Zero => Ok(BytesMut::zeroed(n).freeze()),
            Part::File => match &self.file {
                Some(f) => f.read(a, n).await,
                None => Ok(BytesMut::zeroed(n).freeze()),
            },
            Part::Unallocated => self.backing.read(a, n).await,
        }
    }

    /// R50: gives each unallocated cluster of the range the backing's current content.
    /// Allocated clusters are left alone. Returns the number of clusters preserved.
    ///
    /// # Errors
    /// The backing's read error (or the file's write error); clusters preserved before it stay.
    pub async fn preserve(&self, offset: u64, len: u64) -> Result<u64> {
        if len == 0 {
            return Ok(0);
        }
        let (first, end) = clusters(offset, len.min(self.length.saturating_sub(offset)));
        let _g = self.locks.lock(first, end, true).await;
        let parts = self.parts(first, end);
        let mut done = 0;
        let mut i = 0usize;
        while i < parts.len() {
            if !matches!(parts[i], Part::Unallocated) {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < parts.len() && matches!(parts[j], Part::Unallocated) {
                j += 1;
            }
            let (c0, c1) = (first + i as u64, first + j as u64);
            let a = c0 * CLUSTER_BYTES;
            let b = (c1 * CLUSTER_BYTES).min(self.length);
            // A run the backing reports as zeroes becomes zero clusters: no data to hold.
            let st = self.backing.block_status(a, b - a).await;
            if let Ok(s) = st {
                if s.zero && s.length == b - a {
                    let mut m = self.map();
                    for c in c0..c1 {
                        m.insert(c, Slot::Zero);
                    }
                    done += c1 - c0;
                    i = j;
                    continue;
                }
            }
            let data = self.backing.read(a, (b - a) as usize).await?;
            if let Some(f) = &self.file {
                f.write(a, data.clone(), WriteFlags::NONE).await?;
            }
            let mut m = self.map();
            for c in c0..c1 {
                let slot = match &self.file {
                    Some(_) => Slot::File,
                    None => {
                        let s = ((c - c0) * CLUSTER_BYTES) as usize;
                        Slot::Mem(data.slice(s..s + self.cluster_len(c) as usize))
                    }
                };
                m.insert(c, slot);
            }
            done += c1 - c0;
            i = j;
        }
        Ok(done)
    }

    /// R51: drops every cluster, after requests in flight on the overlay, holding new ones.
    /// Costs the number of allocated clusters. Returns how many were dropped.
    pub async fn make_empty(&self) -> u64 {
        let _g = self.locks.lock(0, u64::MAX, true).await;
        let old = std::mem::take(&mut *self.map());
        old.len() as u64
    }

    /// The content of allocated cluster `c` as `Some(data)` or `None` for a zero cluster;
    /// `Ok(None)` also when not allocated here (the caller checks first).
    async fn cluster_content(&self, c: u64) -> Result<Option<Bytes>> {
        let slot = self.map().get(&c).cloned();
        match slot {
            Some(Slot::Mem(b)) => Ok(Some(b)),
            Some(Slot::File) => match &self.file {
                Some(f) => Ok(Some(
                    f.read(c * CLUSTER_BYTES, self.cluster_len(c) as usize)
                        .await?,
                )),
                None => Ok(None),
            },
            Some(Slot::Zero) | None => Ok(None),
        }
    }

    fn drop_cluster(&self, c: u64) {
        self.map().remove(&c);
    }
}

/// Counters of one commit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Clusters written into the base and dropped from the chain.
    pub clusters: u64,
    /// Bytes written (zero clusters count their length).
    pub bytes: u64,
}

/// R52: commits every cluster allocated in any overlay of `chain` (top first, each the backing
/// of the one before) into `base`, the backing of the last: [`crate::drivers::cow::commit`],
/// which the replication driver runs over any layers, with the counts in clusters.
///
/// # Errors
/// The base's write error.
pub async fn commit(
    chain: &[Arc<Overlay>],
    base: &Device,
    cancel: Option<&AtomicBool>,
) -> Result<CommitStats> {
    let layers: Vec<crate::drivers::cow::Layer> = chain.iter().map(|o| o.clone() as _).collect();
    let st = crate::drivers::cow::commit(&layers, base, cancel).await?;
    Ok(CommitStats {
        clusters: st.granules,
        bytes: st.bytes,
    })
}

#[async_trait]
impl BlockDevice for Overlay {
    fn driver(&self) -> &'static str {
        "overlay"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.length)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let n = len as u64;
        check_request(self.length, 1, offset, n, Access::Read)?;
        if n == 0 {
            return Ok(Bytes::new());
        }
        let (first, end) = clusters(offset, n);
        let parts = self.parts(first, end);
        if !parts.iter().any(|p| matches!(p, Part::Unallocated)) {
            return self.read_parts(offset, n, first, &parts).await;
        }
        // R49: a read that falls through to the backing excludes preserve, copy-on-write,
        // commit and make_empty on those clusters; re-read the map under the lock.
        let _g = self.locks.lock(first, end, false).await;
        let parts = self.parts(first, end);
        self.read_parts(offset, n, first, &parts).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let n = data.len() as u64;
        check_request(self.length, 1, offset, n, Access::Write)?;
        if n == 0 {
            return Ok(());
        }
        let (first, end) = clusters(offset, n);
        let _g = self.locks.lock(first, end, true).await;
        let parts = self.parts(first, end);
        let mut slots = Vec::with_capacity(parts.len());
        for (i, p) in parts.iter().enumerate() {
            let c = first + i as u64;
            let (ca, clen) = (c * CLUSTER_BYTES, self.cluster_len(c));
            let (a, b) = (ca.max(offset), (ca + clen).min(offset + n));
            let piece = data.slice((a - offset) as usize..(b - offset) as usize);
            let whole = a == ca && b == ca + clen;
            if self.file.is_some() {
                if !whole && !matches!(p, Part::File) {
                    // Copy-on-write into the file: the cluster's other bytes first (R44).
                    // A file-mode overlay has no memory clusters: the rest are zero clusters.
                    let base = match p {
                        Part::Unallocated => self.backing.read(ca, clen as usize).await?,
                        _ => BytesMut::zeroed(clen as usize).freeze(),
                    };
                    let mut full = BytesMut::from(&base[..]);
                    full[(a - ca) as usize..(b - ca) as usize].copy_from_slice(&piece);
                    slots.push((c, full.freeze(), ca));
                } else {
                    slots.push((c, piece, a));
                }
                continue;
            }
            let slot = if whole {
                piece
            } else {
                let mut full = match p {
                    Part::Mem(b) => BytesMut::from(&b[..]),
                    Part::Unallocated => {
                        BytesMut::from(&self.backing.read(ca, clen as usize).await?[..])
                    }
                    Part::Zero | Part::File => BytesMut::zeroed(clen as usize),
                };
                full[(a - ca) as usize..(b - ca) as usize].copy_from_slice(&piece);
                full.freeze()
            };
            slots.push((c, slot, ca));
        }
        if let Some(f) = &self.file {
            // One write for the request, or per cluster where copy-on-write widened it.
            let widened = slots
                .iter()
                .any(|(_, d, at)| *at < offset || *at + d.len() as u64 > offset + n);
            if widened {
                for (_, d, at) in &slots {
                    f.write(*at, d.clone(), flags).await?;
                }
            } else {
                f.write(offset, data.clone(), flags).await?;
            }
            let mut m = self.map();
            for (c, _, _) in &slots {
                m.insert(*c, Slot::File);
            }
            return Ok(());
        }
        let mut m = self.map();
        for (c, d, _) in slots {
            m.insert(c, Slot::Mem(d));
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        // R47: the file first, then the backing; the first error is returned.
        if let Some(f) = &self.file {
            f.flush().await?;
        }
        self.backing.flush().await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_request(self.length, 1, offset, len, Access::Write)?;
        if len == 0 {
            return Ok(());
        }
        // R45: whole clusters become zero clusters; partial ones are written with zeroes.
        let end = offset + len;
        let whole_first = offset.div_ceil(CLUSTER_BYTES);
        let whole_end = if end == self.length {
            self.cluster_count()
        } else {
            end / CLUSTER_BYTES
        };
        if whole_first >= whole_end {
            return self
                .write(
                    offset,
                    BytesMut::zeroed(len as usize).freeze(),
                    WriteFlags { fua: flags.fua },
                )
                .await;
        }
        let head = (offset, whole_first * CLUSTER_BYTES);
        let tail = ((whole_end * CLUSTER_BYTES).min(end), end);
        for (a, b) in [head, tail] {
            // An empty head or tail is a zero-length write: nothing happens.
            self.write(
                a,
                BytesMut::zeroed((b - a) as usize).freeze(),
                WriteFlags::NONE,
            )
            .await?;
        }
        {
            let _g = self.locks.lock(whole_first, whole_end, true).await;
            let mut m = self.map();
            for c in whole_first..whole_end {
                m.insert(c, Slot::Zero);
            }
        }
        if flags.fua {
            self.flush().await?;
        }
        Ok(())
    }

    fn can_fast_zero(&self) -> bool {
        false
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // R46: succeeds at once, changes nothing.
        check_request(self.length, 1, offset, len, Access::Read)?;
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_request(self.length, 1, offset, len, Access::Read)?;
        if len == 0 {
            return Ok(BlockStatus::data(0));
        }
        let (first, end) = clusters(offset, len);
        let parts = self.parts(first, end);
        let mut k = 1;
        while k < parts.len()
            && (parts[k].same_run(&parts[0])
                || matches!(
                    (&parts[0], &parts[k]),
                    (Part::Mem(_) | Part::File, Part::Mem(_) | Part::File)
                ))
        {
            k += 1;
        }
        let run_end = ((first + k as u64) * CLUSTER_BYTES).min(offset + len);
        let n = run_end - offset;
        // R48: allocated extents are marked; unallocated ones report the backing's answer.
        Ok(match parts[0] {
            Part::Zero => BlockStatus::zero(n),
            Part::Mem(_) | Part::File => BlockStatus::data(n),
            Part::Unallocated => {
                let s = self.backing.block_status(offset, n).await?;
                BlockStatus {
                    allocated: false,
                    ..s
                }
            }
        })
    }
}

#[cfg(test)]
mod tests;

#[async_trait]
impl crate::drivers::cow::CowLayer for Overlay {
    fn layer_name(&self) -> &str {
        &self.name
    }

    fn granule(&self) -> u64 {
        CLUSTER_BYTES
    }

    fn as_device(self: Arc<Self>) -> Device {
        self
    }

    async fn is_allocated_at(&self, offset: u64) -> Result<bool> {
        Ok(self.is_allocated(offset / CLUSTER_BYTES))
    }

    async fn next_allocated_at(&self, offset: u64) -> Result<Option<u64>> {
        Ok(self
            .next_allocated(offset.div_ceil(CLUSTER_BYTES))
            .map(|c| c * CLUSTER_BYTES))
    }

    async fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.stats().allocated * CLUSTER_BYTES)
    }

    async fn preserve(&self, offset: u64, len: u64) -> Result<u64> {
        Overlay::preserve(self, offset, len).await
    }

    async fn make_empty(&self) -> Result<u64> {
        Ok(Overlay::make_empty(self).await)
    }

    async fn lock_granule(&self, offset: u64) -> crate::rangelock::RangeGuard {
        let c = offset / CLUSTER_BYTES;
        self.locks.lock(c, c + 1, true).await
    }

    async fn content_locked(&self, offset: u64) -> Result<crate::drivers::cow::Content> {
        use crate::drivers::cow::Content;
        let c = offset / CLUSTER_BYTES;
        let slot = self.map().get(&c).cloned();
        Ok(match slot {
            None => Content::Unallocated,
            Some(Slot::Zero) => Content::Zero,
            Some(_) => match self.cluster_content(c).await? {
                Some(d) => Content::Data(d),
                None => Content::Zero,
            },
        })
    }

    async fn drop_locked(&self, offset: u64) -> Result<()> {
        self.drop_cluster(offset / CLUSTER_BYTES);
        Ok(())
    }
}
