//! The image file the qcow2 topologies run on (issue 19): bytes on the media, a volatile cache
//! on top, F5 on writes, and power cuts resolved by F8 (each unflushed write survives or not)
//! and F9 (a surviving write torn between sectors, never inside one). Used by the image
//! topology ([`crate::image`]) and by child images ([`crate::childimage`]).

use crate::ids::{Fault, Rule};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use ballot::device::{check_request, Access};
use ballot::drivers::qcow2::check::check;
use ballot::drivers::qcow2::{Qcow2, Qcow2Options};
use ballot::{BlockDevice, Device, Error, ErrorKind, Result, WriteFlags};
use bytes::Bytes;

use crate::rng::Rng;
use crate::sector::SECTOR;

pub(crate) struct DiskState {
    pub(crate) durable: Vec<u8>,
    pub(crate) current: Vec<u8>,
    /// Unflushed writes, in order: offset and bytes.
    pub(crate) pending: Vec<(u64, Vec<u8>)>,
    pub(crate) rng: Rng,
    /// Latencies only (so the fault decisions do not depend on how many requests ran).
    pub(crate) lat: Rng,
    pub(crate) injected: BTreeMap<Fault, u64>,
}

impl DiskState {
    /// A flush: the pending writes reach the media in order, so the media equals the cache
    /// (without copying the whole image at every flush, issue 22).
    fn commit_pending(&mut self) {
        let len = self.current.len();
        self.durable.resize(len, 0);
        for (off, data) in std::mem::take(&mut self.pending) {
            let at = off as usize;
            self.durable[at..at + data.len()].copy_from_slice(&data);
        }
        debug_assert!(
            self.durable == self.current,
            "media and cache differ after a flush"
        );
    }
}

/// The image file: bytes on the media, a cache on top, F5 on writes.
pub(crate) struct ImageDisk {
    pub(crate) st: Mutex<DiskState>,
    pub(crate) f5: f64,
    /// Latency of one request, in microseconds (a range to draw from).
    pub(crate) lat_us: (u64, u64),
    /// Extra latency of a flush (a cache write-back), in microseconds; (0, 0) for none.
    pub(crate) flush_us: (u64, u64),
    /// The host's life: requests of an earlier life (before a power cut) fail and change
    /// nothing.
    pub(crate) life: AtomicU64,
}

/// The image file as one life of the host sees it.
#[derive(Debug)]
pub(crate) struct Lane {
    disk: Arc<ImageDisk>,
    life: u64,
}

impl Lane {
    fn alive(&self) -> Result<()> {
        if self.disk.life.load(Ordering::SeqCst) == self.life {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Io, "the host lost power"))
        }
    }
}

#[async_trait]
impl BlockDevice for Lane {
    fn driver(&self) -> &'static str {
        "imagedisk"
    }
    fn length(&self) -> Result<u64> {
        self.disk.length()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.alive()?;
        let r = self.disk.read(offset, len).await;
        self.alive()?;
        r
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        latency(&self.disk).await;
        self.alive()?;
        self.disk.write_now(offset, data, flags)
    }
    async fn flush(&self) -> Result<()> {
        latency(&self.disk).await;
        flush_latency(&self.disk).await;
        self.alive()?;
        self.disk.flush_now();
        Ok(())
    }
    async fn grow(&self, length: u64) -> Result<()> {
        self.alive()?;
        self.disk.grow(length).await
    }
    fn grows_with_zeroes(&self) -> bool {
        true
    }
}

impl std::fmt::Debug for ImageDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ImageDisk")
    }
}

impl ImageDisk {
    /// An empty disk whose fault and latency draws come from streams named after `name`.
    /// With a flush latency of `us` (a range to draw from) as well.
    pub(crate) fn with_flush_latency(mut self, us: (u64, u64)) -> ImageDisk {
        self.flush_us = us;
        self
    }

    pub(crate) fn new(seed: u64, name: &str, f5: f64, lat_us: (u64, u64)) -> ImageDisk {
        ImageDisk {
            st: Mutex::new(DiskState {
                durable: Vec::new(),
                current: Vec::new(),
                pending: Vec::new(),
                rng: Rng::stream(seed, &format!("{name}/disk")),
                lat: Rng::stream(seed, &format!("{name}/latency")),
                injected: BTreeMap::new(),
            }),
            f5,
            lat_us,
            flush_us: (0, 0),
            life: AtomicU64::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, DiskState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The disk as the host's current life sees it.
    pub(crate) fn lane(self: &Arc<Self>) -> Device {
        Arc::new(Lane {
            disk: self.clone(),
            life: self.life.load(Ordering::SeqCst),
        })
    }

    /// A power cut: requests of the life that ends fail from now on, and the cache is
    /// resolved ([`ImageDisk::crash`]).
    pub(crate) fn cut(&self, f8: f64, f9: f64) -> u64 {
        self.life.fetch_add(1, Ordering::SeqCst);
        self.crash(f8, f9)
    }

    /// The bytes on the media (what a power cut would leave, were the cache lost whole).
    pub(crate) fn durable_bytes(&self) -> Vec<u8> {
        let st = self.lock();
        let mut d = st.durable.clone();
        d.resize(st.current.len(), 0);
        d
    }

    /// Faults injected so far, by family.
    pub(crate) fn injected(&self) -> BTreeMap<Fault, u64> {
        self.lock().injected.clone()
    }

    /// Empties the disk (a reformat): no bytes, nothing pending.
    pub(crate) fn wipe(&self) {
        let mut st = self.lock();
        st.durable.clear();
        st.current.clear();
        st.pending.clear();
    }

    /// Power cut: F8 decides which unflushed writes survive, F9 tears survivors between
    /// sectors; the rest is lost. Returns how many writes were pending.
    pub(crate) fn crash(&self, f8: f64, f9: f64) -> u64 {
        let mut st = self.lock();
        let pending = std::mem::take(&mut st.pending);
        let n = pending.len() as u64;
        let len = st.current.len();
        let mut media = std::mem::take(&mut st.durable);
        media.resize(len, 0);
        for (off, data) in pending {
            if !st.rng.chance(f8) {
                *st.injected.entry(Fault::F8).or_default() += 1;
                continue;
            }
            let tear = st.rng.chance(f9);
            if tear {
                *st.injected.entry(Fault::F9).or_default() += 1;
            }
            for (i, chunk) in data.chunks(SECTOR).enumerate() {
                if tear && st.rng.chance(0.5) {
                    continue;
                }
                let at = off as usize + i * SECTOR;
                media[at..at + chunk.len()].copy_from_slice(chunk);
            }
        }
        st.current = media.clone();
        st.durable = media;
        n
    }

    fn len(&self) -> u64 {
        self.lock().current.len() as u64
    }
}

/// Virtual latency of one disk request (so concurrent guest requests interleave).
async fn flush_latency(disk: &ImageDisk) {
    let (a, b) = disk.flush_us;
    if b == 0 {
        return;
    }
    let us = disk.lock().lat.range(a, b);
    tokio::time::sleep(Duration::from_micros(us)).await;
}

async fn latency(disk: &ImageDisk) {
    let (a, b) = disk.lat_us;
    if b == 0 {
        return;
    }
    let us = disk.lock().lat.range(a, b);
    tokio::time::sleep(Duration::from_micros(us)).await;
}

#[async_trait]
impl BlockDevice for ImageDisk {
    fn driver(&self) -> &'static str {
        "imagedisk"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.len())
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        latency(self).await;
        let st = self.lock();
        check_request(st.current.len() as u64, 1, offset, len as u64, Access::Read)?;
        Ok(Bytes::copy_from_slice(
            &st.current[offset as usize..offset as usize + len],
        ))
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        latency(self).await;
        self.write_now(offset, data, flags)
    }

    async fn flush(&self) -> Result<()> {
        latency(self).await;
        self.flush_now();
        Ok(())
    }

    async fn grow(&self, length: u64) -> Result<()> {
        self.grow_now(length);
        Ok(())
    }

    fn grows_with_zeroes(&self) -> bool {
        true
    }
}

impl ImageDisk {
    fn write_now(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let mut st = self.lock();
        check_request(
            st.current.len() as u64,
            1,
            offset,
            data.len() as u64,
            Access::Write,
        )?;
        if st.rng.chance(self.f5) {
            // F5: applied none, all, or a random subset of sectors.
            *st.injected.entry(Fault::F5).or_default() += 1;
            let how = st.rng.below(3);
            for (i, chunk) in data.chunks(SECTOR).enumerate() {
                let apply = match how {
                    0 => false,
                    1 => true,
                    _ => st.rng.chance(0.5),
                };
                if apply {
                    let at = offset as usize + i * SECTOR;
                    st.current[at..at + chunk.len()].copy_from_slice(chunk);
                    st.pending.push((at as u64, chunk.to_vec()));
                }
            }
            return Err(Error::new(
                ErrorKind::Io,
                format!("F5 on the image file at {offset}+{}", data.len()),
            ));
        }
        let at = offset as usize;
        st.current[at..at + data.len()].copy_from_slice(&data);
        st.pending.push((offset, data.to_vec()));
        if flags.fua {
            st.commit_pending();
        }
        Ok(())
    }

    fn flush_now(&self) {
        self.lock().commit_pending();
    }

    fn grow_now(&self, length: u64) {
        let mut st = self.lock();
        if (st.current.len() as u64) < length {
            // The new length is metadata the next flush makes durable; a crash before it keeps
            // the bytes (a sparse file's size is journaled with the data it covers).
            st.current.resize(length as usize, 0);
            st.durable.resize(length as usize, 0);
        }
    }
}

/// Opens the qcow2 image in `file` as node `node` (`what` names it in messages) with small
/// caches, over `backing` when it has one.
pub(crate) async fn open_named(
    file: &Device,
    backing: &Option<Device>,
    node: &str,
    what: &str,
    read_only: bool,
) -> std::result::Result<Qcow2, String> {
    let h = Qcow2::read_header(file, what)
        .await
        .map_err(|e| e.to_string())?;
    Qcow2::open(
        node,
        what,
        file.clone(),
        h,
        backing.clone(),
        Qcow2Options {
            read_only,
            discard_unmap: true,
            // Small caches: evictions and write-backs under pressure happen too.
            l2_cache_bytes: 64 << 10,
            refcount_cache_bytes: 16 << 10,
        },
    )
    .await
    .map_err(|e| e.to_string())
}

/// I21 and I22 on an image after a power cut: its header reads, and its refcounts, checked
/// on `file`'s bytes by `ballot::drivers::qcow2::check`, are never below the references.
/// Returns the leaked clusters (allowed: a cut may leak). `when` opens each failure's text
/// ("after crash 3", "after a crash").
pub(crate) async fn check_after_cut(
    file: &Device,
    what: &str,
    when: &str,
) -> std::result::Result<u64, (Rule, String)> {
    let h = Qcow2::read_header(file, what)
        .await
        .map_err(|e| (Rule::I21, format!("{when}: {what} does not open: {e}")))?;
    let report = check(file, &h).await.map_err(|e| {
        (
            Rule::I22,
            format!("{when}: the check of {what} failed: {e}"),
        )
    })?;
    if !report.is_consistent() {
        return Err((
            Rule::I22,
            format!(
                "{when}: {what} has refcounts below references: {}",
                report.messages.join("; ")
            ),
        ));
    }
    Ok(report.leaks)
}
