//! The metadata node at run time (HEALING.md H19–H23): what makes a quorum's out-of-sync
//! record and its write intent survive a crash of this process. [`metadata`](super::metadata)
//! is the on-disk format; this is the I/O.
//!
//! - **Group commit (H20).** Every change that must be durable is a *generation*: a caller
//!   records what it needs (an intent bit, an out-of-sync page) and waits until a commit that
//!   began after that has written and flushed it. One caller at a time leads a commit; the
//!   others wait for it, so concurrent writes into cold extents share one metadata write and
//!   one flush.
//! - **A commit** writes every changed page of the bitmaps, flushes, then (when the header
//!   changed) writes the header into the slot the newest durable header is not in and flushes
//!   again. The header's sequence number advances only after its flush succeeded, so a
//!   failed or torn header write is retried into the same slot and the other slot always holds
//!   the newest durable header.
//! - **Intent (H21).** `want` is what the intent bitmap should hold, `disk` what is known to
//!   be set on the media (a lower bound: a bit being cleared leaves `disk` when the commit
//!   that clears it starts). A write passes without waiting when every extent it touches is
//!   set in `disk`. The cooler clears an extent once it has had no write in flight for
//!   `intent-cold`, or when more than `intent-extents` are hot (least recently used first),
//!   after a flush of every child that began after the extent's last write completed, and
//!   after the out-of-sync pages that flush may have marked are durable.
//! - **Out of sync (H21).** The children's records note which 4 KiB pages of their bitmap
//!   changed; a commit writes those pages from the record as it stands. `Inner::marks` counts
//!   growths of any O_c: a request that grew one waits for a commit that began after it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::metadata::{
    self, ChildInfo, Header, Layout, ALIGN_BYTES, INTENT_EXTENT_BYTES, SLOT_BYTES,
};
use super::sync::{GRANULE_BYTES, PAGE_GRANULES};
use super::{Child, Inner};
use crate::device::{Device, WriteFlags};
use crate::error::{ConfigError, Error, ErrorKind, Result};
use crate::join::{join_all_with, BoxFuture};

/// H21's `intent-cold` default.
pub const INTENT_COLD_DEFAULT: Duration = Duration::from_secs(5);
/// H21's `intent-extents` default (4 GiB of 4 MiB extents).
pub const INTENT_EXTENTS_DEFAULT: usize = 1024;

/// Words of the intent bitmap in one 4 KiB page.
const PAGE_WORDS: usize = (ALIGN_BYTES / 8) as usize;

/// The quorum options that concern its metadata node (H19, H21, H23).
#[derive(Debug, Clone)]
pub struct MetadataOptions {
    /// `intent-cold`.
    pub intent_cold: Duration,
    /// `intent-extents`.
    pub intent_extents: usize,
    /// `metadata-reset=on`.
    pub reset: bool,
}

impl Default for MetadataOptions {
    fn default() -> MetadataOptions {
        MetadataOptions {
            intent_cold: INTENT_COLD_DEFAULT,
            intent_extents: INTENT_EXTENTS_DEFAULT,
            reset: false,
        }
    }
}

/// What opening a metadata node found (H22, H23).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenState {
    /// A clean shutdown: the recorded out-of-sync granules are loaded, nothing else.
    Clean,
    /// Not shut down cleanly: `extents` intent extents became out of sync on every child
    /// and a resync with `recover=lowest` runs (H22).
    Recovered {
        /// Intent extents found set.
        extents: u64,
    },
    /// Never formatted (both header slots all zeroes), or `metadata-reset=on`: every granule
    /// of every child is out of sync (a full compare, H8, H23).
    Fresh,
}

#[derive(Debug, Clone, Copy)]
struct Hot {
    /// Writes into the extent that have passed the intent check and not completed.
    inflight: u32,
    /// When the last write into it started or completed (coldness).
    last: Instant,
    /// `DState::ends` when the last write into it completed (flush coverage).
    last_end: u64,
}

#[derive(Debug)]
struct DState {
    /// The newest durable header.
    header: Header,
    /// The header must be rewritten (clean flag, children).
    header_dirty: bool,
    /// The clean flag the next header carries.
    want_clean: bool,
    layout: Layout,
    want: Vec<u64>,
    disk: Vec<u64>,
    /// Write every intent page at the next commit (a fresh node, a new layout).
    intent_all: bool,
    hot: HashMap<u64, Hot>,
    /// Completed writes, counted.
    ends: u64,
    gen_next: u64,
    committed: u64,
    failed: Option<(u64, ErrorKind)>,
    committing: bool,
    /// H22: granules of the intent extents found at open.
    recovered: super::sync::GranuleSet,
}

/// A quorum's metadata node, open.
#[derive(Debug)]
pub struct Durable {
    /// The metadata node's node-name.
    pub node_name: String,
    dev: Device,
    dev_len: u64,
    cold: Duration,
    max_hot: usize,
    st: Mutex<DState>,
    /// A commit ended.
    done: Notify,
    /// The cooler should look now (too many hot extents, shutdown).
    wake: Notify,
    /// `Inner::marks` when the last successful commit began.
    persisted_marks: AtomicU64,
}

fn bit(words: &[u64], e: u64) -> bool {
    words
        .get((e / 64) as usize)
        .is_some_and(|w| w & (1 << (e % 64)) != 0)
}

fn set_bit(words: &mut [u64], e: u64, on: bool) {
    if let Some(w) = words.get_mut((e / 64) as usize) {
        if on {
            *w |= 1 << (e % 64);
        } else {
            *w &= !(1 << (e % 64));
        }
    }
}

/// The header's record of `children` (H20, H23 compares it at open).
fn child_infos(children: &[Child], length: u64) -> Vec<ChildInfo> {
    children
        .iter()
        .map(|c| ChildInfo {
            node_name: c.node_name.clone(),
            length,
        })
        .collect()
}

fn md_error(node: &str, what: &str, e: &Error) -> Error {
    Error::new(e.kind(), format!("metadata node '{node}': {what}: {e}"))
}

/// Clears the leader flag and wakes the waiters even if the leader's future is dropped.
struct Leading<'a>(&'a Durable);

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        self.0.state().committing = false;
        self.0.done.notify_waiters();
    }
}

/// A write's claim on its intent extents (H21): while alive, the extents cannot be cleared.
#[derive(Debug)]
pub struct IntentGuard {
    durable: Arc<Durable>,
    first: u64,
    end: u64,
}

impl Drop for IntentGuard {
    fn drop(&mut self) {
        let mut d = self.durable.state();
        d.ends += 1;
        let (now, ends) = (Instant::now(), d.ends);
        for e in self.first..self.end {
            if let Some(h) = d.hot.get_mut(&e) {
                h.inflight = h.inflight.saturating_sub(1);
                h.last = now;
                h.last_end = ends;
            }
        }
    }
}

impl Durable {
    fn state(&self) -> MutexGuard<'_, DState> {
        self.st.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation a change recorded now is written by.
    fn next_gen(&self) -> u64 {
        self.state().gen_next
    }

    /// Intent extents set now (in `want`), for `x-query-quorum-out-of-sync` and tests.
    pub fn hot_extents(&self) -> u64 {
        self.state()
            .want
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// H22: the granules of the intent extents found set at open (empty after a clean
    /// shutdown).
    pub(crate) fn recovered(&self) -> super::sync::GranuleSet {
        self.state().recovered.clone()
    }

    /// Whether the newest durable header carries the clean flag.
    pub fn clean_on_disk(&self) -> bool {
        self.state().header.clean
    }

    /// Opens the metadata node `dev` (node-name `node_name`) for `q`, whose children are
    /// `children` (in child order; their records are still empty but for H8's marks), and
    /// loads or formats it (H19–H23). The caller starts the recovery resync.
    ///
    /// # Errors
    /// The node is too small, has no valid header (and is not blank), does not match the
    /// quorum (length, child count, names), or cannot be read or written: each named, with
    /// the way out (`ballot metadata create`, `metadata-reset=on`).
    pub(crate) async fn open(
        q: &Inner,
        children: &[Child],
        node_name: &str,
        dev: Device,
        opts: &MetadataOptions,
    ) -> std::result::Result<(Arc<Durable>, OpenState), ConfigError> {
        let qname = &q.opts.node_name;
        let cfg = |m: String| ConfigError::new(format!("quorum '{qname}': {m}"));
        let n = children.len() as u64;
        let layout = Layout {
            disk_len: q.length,
            children: n,
            granule: GRANULE_BYTES,
        };
        let names: Vec<String> = children.iter().map(|c| c.node_name.clone()).collect();
        let dev_len = dev
            .length()
            .map_err(|e| cfg(format!("metadata node '{node_name}': {e}")))?;
        if dev_len < layout.total_bytes() {
            return Err(cfg(format!(
                "metadata node '{node_name}' holds {dev_len} bytes; {n} children of {} bytes need {}: create it with `ballot metadata create FILE --size {} --children {}`",
                q.length,
                layout.total_bytes(),
                q.length,
                names.join(",")
            )));
        }
        let slots = dev.read(0, (2 * SLOT_BYTES) as usize).await.map_err(|e| {
            cfg(format!(
                "metadata node '{node_name}': reading the header: {e}"
            ))
        })?;
        let blank = slots.iter().all(|&b| b == 0);
        let decoded = metadata::read_slots(&slots);
        let found = decoded.as_ref().ok().cloned();
        let wanted = Header {
            seq: found.as_ref().map_or(0, |h| h.seq),
            disk_len: q.length,
            granule: GRANULE_BYTES as u32,
            extent: INTENT_EXTENT_BYTES as u32,
            clean: false,
            children: child_infos(children, q.length),
        };
        // Refused before anything is written: the header would not fit.
        wanted.encode().map_err(cfg)?;
        let fresh = opts.reset || blank;
        if !fresh {
            let h = match &decoded {
                Ok(h) => h,
                Err(why) => {
                    return Err(cfg(format!(
                        "metadata node '{node_name}' has no valid header ({why}); metadata-reset=on starts over with a full compare"
                    )))
                }
            };
            let mismatch = if h.disk_len != q.length {
                Some(format!(
                    "it records a disk of {} bytes, the quorum has {}",
                    h.disk_len, q.length
                ))
            } else if u64::from(h.granule) != GRANULE_BYTES
                || u64::from(h.extent) != INTENT_EXTENT_BYTES
            {
                Some(format!(
                    "it records granule {} and extent {}, this ballot uses {GRANULE_BYTES} and {INTENT_EXTENT_BYTES}",
                    h.granule, h.extent
                ))
            } else if h.children.len() != children.len() {
                Some(format!(
                    "it records {} children ({}), the quorum has {} ({})",
                    h.children.len(),
                    h.children
                        .iter()
                        .map(|c| c.node_name.as_str())
                        .collect::<Vec<_>>()
                        .join(","),
                    children.len(),
                    names.join(",")
                ))
            } else {
                h.children
                    .iter()
                    .zip(&names)
                    .enumerate()
                    .find(|(_, (c, name))| &c.node_name != *name)
                    .map(|(i, (c, name))| {
                        format!(
                            "it records child {i} as '{}', the quorum's is '{name}'",
                            c.node_name
                        )
                    })
            };
            if let Some(m) = mismatch {
                return Err(cfg(format!(
                    "metadata node '{node_name}' does not match: {m}; metadata-reset=on starts over with a full compare"
                )));
            }
        }
        let words = layout.extents().div_ceil(64) as usize;
        let mut disk = vec![0u64; words];
        let mut recovered = super::sync::GranuleSet::default();
        let state;
        if fresh {
            for c in children {
                q.update(c, |s| s.mark_all(q.granules()));
            }
            state = OpenState::Fresh;
        } else {
            let read = |off: u64, len: u64| {
                let dev = dev.clone();
                async move {
                    dev.read(off, len as usize).await.map_err(|e| {
                        cfg(format!(
                            "metadata node '{node_name}': reading its bitmaps: {e}"
                        ))
                    })
                }
            };
            for (i, c) in children.iter().enumerate() {
                let bits = read(layout.oos_offset(i as u64), layout.oos_bytes()).await?;
                q.update(c, |s| {
                    s.load_out_of_sync(&bits, layout.granules());
                });
            }
            let intent = read(layout.intent_offset(), layout.intent_bytes()).await?;
            for (w, chunk) in intent.chunks(8).take(words).enumerate() {
                let mut b = [0u8; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                disk[w] = u64::from_le_bytes(b);
            }
            let extents = layout.extents();
            if extents % 64 != 0 {
                if let Some(last) = disk.last_mut() {
                    *last &= (1u64 << (extents % 64)) - 1;
                }
            }
            let clean = found.as_ref().is_some_and(|h| h.clean);
            if clean {
                state = OpenState::Clean;
            } else {
                // H22: every granule of every intent extent is out of sync on every child.
                let per = INTENT_EXTENT_BYTES / GRANULE_BYTES;
                let mut set = 0;
                for e in 0..extents {
                    if bit(&disk, e) {
                        set += 1;
                        let end = ((e + 1) * per).min(q.granules());
                        recovered.insert_range(e * per, end);
                        for c in children {
                            q.update(c, |s| s.mark(e * per, end));
                        }
                    }
                }
                state = OpenState::Recovered { extents: set };
            }
        }
        let durable = Arc::new(Durable {
            node_name: node_name.to_string(),
            dev,
            dev_len,
            cold: opts.intent_cold,
            max_hot: opts.intent_extents.max(1),
            st: Mutex::new(DState {
                header: found.unwrap_or_else(|| wanted.clone()),
                header_dirty: true,
                want_clean: false,
                layout,
                want: disk.clone(),
                disk,
                intent_all: fresh,
                hot: HashMap::new(),
                ends: 0,
                gen_next: 1,
                committed: 0,
                failed: None,
                committing: false,
                recovered,
            }),
            done: Notify::new(),
            wake: Notify::new(),
            persisted_marks: AtomicU64::new(0),
        });
        {
            // The header to write: this quorum's children, not clean (H23: cleared before the
            // first write after open).
            let mut d = durable.state();
            let seq = d.header.seq;
            d.header = Header {
                seq,
                clean: d.header.clean && !fresh,
                ..wanted
            };
            if fresh {
                // Nothing of the old node is trusted: every intent page is rewritten.
                d.want.iter_mut().for_each(|w| *w = 0);
            }
        }
        let g = durable.next_gen();
        durable
            .commit_until(q, children, g)
            .await
            .map_err(|e| cfg(e.to_string()))?;
        if let OpenState::Recovered { .. } = state {
            // The marks are durable: the intent bits have done their job.
            durable.state().want.iter_mut().for_each(|w| *w = 0);
            let g = durable.next_gen();
            durable
                .commit_until(q, children, g)
                .await
                .map_err(|e| cfg(e.to_string()))?;
        }
        Ok((durable, state))
    }

    /// H21: marks the extents `[offset, offset + len)` touches before a guest write reaches
    /// any child; waits for the metadata write when one of them is cold.
    ///
    /// # Errors
    /// The metadata node could not be written or flushed: the write must not go ahead.
    pub(crate) async fn begin_write(
        self: &Arc<Self>,
        q: &Inner,
        children: &[Child],
        offset: u64,
        len: u64,
    ) -> Result<IntentGuard> {
        let first = offset / INTENT_EXTENT_BYTES;
        let end = offset
            .saturating_add(len.max(1))
            .div_ceil(INTENT_EXTENT_BYTES);
        let (need, over) = {
            let mut d = self.state();
            let now = Instant::now();
            let mut need = false;
            for e in first..end {
                let h = d.hot.entry(e).or_insert(Hot {
                    inflight: 0,
                    last: now,
                    last_end: 0,
                });
                h.inflight += 1;
                h.last = now;
                set_bit(&mut d.want, e, true);
                need |= !bit(&d.disk, e);
            }
            if d.header.clean || d.want_clean {
                // H23: the clean flag goes before the first write.
                d.want_clean = false;
                d.header_dirty = true;
                need = true;
            }
            let over = d.hot.len() > self.max_hot;
            (need.then_some(d.gen_next), over)
        };
        let guard = IntentGuard {
            durable: self.clone(),
            first,
            end,
        };
        if over {
            self.wake.notify_one();
        }
        if let Some(g) = need {
            self.commit_until(q, children, g).await?;
        }
        Ok(guard)
    }

    /// H21: makes every out-of-sync mark made so far durable, unless a commit that began
    /// after them already did.
    ///
    /// # Errors
    /// The metadata node could not be written or flushed.
    pub(crate) async fn persist_marks(&self, q: &Inner, children: &[Child]) -> Result<()> {
        let m = q.marks.load(Ordering::SeqCst);
        if m <= self.persisted_marks.load(Ordering::SeqCst) {
            return Ok(());
        }
        let g = self.next_gen();
        self.commit_until(q, children, g).await
    }

    /// Waits until generation `g` is durable, leading the commit when nobody else is.
    async fn commit_until(&self, q: &Inner, children: &[Child], g: u64) -> Result<()> {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            let lead = {
                let mut d = self.state();
                if d.committed >= g {
                    return Ok(());
                }
                if let Some((fg, kind)) = d.failed {
                    if fg >= g {
                        return Err(Error::new(
                            kind,
                            format!(
                                "quorum '{}': metadata node '{}' could not be updated",
                                q.opts.node_name, self.node_name
                            ),
                        ));
                    }
                }
                if d.committing {
                    notified.as_mut().enable();
                    false
                } else {
                    d.committing = true;
                    true
                }
            };
            if lead {
                let _lead = Leading(self);
                if let Err(e) = self.commit_once(q, children).await {
                    q.host
                        .warn(&format!("ballot: quorum '{}': {e}", q.opts.node_name));
                }
            } else {
                notified.await;
            }
        }
    }

    /// One commit: changed bitmap pages, flush, header (if changed), flush.
    async fn commit_once(&self, q: &Inner, children: &[Child]) -> Result<()> {
        let (gen, start_marks, layout, intent_pages, header, all) = {
            let mut d = self.state();
            let gen = d.gen_next;
            d.gen_next += 1;
            let start_marks = q.marks.load(Ordering::SeqCst);
            let mut pages = Vec::new();
            let all = std::mem::take(&mut d.intent_all);
            let pages_n = (d.layout.intent_bytes() / ALIGN_BYTES) as usize;
            for p in 0..pages_n {
                let lo = (p * PAGE_WORDS).min(d.want.len());
                let hi = ((p + 1) * PAGE_WORDS).min(d.want.len());
                if all || d.want[lo..hi] != d.disk[lo..hi] {
                    let snap = d.want[lo..hi].to_vec();
                    for (k, w) in (lo..hi).enumerate() {
                        d.disk[w] &= snap[k];
                    }
                    pages.push((p, snap));
                }
            }
            let header = d.header_dirty.then(|| {
                d.header_dirty = false;
                Header {
                    seq: d.header.seq + 1,
                    clean: d.want_clean,
                    ..d.header.clone()
                }
            });
            (gen, start_marks, d.layout, pages, header, all)
        };
        let mut oos: Vec<(usize, u64, Vec<u8>)> = Vec::new();
        for (i, c) in children.iter().enumerate() {
            let mut s = c.sync();
            for p in s.take_dirty_pages() {
                oos.push((i, p, s.page_bytes(p)));
            }
        }
        let r = self
            .write_out(&layout, &oos, &intent_pages, header.as_ref())
            .await;
        let mut d = self.state();
        match &r {
            Ok(()) => {
                for (p, snap) in &intent_pages {
                    for (k, w) in snap.iter().enumerate() {
                        d.disk[p * PAGE_WORDS + k] |= w;
                    }
                }
                if let Some(h) = header {
                    d.header = h;
                }
                d.committed = d.committed.max(gen);
                self.persisted_marks
                    .fetch_max(start_marks, Ordering::SeqCst);
            }
            Err(e) => {
                d.failed = Some((gen, e.kind()));
                if header.is_some() {
                    d.header_dirty = true;
                }
                d.intent_all |= all;
                drop(d);
                for (i, p, _) in &oos {
                    children[*i].sync().redirty(&[*p]);
                }
            }
        }
        r
    }

    async fn write_out(
        &self,
        layout: &Layout,
        oos: &[(usize, u64, Vec<u8>)],
        intent: &[(usize, Vec<u64>)],
        header: Option<&Header>,
    ) -> Result<()> {
        let node = &self.node_name;
        let mut writes: Vec<(u64, Bytes)> = Vec::with_capacity(oos.len() + intent.len());
        for (i, p, bytes) in oos {
            writes.push((
                layout.oos_offset(*i as u64) + p * (PAGE_GRANULES / 8),
                Bytes::copy_from_slice(bytes),
            ));
        }
        for (p, words) in intent {
            let mut b = vec![0u8; ALIGN_BYTES as usize];
            for (k, w) in words.iter().enumerate() {
                b[k * 8..k * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            writes.push((
                layout.intent_offset() + *p as u64 * ALIGN_BYTES,
                Bytes::from(b),
            ));
        }
        if !writes.is_empty() {
            let futs: Vec<BoxFuture<'_, Result<()>>> = writes
                .into_iter()
                .map(|(off, b)| self.dev.write(off, b, WriteFlags::NONE))
                .collect();
            for r in join_all_with(futs, |_, _| {}).await {
                r.map_err(|e| md_error(node, "bitmap write failed", &e))?;
            }
            self.dev
                .flush()
                .await
                .map_err(|e| md_error(node, "flush failed", &e))?;
        }
        if let Some(h) = header {
            let bytes = h.encode().map_err(|m| {
                Error::new(ErrorKind::Inval, format!("metadata node '{node}': {m}"))
            })?;
            self.dev
                .write(h.slot() * SLOT_BYTES, Bytes::from(bytes), WriteFlags::NONE)
                .await
                .map_err(|e| md_error(node, "header write failed", &e))?;
            self.dev
                .flush()
                .await
                .map_err(|e| md_error(node, "flush failed", &e))?;
        }
        Ok(())
    }

    /// The cooler (H21): clears intent extents that went cold, or the least recently used
    /// ones when too many are hot, and writes out-of-sync pages that changed in the
    /// background (a resync's clears). Ends when the quorum is gone.
    pub(crate) async fn cool(self: Arc<Self>, q: Weak<Inner>) {
        let tick = (self.cold / 2).clamp(Duration::from_millis(100), Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = self.wake.notified() => {}
            }
            let Some(q) = q.upgrade() else {
                return;
            };
            self.cool_once(&q).await;
        }
    }

    /// One look of the cooler.
    pub(crate) async fn cool_once(&self, q: &Inner) {
        let st = q.children.read().await;
        let candidates: Vec<u64> = {
            let d = self.state();
            let now = Instant::now();
            let mut idle: Vec<(Instant, u64)> = d
                .hot
                .iter()
                .filter(|(_, h)| h.inflight == 0)
                .map(|(e, h)| (h.last, *e))
                .collect();
            idle.sort_unstable();
            let over = d.hot.len().saturating_sub(self.max_hot);
            idle.iter()
                .enumerate()
                .filter(|(k, (last, _))| *k < over || now.duration_since(*last) >= self.cold)
                .map(|(_, (_, e))| *e)
                .collect()
        };
        if candidates.is_empty() {
            if st.list.iter().any(|c| c.sync().has_dirty_pages()) {
                let g = self.next_gen();
                let _ = self.commit_until(q, &st.list, g).await;
            }
            return;
        }
        let flushed_from = self.state().ends;
        // Every child flushes: what was written into these extents is on its media, or (a
        // failed flush, a lost cache) out of sync on it (H7).
        q.flush_all(&st.list).await;
        let g = self.next_gen();
        if self.commit_until(q, &st.list, g).await.is_err() {
            return;
        }
        {
            let mut d = self.state();
            for e in candidates {
                if d.hot
                    .get(&e)
                    .is_some_and(|h| h.inflight == 0 && h.last_end <= flushed_from)
                {
                    d.hot.remove(&e);
                    set_bit(&mut d.want, e, false);
                }
            }
        }
        let g = self.next_gen();
        let _ = self.commit_until(q, &st.list, g).await;
    }

    /// H23: the clean shutdown's metadata half, once the caller has flushed every child:
    /// out-of-sync marks durable, the intent bitmap cleared, then the clean flag.
    ///
    /// # Errors
    /// A metadata write or flush failed: the node stays unclean (the next open recovers).
    pub(crate) async fn close(&self, q: &Inner, children: &[Child]) -> Result<()> {
        let g = self.next_gen();
        self.commit_until(q, children, g).await?;
        {
            let mut d = self.state();
            if d.hot.values().any(|h| h.inflight > 0) {
                return Err(Error::new(
                    ErrorKind::Busy,
                    format!("quorum '{}': writes still in flight", q.opts.node_name),
                ));
            }
            d.hot.clear();
            d.want.iter_mut().for_each(|w| *w = 0);
            d.want_clean = true;
            d.header_dirty = true;
        }
        let g = self.next_gen();
        self.commit_until(q, children, g).await
    }

    /// Hot add and remove (Q53, Q54) with a metadata node: the layout changes (one bitmap
    /// per child, the intent bitmap after them). Crash-safe order: (1) every intent bit set
    /// under the old layout, so that an old header read back after a crash recovers
    /// everything whatever the bitmaps hold; (2) `change` applied to the children, every
    /// bitmap and the intent bitmap written in the new layout, then the new header; (3) the
    /// intent bits back to what is hot.
    ///
    /// # Errors
    /// The node has no room for `new_count` children, or the first metadata write failed:
    /// nothing changed. A failure after the change is not an error: the change stands and the
    /// commits that follow retry the new layout.
    pub(crate) async fn relayout<R>(
        &self,
        q: &Inner,
        list: &mut Vec<Child>,
        new_count: usize,
        change: impl FnOnce(&mut Vec<Child>) -> R,
    ) -> std::result::Result<R, String> {
        let new_layout = Layout {
            children: new_count as u64,
            ..self.state().layout
        };
        if new_layout.total_bytes() > self.dev_len {
            return Err(format!(
                "metadata node '{}' holds {} bytes, {new_count} children need {}: recreate it with `ballot metadata create FILE --size {} --children ... --max-children {new_count}`",
                self.node_name,
                self.dev_len,
                new_layout.total_bytes(),
                q.length
            ));
        }
        let before = {
            let mut d = self.state();
            let keep = d.want.clone();
            d.want.iter_mut().for_each(|w| *w = u64::MAX);
            keep
        };
        let g = self.next_gen();
        if let Err(e) = self.commit_until(q, list, g).await {
            self.state().want = before;
            return Err(e.to_string());
        }
        let r = change(list);
        {
            let mut d = self.state();
            d.layout = new_layout;
            d.intent_all = true;
            d.header_dirty = true;
            d.header.children = child_infos(list, q.length);
        }
        let pages = q.granules().div_ceil(PAGE_GRANULES);
        for c in list.iter() {
            c.sync().redirty(&(0..pages).collect::<Vec<_>>());
        }
        let g = self.next_gen();
        let written = self.commit_until(q, list, g).await;
        {
            // Back to the extents that are hot (some may have become hot meanwhile).
            let mut d = self.state();
            let mut want = vec![0u64; d.want.len()];
            for e in d.hot.keys().copied().collect::<Vec<_>>() {
                set_bit(&mut want, e, true);
            }
            d.want = want;
        }
        if let Err(e) = written {
            // The change stands (the children are what the caller asked for); the intent is
            // all set under the old layout, and the next commits retry the new one.
            q.host.warn(&format!(
                "ballot: quorum '{}': {e}; retried",
                q.opts.node_name
            ));
        }
        let g = self.next_gen();
        let _ = self.commit_until(q, list, g).await;
        Ok(r)
    }
}

/// What `ballot metadata show` prints of a metadata node (H19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The newest valid header.
    pub header: Header,
    /// The slot it is in.
    pub slot: u64,
    /// Intent extents set.
    pub dirty_extents: Vec<u64>,
    /// Per child: out-of-sync granules and their bytes (the last granule clipped).
    pub out_of_sync: Vec<(u64, u64)>,
}

/// Reads a metadata node's image `bytes` (the whole file).
///
/// # Errors
/// No valid header (each slot's reason), or a file shorter than its layout.
pub fn summarize(bytes: &[u8]) -> std::result::Result<Summary, String> {
    if bytes.len() < (2 * SLOT_BYTES) as usize {
        return Err(format!(
            "{} bytes is shorter than the two header slots ({} bytes)",
            bytes.len(),
            2 * SLOT_BYTES
        ));
    }
    let header = metadata::read_slots(bytes).map_err(|why| format!("no valid header ({why})"))?;
    let layout = Layout {
        disk_len: header.disk_len,
        children: header.children.len() as u64,
        granule: u64::from(header.granule),
    };
    if header.granule == 0 || (bytes.len() as u64) < layout.total_bytes() {
        return Err(format!(
            "the file holds {} bytes, its header describes {}",
            bytes.len(),
            layout.total_bytes()
        ));
    }
    let count = |off: u64, bits: u64| -> Vec<u64> {
        let mut out = Vec::new();
        for i in 0..bits {
            let b = bytes[(off + i / 8) as usize];
            if b & (1 << (i % 8)) != 0 {
                out.push(i);
            }
        }
        out
    };
    let g = layout.granule;
    let out_of_sync = (0..layout.children)
        .map(|i| {
            let set = count(layout.oos_offset(i), layout.granules());
            let bytes = set
                .iter()
                .map(|&k| ((k + 1) * g).min(header.disk_len) - k * g)
                .sum();
            (set.len() as u64, bytes)
        })
        .collect();
    Ok(Summary {
        slot: header.slot(),
        dirty_extents: count(layout.intent_offset(), layout.extents()),
        out_of_sync,
        header,
    })
}
