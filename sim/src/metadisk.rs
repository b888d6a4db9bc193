//! The quorum's metadata node in the simulator (HEALING.md §5, H26–H28): a byte-exact disk of
//! its own on the quorum host, F28 (a power cut of that host resolves the metadata disk's
//! unflushed writes with F8/F9 like every other disk's, sometimes in the middle of a clean
//! shutdown), F29 (its own faults: failed writes that may land in part, failed flushes), I19
//! (after a power cut, the children the record calls in sync hold equal copies wherever the
//! cut could have made them differ) and P19 (a recovery from the intent bitmap).
//!
//! The metadata disk keeps whole 512-byte sectors: a torn write tears between sectors, never
//! inside one (the sector atomicity md's bitmap and DRBD's activity log also assume); its
//! header's CRC is what protects against a torn header.

use crate::ids::Fault;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use ballot::drivers::quorum::metadata::Layout;
use ballot::drivers::quorum::OUT_OF_SYNC_GRANULARITY_BYTES;
use ballot::{BlockDevice, Error, ErrorKind, Result, WriteFlags};
use bytes::Bytes;

use crate::rng::Rng;
use crate::sector::SECTOR_U64;
use crate::vdisk::DiskSet;

/// The metadata disk's node-name.
pub const NODE: &str = "md";

struct State {
    /// On the media.
    durable: Vec<u8>,
    /// What reads return: the media with the cache on top.
    current: Vec<u8>,
    /// Writes since the last completed flush, in order.
    pending: Vec<(u64, Vec<u8>)>,
    rng: Rng,
}

/// A byte-exact disk with a volatile cache, for the metadata node.
pub struct MetaDisk {
    st: Mutex<State>,
    len: u64,
    /// F29's rate (0: off).
    f29: f64,
    disks: Arc<DiskSet>,
}

impl std::fmt::Debug for MetaDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MetaDisk({} bytes)", self.len)
    }
}

impl MetaDisk {
    /// A blank (never formatted) metadata disk for `children` children of a disk of
    /// `disk_len` bytes, with room for one more.
    pub fn new(
        seed: u64,
        disk_len: u64,
        children: usize,
        f29: f64,
        disks: Arc<DiskSet>,
    ) -> MetaDisk {
        let len = Layout {
            disk_len,
            children: children as u64 + 1,
            granule: OUT_OF_SYNC_GRANULARITY_BYTES,
        }
        .total_bytes();
        MetaDisk {
            st: Mutex::new(State {
                durable: vec![0; len as usize],
                current: vec![0; len as usize],
                pending: Vec::new(),
                rng: Rng::stream(seed, "faults/metadisk"),
            }),
            len,
            f29,
            disks,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn latency(&self, lo_us: u64, hi_us: u64) {
        let us = self.lock().rng.range(lo_us, hi_us);
        tokio::time::sleep(Duration::from_micros(us)).await;
    }

    /// F29: whether this request fails.
    fn fails(&self) -> bool {
        self.f29 > 0.0 && self.disks.injecting() && self.lock().rng.chance(self.f29)
    }

    /// F28: the power cut resolves the unflushed writes: each survives with F8's probability
    /// (all without F8), and a survivor tears with F9's, sector by sector. Returns
    /// `(intact, lost, torn)`.
    pub fn crash(&self, f8: Option<f64>, f9: Option<f64>) -> (u64, u64, u64) {
        let mut st = self.lock();
        let pending = std::mem::take(&mut st.pending);
        let mut media = st.durable.clone();
        let mut n = (0, 0, 0);
        for (off, data) in pending {
            if !f8.is_none_or(|keep| st.rng.chance(keep)) {
                n.1 += 1;
                continue;
            }
            let tears = f9.is_some_and(|p| st.rng.chance(p));
            if tears {
                n.2 += 1;
            } else {
                n.0 += 1;
            }
            for (k, chunk) in data.chunks(SECTOR_U64 as usize).enumerate() {
                if !tears || st.rng.chance(0.5) {
                    let at = off as usize + k * SECTOR_U64 as usize;
                    media[at..at + chunk.len()].copy_from_slice(chunk);
                }
            }
        }
        st.durable = media.clone();
        st.current = media;
        n
    }
}

#[async_trait]
impl BlockDevice for MetaDisk {
    fn driver(&self) -> &'static str {
        "metadisk"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.len)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.latency(20, 200).await;
        let st = self.lock();
        let end = offset as usize + len;
        if end > st.current.len() {
            return Err(Error::new(ErrorKind::Inval, "metadisk read past the end"));
        }
        Ok(Bytes::copy_from_slice(&st.current[offset as usize..end]))
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        self.latency(20, 300).await;
        let end = offset as usize + data.len();
        if end > self.len as usize {
            return Err(Error::new(ErrorKind::Inval, "metadisk write past the end"));
        }
        let mut keep = data.len();
        let fail = self.fails();
        if fail {
            // A failed write may have landed in part: a prefix of whole sectors.
            let sectors = data.len() as u64 / SECTOR_U64;
            keep = (self.lock().rng.below(sectors + 1) * SECTOR_U64) as usize;
            self.disks.count_injected(Fault::F29);
        }
        {
            let mut st = self.lock();
            st.current[offset as usize..offset as usize + keep].copy_from_slice(&data[..keep]);
            if keep > 0 {
                st.pending.push((offset, data[..keep].to_vec()));
            }
        }
        if fail {
            return Err(Error::new(ErrorKind::Io, "metadisk write (F29)"));
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.latency(50, 1000).await;
        if self.fails() {
            // The cache keeps what it held: a crash decides its fate.
            self.disks.count_injected(Fault::F29);
            return Err(Error::new(ErrorKind::Io, "metadisk flush (F29)"));
        }
        let mut st = self.lock();
        st.pending.clear();
        st.durable = st.current.clone();
        Ok(())
    }
}
