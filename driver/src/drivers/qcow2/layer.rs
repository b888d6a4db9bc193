//! A qcow2 image as a copy-on-write layer: COLO's active and hidden disks as seed 003 writes
//! them (issue 19 item 4, REPLICATION.md R41–R52 with a qcow2 file in place of an overlay).

use std::sync::Arc;

use async_trait::async_trait;

use super::format::{self, L2Entry};
use super::Qcow2;
use crate::device::Device;
use crate::drivers::cow::{Content, CowLayer};
use crate::error::Result;
use crate::rangelock::RangeGuard;

impl Qcow2 {
    /// The guest clusters whose entries are not unallocated, from cluster `from` on, at most
    /// `limit` of them (walking only the L2 tables that exist).
    async fn allocated_from(&self, from: u64, limit: usize) -> Result<Vec<u64>> {
        let per = self.cluster / 8;
        let total = self.h.size.div_ceil(self.cluster);
        let mut out = Vec::new();
        let mut m = self.meta.lock().await;
        let mut l1i = from / per;
        while (l1i as usize) < m.l1.len() && l1i * per < total && out.len() < limit {
            let raw = m.l1[l1i as usize];
            let present = format::decode_l1(raw, self.h.cluster_bits)
                .map_err(|e| self.corrupt(e))?
                .is_some();
            if present {
                let first = (l1i * per).max(from);
                let end = ((l1i + 1) * per).min(total);
                for g in first..end {
                    if self.entry(&mut m, g).await? != L2Entry::Unallocated {
                        out.push(g);
                        if out.len() == limit {
                            break;
                        }
                    }
                }
            }
            l1i += 1;
        }
        Ok(out)
    }
}

#[async_trait]
impl CowLayer for Qcow2 {
    fn layer_name(&self) -> &str {
        &self.name
    }

    fn granule(&self) -> u64 {
        self.cluster
    }

    fn as_device(self: Arc<Self>) -> Device {
        self
    }

    async fn is_allocated_at(&self, offset: u64) -> Result<bool> {
        let mut m = self.meta.lock().await;
        Ok(self.entry(&mut m, offset / self.cluster).await? != L2Entry::Unallocated)
    }

    async fn next_allocated_at(&self, offset: u64) -> Result<Option<u64>> {
        let from = offset.div_ceil(self.cluster);
        Ok(self
            .allocated_from(from, 1)
            .await?
            .first()
            .map(|g| g * self.cluster))
    }

    async fn allocated_bytes(&self) -> Result<u64> {
        Ok(self.allocated_from(0, usize::MAX).await?.len() as u64 * self.cluster)
    }

    async fn preserve(&self, offset: u64, len: u64) -> Result<u64> {
        let size = self.h.size;
        if len == 0 || offset >= size {
            return Ok(0);
        }
        let cl = self.cluster;
        let (first, end) = self.guest_clusters(offset, len.min(size - offset));
        let _g = self.locks.lock(first, end, true).await;
        let entries = self.maps(first, end).await?;
        let mut done = 0;
        let mut i = 0usize;
        while i < entries.len() {
            if entries[i] != L2Entry::Unallocated {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < entries.len() && entries[j] == L2Entry::Unallocated {
                j += 1;
            }
            let a = (first + i as u64) * cl;
            let b = ((first + j as u64) * cl).min(size);
            let data = self.read_backing(a, b).await?;
            if self.h.version >= 3 && super::is_zero(&data) {
                self.zero_clusters(first + i as u64, first + j as u64, true, true)
                    .await?;
            } else {
                self.write_locked(a, &data, false).await?;
            }
            done += (j - i) as u64;
            i = j;
        }
        drop(_g);
        self.relieve_caches().await?;
        Ok(done)
    }

    async fn make_empty(&self) -> Result<u64> {
        let dropped = {
            let _all = self.locks.lock(0, u64::MAX, true).await;
            let gs = self.allocated_from(0, usize::MAX).await?;
            let mut m = self.meta.lock().await;
            for &g in &gs {
                let old = self.entry(&mut m, g).await?;
                self.set_entry(&mut m, g, L2Entry::Unallocated).await?;
                self.defer_free(&mut m, old);
            }
            gs.len() as u64
        };
        self.relieve_caches().await?;
        Ok(dropped)
    }

    async fn lock_granule(&self, offset: u64) -> RangeGuard {
        let g = offset / self.cluster;
        self.locks.lock(g, g + 1, true).await
    }

    async fn content_locked(&self, offset: u64) -> Result<Content> {
        let g = offset / self.cluster;
        let e = {
            let mut m = self.meta.lock().await;
            self.entry(&mut m, g).await?
        };
        let a = g * self.cluster;
        let b = (a + self.cluster).min(self.h.size);
        Ok(match e {
            L2Entry::Unallocated => Content::Unallocated,
            L2Entry::Zero { .. } => Content::Zero,
            _ => Content::Data(self.read_in_cluster(e, a, b).await?),
        })
    }

    async fn drop_locked(&self, offset: u64) -> Result<()> {
        let g = offset / self.cluster;
        {
            let mut m = self.meta.lock().await;
            let old = self.entry(&mut m, g).await?;
            if old != L2Entry::Unallocated {
                self.set_entry(&mut m, g, L2Entry::Unallocated).await?;
                self.defer_free(&mut m, old);
            }
        }
        self.relieve_caches().await
    }
}
