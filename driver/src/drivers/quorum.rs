//! `quorum`: N replicas of one disk, written together and voted on when read.
//!
//! Implements every rule of QUORUM.md: open-time validation (Q7–Q15), quorum-pattern reads with
//! the fast compare path and the SHA-256 vote (Q16–Q28), fifo reads (Q29–Q32), blkverify
//! (Q33–Q35), writes, write-zeroes and FUA (Q36–Q40), the flush vote (Q41), length (Q42),
//! block status (Q43–Q44), discard (Q45–Q46), out-of-sync tracking (Q47–Q51), hot add and
//! remove (Q52–Q56) and events (Q57–Q61); the differences from QEMU D1–D6; and ballot's D7–D8:
//! overlapping guest requests are ordered, so a read sees every child at the same point and a
//! repair never races a guest write.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::RwLock;

use crate::device::{
    check_request, Access, BlockDevice, BlockStatus, Device, WriteFlags, ZeroFlags,
};
use crate::error::{ConfigError, Error, ErrorKind, Result};
use crate::events::{sectors, Event, IoType};
use crate::host::Host;
use crate::join::{join_all_with, BoxFuture};

use crate::rangelock::{OrderedGuard, OrderedRangeLock};

/// `read-pattern`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPattern {
    /// Read every child and vote (§4).
    Quorum,
    /// Read children one after another until one answers (§5).
    Fifo,
}

/// The options of a quorum node (§2).
#[derive(Debug, Clone)]
pub struct QuorumOptions {
    /// `node-name`, used as `reference` in `QUORUM_FAILURE`.
    pub node_name: String,
    /// `vote-threshold` (t).
    pub threshold: usize,
    /// `read-pattern`.
    pub read_pattern: ReadPattern,
    /// `rewrite-corrupted`.
    pub rewrite_corrupted: bool,
    /// `blkverify`.
    pub blkverify: bool,
    /// `read-only`: writes, write-zeroes and discards fail with EPERM. Rewrites still happen.
    pub read_only: bool,
    /// `discard=unmap`: discards may be forwarded (Q46); with `ignore` they do nothing.
    pub discard_unmap: bool,
}

impl QuorumOptions {
    /// Node `node_name` with `vote-threshold` t and §2's defaults for everything else:
    /// `read-pattern=quorum`, `rewrite-corrupted=off`, `blkverify=off`, writable, and QEMU's
    /// default `discard=ignore`.
    pub fn new(node_name: impl Into<String>, threshold: usize) -> QuorumOptions {
        QuorumOptions {
            node_name: node_name.into(),
            threshold,
            read_pattern: ReadPattern::Quorum,
            rewrite_corrupted: false,
            blkverify: false,
            read_only: false,
            discard_unmap: false,
        }
    }
}

/// Out-of-sync granularity (Q47).
pub const OUT_OF_SYNC_GRANULARITY_BYTES: u64 = 64 * 1024;

/// Checks Q7–Q12 for `children` children, in the order QUORUM.md §3 gives. Run before any
/// child is opened (Q13 comes after).
///
/// # Errors
/// QEMU's message for the first failed check.
pub fn validate(
    children: usize,
    threshold: i64,
    pattern: ReadPattern,
    rewrite_corrupted: bool,
    blkverify: bool,
) -> Result<(), ConfigError> {
    if children == 0 {
        return Err(ConfigError::new(
            "Number of provided children must be 1 or more",
        ));
    }
    if threshold < 1 {
        return Err(ConfigError::new(
            "Parameter 'vote-threshold' expects a value >= 1",
        ));
    }
    if threshold as u64 > children as u64 {
        return Err(ConfigError::new("threshold may not exceed children count"));
    }
    if blkverify && pattern == ReadPattern::Fifo {
        // D2: QEMU silently ignores blkverify in fifo mode.
        return Err(ConfigError::new(
            "blkverify=on cannot be used with read-pattern=fifo",
        ));
    }
    if blkverify && (children != 2 || threshold != 2) {
        return Err(ConfigError::new(
            "blkverify=on can only be set if there are exactly two files and vote-threshold is 2",
        ));
    }
    if blkverify && rewrite_corrupted {
        return Err(ConfigError::new(
            "rewrite-corrupted=on cannot be used with blkverify=on",
        ));
    }
    Ok(())
}

/// Per-child record of ranges a write, discard or rewrite failed on (Q47–Q50): start → end,
/// aligned to 64 KiB (the end clipped to the disk length), merged, sorted.
#[derive(Debug, Default)]
struct OutOfSync {
    ranges: BTreeMap<u64, u64>,
}

impl OutOfSync {
    fn mark(&mut self, offset: u64, len: u64, disk_len: u64) {
        if len == 0 {
            return;
        }
        let g = OUT_OF_SYNC_GRANULARITY_BYTES;
        let mut start = offset / g * g;
        let mut end = offset
            .saturating_add(len)
            .div_ceil(g)
            .saturating_mul(g)
            .min(disk_len);
        if start >= end {
            return;
        }
        // Merge with every range that overlaps or touches [start, end).
        let touching: Vec<(u64, u64)> = self
            .ranges
            .range(..=end)
            .filter(|&(_, &e)| e >= start)
            .map(|(&s, &e)| (s, e))
            .collect();
        for (s, e) in touching {
            self.ranges.remove(&s);
            start = start.min(s);
            end = end.max(e);
        }
        self.ranges.insert(start, end);
    }
}

#[derive(Debug)]
struct Child {
    /// `children.<i>` (Q2, Q55).
    name: String,
    node_name: String,
    dev: Device,
    out_of_sync: Mutex<OutOfSync>,
}

#[derive(Debug)]
struct Children {
    list: Vec<Child>,
    /// Q55's name counter.
    next: u32,
    /// Q45: every current child guarantees that discarded ranges read back as zeroes.
    discard_zeroes: bool,
}

/// One child's out-of-sync report (Q51).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutOfSyncReport {
    /// `children.<i>`.
    pub child: String,
    /// The child's node-name.
    pub node_name: String,
    /// Sorted, merged, aligned `(offset, length)` ranges.
    pub ranges: Vec<(u64, u64)>,
}

impl OutOfSyncReport {
    /// Total bytes of the ranges (Q51's `dirty-bytes`).
    pub fn dirty_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// The QMP form of Q51.
    pub fn to_json(&self) -> Value {
        let dirty = self.dirty_bytes();
        json!({
            "child": self.child,
            "node-name": self.node_name,
            "granularity": OUT_OF_SYNC_GRANULARITY_BYTES,
            "dirty-bytes": dirty,
            "ranges": self.ranges.iter().map(|(o, l)| json!({"offset": o, "length": l})).collect::<Vec<_>>(),
        })
    }
}

/// A quorum node.
#[derive(Debug)]
pub struct Quorum {
    opts: QuorumOptions,
    length: u64,
    align: AtomicU32,
    host: Host,
    children: RwLock<Children>,
    /// D7, D8: overlapping guest requests in arrival order; reads shared (through their
    /// repairs), writes, write-zeroes and forwarded discards exclusive.
    order: Arc<OrderedRangeLock>,
}

impl Quorum {
    /// Opens a quorum over already-opened `children` (node-name, device), in child order.
    /// The graph runs [`validate`] (Q7–Q12) before opening the children (Q13); `open` checks it
    /// again so that a direct caller cannot build a quorum that breaks Q7–Q12.
    ///
    /// # Errors
    /// Q7–Q12's messages, then Q14's `Could not refresh total sector count: <strerror>`.
    pub fn open(
        opts: QuorumOptions,
        children: Vec<(String, Device)>,
        host: Host,
    ) -> Result<Quorum, ConfigError> {
        validate(
            children.len(),
            opts.threshold as i64,
            opts.read_pattern,
            opts.rewrite_corrupted,
            opts.blkverify,
        )?;
        let refresh_err = |kind: ErrorKind| {
            ConfigError::new(format!("Could not refresh total sector count: {kind}"))
        };
        let mut length = None;
        for (_, dev) in &children {
            let l = dev.length().map_err(|e| refresh_err(e.kind()))?;
            match length {
                None => length = Some(l),
                // Q14: a length mismatch counts as EIO.
                Some(l0) if l0 != l => return Err(refresh_err(ErrorKind::Io)),
                Some(_) => {}
            }
        }
        let length = length.unwrap_or(0);
        let n = children.len();
        if 2 * opts.threshold <= n {
            // Q15, D1.
            host.warn(&format!(
                "ballot: warning: quorum node '{}': vote-threshold {} with {} children is not a strict majority; stale or tied reads are possible",
                opts.node_name, opts.threshold, n
            ));
        }
        let align = children
            .iter()
            .map(|(_, d)| d.request_alignment())
            .max()
            .unwrap_or(1);
        let list: Vec<Child> = children
            .into_iter()
            .enumerate()
            .map(|(i, (node_name, dev))| Child {
                name: format!("children.{i}"),
                node_name,
                dev,
                out_of_sync: Mutex::default(),
            })
            .collect();
        let discard_zeroes = list.iter().all(|c| c.dev.discard_zeroes());
        Ok(Quorum {
            order: Arc::default(),
            opts,
            length,
            align: AtomicU32::new(align),
            host,
            children: RwLock::new(Children {
                list,
                next: n as u32,
                discard_zeroes,
            }),
        })
    }

    /// The options this node was opened with.
    pub fn options(&self) -> &QuorumOptions {
        &self.opts
    }

    /// `(child name, node-name)` of every child, in child order.
    pub async fn child_names(&self) -> Vec<(String, String)> {
        self.children
            .read()
            .await
            .list
            .iter()
            .map(|c| (c.name.clone(), c.node_name.clone()))
            .collect()
    }

    /// Q51: the out-of-sync record of every child, in child order.
    pub async fn out_of_sync(&self) -> Vec<OutOfSyncReport> {
        let st = self.children.read().await;
        st.list
            .iter()
            .map(|c| {
                let oos = c.out_of_sync.lock().unwrap_or_else(|p| p.into_inner());
                OutOfSyncReport {
                    child: c.name.clone(),
                    node_name: c.node_name.clone(),
                    ranges: oos.ranges.iter().map(|(&s, &e)| (s, e - s)).collect(),
                }
            })
            .collect()
    }

    /// Hot add (Q54 steps 4–7; steps 1–3 are the graph's). Waits for requests in flight and
    /// holds new ones until done (Q56). Returns the new child's name.
    ///
    /// # Errors
    /// Q54's messages.
    pub async fn add_child(&self, node_name: &str, dev: Device) -> Result<String, ConfigError> {
        if self.opts.blkverify {
            return Err(ConfigError::new(
                "Cannot add a child to a quorum in blkverify mode",
            ));
        }
        // D4: QEMU accepts another length and notices only at the next refresh.
        let child_len = dev.length().map_err(|e| ConfigError::new(e.to_string()))?;
        if child_len != self.length {
            return Err(ConfigError::new(format!(
                "Cannot add child '{node_name}' to quorum '{}': its length {child_len} differs from the quorum's length {}",
                self.opts.node_name, self.length
            )));
        }
        let mut st = self.children.write().await;
        if st.next == u32::MAX {
            return Err(ConfigError::new("Too many children"));
        }
        let name = format!("children.{}", st.next);
        st.next += 1;
        self.align
            .fetch_max(dev.request_alignment(), Ordering::Relaxed);
        st.list.push(Child {
            name: name.clone(),
            node_name: node_name.to_string(),
            dev,
            out_of_sync: Mutex::default(),
        });
        st.discard_zeroes = st.list.iter().all(|c| c.dev.discard_zeroes());
        Ok(name)
    }

    /// Hot remove (Q53 steps 3–4). Waits for requests in flight (Q56). Returns the removed
    /// child's node-name.
    ///
    /// # Errors
    /// Q53's messages.
    pub async fn remove_child(&self, child: &str) -> Result<String, ConfigError> {
        let mut st = self.children.write().await;
        let Some(pos) = st.list.iter().position(|c| c.name == child) else {
            return Err(ConfigError::new(format!(
                "Node '{}' does not have child '{child}'",
                self.opts.node_name
            )));
        };
        if st.list.len() <= self.opts.threshold {
            return Err(ConfigError::new(format!(
                "The number of children cannot be lower than the vote threshold {}",
                self.opts.threshold
            )));
        }
        let removed = st.list.remove(pos);
        // Q55: removing the most recently numbered child gives its number back.
        if st
            .next
            .checked_sub(1)
            .is_some_and(|last| removed.name == format!("children.{last}"))
        {
            st.next -= 1;
        }
        st.discard_zeroes = st.list.iter().all(|c| c.dev.discard_zeroes());
        Ok(removed.node_name)
    }

    /// D8: waits for earlier overlapping requests, then holds `[offset, offset + len)`.
    async fn order(&self, offset: u64, len: u64, exclusive: bool) -> OrderedGuard {
        self.order.lock(offset, offset + len, exclusive).await
    }

    fn report_bad(&self, io: IoType, error: Option<ErrorKind>, child: &Child, sn: u64, sc: u64) {
        self.host.events.emit(Event::QuorumReportBad {
            io,
            error,
            node_name: child.node_name.clone(),
            sector_num: sn,
            sectors_count: sc,
        });
    }

    fn failure(&self, sn: u64, sc: u64) {
        self.host.events.emit(Event::QuorumFailure {
            reference: self.opts.node_name.clone(),
            sector_num: sn,
            sectors_count: sc,
        });
    }

    fn mark_out_of_sync(&self, child: &Child, offset: u64, len: u64) {
        child
            .out_of_sync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .mark(offset, len, self.length);
    }

    /// Range and alignment check against the quorum's length, before any child is touched.
    fn check(&self, offset: u64, len: u64, access: Access) -> Result<()> {
        check_request(self.length, self.request_alignment(), offset, len, access)
    }

    fn check_writable(&self, op: &str) -> Result<()> {
        if self.opts.read_only {
            return Err(Error::new(
                ErrorKind::Perm,
                format!("{op} on read-only quorum '{}'", self.opts.node_name),
            ));
        }
        Ok(())
    }

    fn verdict(&self, kind: ErrorKind, what: &str, offset: u64, len: u64) -> Error {
        Error::new(
            kind,
            format!(
                "quorum '{}' {what} at offset {offset} length {len}",
                self.opts.node_name
            ),
        )
    }

    async fn read_quorum(&self, st: &Children, offset: u64, len: usize) -> Result<Bytes> {
        let (sn, sc) = sectors(offset, len as u64);
        let futs: Vec<BoxFuture<'_, Result<Bytes>>> =
            st.list.iter().map(|c| c.dev.read(offset, len)).collect();
        // Q16, Q17: wait for every child; report each I/O error as its child completes.
        let results = join_all_with(futs, |i, r| {
            if let Err(e) = r {
                self.report_bad(IoType::Read, Some(e.kind()), &st.list[i], sn, sc);
            }
        })
        .await;
        let ok: Vec<(usize, &Bytes)> = results
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().ok().map(|b| (i, b)))
            .collect();
        for (i, b) in &ok {
            assert_eq!(b.len(), len, "child {i} returned a short read buffer");
        }
        let t = self.opts.threshold;
        if ok.len() < t {
            // Q18.
            let kind = error_vote(results.iter().filter_map(|r| r.as_ref().err()));
            self.failure(sn, sc);
            return Err(self.verdict(kind, "read below threshold", offset, len as u64));
        }
        // Q21 fast path: compare the first success with each later one, stop at a mismatch.
        let (_, first) = ok[0];
        let mismatch = ok[1..].iter().find(|(_, b)| *b != first).map(|(i, _)| *i);
        let Some(other) = mismatch else {
            return Ok(first.clone());
        };
        if self.opts.blkverify {
            // Q33, D6.
            let a = first;
            let b = results[other].as_ref().map_err(|e| e.clone())?;
            let at = a
                .iter()
                .zip(b.iter())
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            self.host.fatal(&format!(
                "quorum: offset={offset} bytes={len} contents mismatch at offset {}",
                offset + at as u64
            ));
            return Err(self.verdict(ErrorKind::Io, "blkverify mismatch", offset, len as u64));
        }
        // Q22: versions by SHA-256, in order of their first member.
        let mut versions: Vec<([u8; 32], Vec<usize>)> = Vec::new();
        for (i, b) in &ok {
            let digest: [u8; 32] = Sha256::digest(b).into();
            match versions.iter_mut().find(|(d, _)| *d == digest) {
                Some((_, members)) => members.push(*i),
                None => versions.push((digest, vec![*i])),
            }
        }
        let top = versions.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
        assert!(top <= st.list.len(), "vote count exceeds children");
        let leaders: Vec<&Vec<usize>> = versions
            .iter()
            .filter(|(_, m)| m.len() == top)
            .map(|(_, m)| m)
            .collect();
        if leaders.len() > 1 {
            // Q23, D1: a tie means nobody can say which data is current.
            self.failure(sn, sc);
            return Err(self.verdict(
                ErrorKind::Io,
                "read tie between versions",
                offset,
                len as u64,
            ));
        }
        if top < t {
            // Q24.
            self.failure(sn, sc);
            return Err(self.verdict(
                ErrorKind::Io,
                "read with no version reaching the threshold",
                offset,
                len as u64,
            ));
        }
        let winner = leaders[0];
        let losers: Vec<usize> = ok
            .iter()
            .map(|(i, _)| *i)
            .filter(|i| !winner.contains(i))
            .collect();
        // Q25, Q60: mismatch events in ascending child order.
        for &i in &losers {
            self.report_bad(IoType::Read, None, &st.list[i], sn, sc);
        }
        let data = results[winner[0]].as_ref().map_err(|e| e.clone())?.clone();
        if self.opts.rewrite_corrupted {
            // Q26–Q28.
            self.rewrite(st, &losers, offset, &data).await;
        }
        Ok(data)
    }

    /// Q27, Q28, Q32: write `data` over the whole request range to `targets` concurrently;
    /// failures are recorded (Q49) and change nothing else. D7: the read holds its range
    /// (D8) until the repair has finished, so no guest write can land between the vote and the
    /// repair and be undone by it.
    async fn rewrite(&self, st: &Children, targets: &[usize], offset: u64, data: &Bytes) {
        if targets.is_empty() {
            return;
        }
        let futs: Vec<BoxFuture<'_, Result<()>>> = targets
            .iter()
            .map(|&i| st.list[i].dev.write(offset, data.clone(), WriteFlags::NONE))
            .collect();
        let results = join_all_with(futs, |_, _| {}).await;
        for (r, &i) in results.iter().zip(targets) {
            if r.is_err() {
                self.mark_out_of_sync(&st.list[i], offset, data.len() as u64);
            }
        }
    }

    async fn read_fifo(&self, st: &Children, offset: u64, len: usize) -> Result<Bytes> {
        let (sn, sc) = sectors(offset, len as u64);
        let mut last_err = None;
        for (k, child) in st.list.iter().enumerate() {
            match child.dev.read(offset, len).await {
                Ok(data) => {
                    assert_eq!(data.len(), len, "child {k} returned a short read buffer");
                    if self.opts.rewrite_corrupted {
                        // Q32, D2: repair the children that failed before this one (none when
                        // the first child answered: rewrite returns at once).
                        let targets: Vec<usize> = (0..k).collect();
                        self.rewrite(st, &targets, offset, &data).await;
                    }
                    return Ok(data);
                }
                Err(e) => {
                    // Q30: report before trying the next child.
                    self.report_bad(IoType::Read, Some(e.kind()), child, sn, sc);
                    last_err = Some(e);
                }
            }
        }
        // Q30: the last child's error, no FAILURE.
        Err(last_err.unwrap_or_else(|| {
            self.verdict(ErrorKind::Io, "read with no children", offset, len as u64)
        }))
    }

    /// Q36–Q39 for writes and write-zeroes; Q46 for forwarded discards.
    async fn write_vote<'a, F>(
        &'a self,
        st: &'a Children,
        offset: u64,
        len: u64,
        what: &str,
        op: F,
    ) -> Result<()>
    where
        F: Fn(&'a Device) -> BoxFuture<'a, Result<()>>,
    {
        let (sn, sc) = sectors(offset, len);
        let futs: Vec<BoxFuture<'a, Result<()>>> = st.list.iter().map(|c| op(&c.dev)).collect();
        let results = join_all_with(futs, |i, r| {
            if let Err(e) = r {
                // Q37; Q49 marks before the result is returned.
                self.report_bad(IoType::Write, Some(e.kind()), &st.list[i], sn, sc);
                self.mark_out_of_sync(&st.list[i], offset, len);
            }
        })
        .await;
        let s = results.iter().filter(|r| r.is_ok()).count();
        if s >= self.opts.threshold {
            return Ok(());
        }
        // Q39: error vote, FAILURE after all children completed, no rollback.
        let kind = error_vote(results.iter().filter_map(|r| r.as_ref().err()));
        self.failure(sn, sc);
        Err(self.verdict(kind, what, offset, len))
    }

    async fn flush_vote(&self, st: &Children) -> Result<()> {
        let mut errors = Vec::new();
        let mut s = 0usize;
        // Q41: one after another, in child order.
        for child in &st.list {
            match child.dev.flush().await {
                Ok(()) => s += 1,
                Err(e) => {
                    self.report_bad(IoType::Flush, Some(e.kind()), child, 0, 0);
                    errors.push(e);
                }
            }
        }
        if s >= self.opts.threshold {
            Ok(())
        } else {
            // Never FAILURE for a flush.
            Err(Error::new(
                error_vote(errors.iter()),
                format!("quorum '{}' flush below threshold", self.opts.node_name),
            ))
        }
    }
}

/// Q20: the kind reported by the most failed children; among kinds sharing the top count, the
/// one whose first occurrence in child order comes latest (QEMU's rule).
pub fn error_vote<'e>(errors: impl Iterator<Item = &'e Error>) -> ErrorKind {
    // (kind, count, first index), in order of first occurrence.
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

#[async_trait]
impl BlockDevice for Quorum {
    fn driver(&self) -> &'static str {
        "quorum"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.length)
    }

    fn request_alignment(&self) -> u32 {
        self.align.load(Ordering::Relaxed)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(offset, len as u64, Access::Read)?;
        let _order = self.order(offset, len as u64, false).await;
        let st = self.children.read().await;
        match self.opts.read_pattern {
            ReadPattern::Quorum => self.read_quorum(&st, offset, len).await,
            ReadPattern::Fifo => self.read_fifo(&st, offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.check_writable("write")?;
        let len = data.len() as u64;
        self.check(offset, len, Access::Write)?;
        let _order = self.order(offset, len, true).await;
        let st = self.children.read().await;
        // Q40: children get the write without FUA; a successful vote is followed by a flush.
        self.write_vote(&st, offset, len, "write below threshold", |dev| {
            dev.write(offset, data.clone(), WriteFlags::NONE)
        })
        .await?;
        if flags.fua {
            return self.flush_vote(&st).await;
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        let st = self.children.read().await;
        self.flush_vote(&st).await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable("write-zeroes")?;
        self.check(offset, len, Access::Write)?;
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.opts.discard_unmap,
            ..flags
        };
        let _order = self.order(offset, len, true).await;
        let st = self.children.read().await;
        // Q36, Q40: write-zeroes passes the caller's flags, FUA included, to every child.
        self.write_vote(&st, offset, len, "write-zeroes below threshold", |dev| {
            dev.write_zeroes(offset, len, flags)
        })
        .await
    }

    fn can_fast_zero(&self) -> bool {
        false
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.check(offset, len, Access::Read)?;
        if !self.opts.discard_unmap || len == 0 {
            return Ok(());
        }
        // D8 before the children's lock, as every request takes them (a hot add waiting for
        // the children's lock must not sit between the two).
        let _order = self.order(offset, len, true).await;
        let st = self.children.read().await;
        // Q45, Q46, D3: forward only when every child guarantees zeroes afterwards.
        if !st.discard_zeroes {
            return Ok(());
        }
        self.check_writable("discard")?;
        self.write_vote(&st, offset, len, "discard below threshold", |dev| {
            dev.discard(offset, len)
        })
        .await
    }

    fn discard_zeroes(&self) -> bool {
        // Non-blocking view: only a hot add or remove changes it, and those hold the write
        // lock briefly; when contended, answer the safe `false`.
        match self.children.try_read() {
            Ok(st) => self.opts.discard_unmap && st.discard_zeroes,
            Err(_) => false,
        }
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.check(offset, len, Access::Read)?;
        if len == 0 {
            return Ok(BlockStatus::data(0));
        }
        let st = self.children.read().await;
        let (sn, sc) = sectors(offset, len);
        let mut all_zero = true;
        let mut zero_len = u64::MAX;
        let mut data_len = 0u64;
        for child in &st.list {
            match child.dev.block_status(offset, len).await {
                Ok(s) => {
                    let l = s.length.clamp(1, len);
                    if s.zero {
                        zero_len = zero_len.min(l);
                    } else {
                        all_zero = false;
                        data_len = data_len.max(l);
                    }
                }
                Err(e) => {
                    // Q43: report, answer DATA over the whole count, stop querying.
                    self.report_bad(IoType::Read, Some(e.kind()), child, sn, sc);
                    return Ok(BlockStatus::data(len));
                }
            }
        }
        // Q44.
        Ok(if all_zero {
            BlockStatus::zero(zero_len)
        } else {
            BlockStatus::data(data_len)
        })
    }
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
    fn q49_out_of_sync_ranges_round_out_merge_and_clip() {
        let mut o = OutOfSync::default();
        o.mark(4096, 4096, 1 << 20);
        assert_eq!(o.ranges.iter().collect::<Vec<_>>(), vec![(&0, &65536)]);
        o.mark(65536, 1, 1 << 20);
        assert_eq!(o.ranges.iter().collect::<Vec<_>>(), vec![(&0, &131072)]);
        o.mark(300_000, 10, 1 << 20);
        assert_eq!(
            o.ranges.iter().map(|(s, e)| e - s).sum::<u64>(),
            131072 + 65536
        );
        // Clipped to a disk length that is not a multiple of 64 KiB.
        let mut c = OutOfSync::default();
        c.mark(70_000, 512, 70_144);
        assert_eq!(c.ranges.iter().collect::<Vec<_>>(), vec![(&65536, &70144)]);
        // Bridging two ranges merges all three.
        o.mark(131072, 200_000 - 131072, 1 << 20);
        assert_eq!(o.ranges.iter().collect::<Vec<_>>(), vec![(&0, &327680)]);
    }
}
