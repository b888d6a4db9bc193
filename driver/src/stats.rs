//! I/O statistics of every node (issue 20 item 2): what QMP `query-blockstats` reports, with
//! QEMU's field names and meanings.
//!
//! Every node of the graph is wrapped in a [`Counted`] device when it is added, so a parent's
//! requests to its children, an export's requests to its node and a job's requests are all
//! counted where they enter a node. Reads count in `rd_*`; writes and write-zeroes in `wr_*`
//! (as QEMU's devices account write-zeroes); discards in `unmap_*`; flushes in `flush_*`; block
//! status is not I/O and is not counted. A request that fails its range or alignment check is
//! `invalid` (QEMU's `block_acct_invalid`), any other failure `failed`; both still count as
//! operations of their kind only under `failed_*`/`invalid_*`, as in QEMU, where `rd_operations`
//! and the byte counts are successful requests. Times are the requests' total latency in
//! nanoseconds; `idle_time_ns` is the time since the last request completed (absent before the
//! first).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::device::{
    check_request, Access, BlockDevice, BlockStatus, Device, WriteFlags, ZeroFlags,
};
use crate::error::{ErrorKind, Result};

/// The kind of a counted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
    Flush,
    Unmap,
}

/// Upper bounds of the latency histogram's buckets, in nanoseconds (10 µs to 10 s; the
/// metrics endpoint reports them in seconds, with a last bucket for everything slower).
pub const LATENCY_BUCKETS_NS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Counters of one kind of request.
#[derive(Debug, Default)]
struct Kind {
    bytes: AtomicU64,
    ops: AtomicU64,
    ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
    /// Successful requests by latency: one count per bucket of [`LATENCY_BUCKETS_NS`], then
    /// the slower ones.
    latency: [AtomicU64; LATENCY_BUCKETS_NS.len() + 1],
}

/// One node's counters.
#[derive(Debug)]
pub struct IoStats {
    rd: Kind,
    wr: Kind,
    flush: Kind,
    unmap: Kind,
    /// The end of the furthest successful write (QEMU's `wr_highest_offset`).
    wr_highest: AtomicU64,
    /// Nanoseconds after `epoch` at which the last request completed, plus one (0: none yet).
    last_done: AtomicU64,
    epoch: Instant,
}

impl Default for IoStats {
    fn default() -> IoStats {
        IoStats {
            rd: Kind::default(),
            wr: Kind::default(),
            flush: Kind::default(),
            unmap: Kind::default(),
            wr_highest: AtomicU64::new(0),
            last_done: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// A snapshot of one node's counters, in QEMU's units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
    pub failed_unmap_operations: u64,
    pub invalid_rd_operations: u64,
    pub invalid_wr_operations: u64,
    pub invalid_flush_operations: u64,
    pub invalid_unmap_operations: u64,
    pub wr_highest_offset: u64,
    /// None before the first request completed.
    pub idle_time_ns: Option<u64>,
}

impl IoStats {
    fn kind(&self, op: Op) -> &Kind {
        match op {
            Op::Read => &self.rd,
            Op::Write => &self.wr,
            Op::Flush => &self.flush,
            Op::Unmap => &self.unmap,
        }
    }

    fn done(&self, op: Op, started: Instant, bytes: u64, outcome: Outcome) {
        let k = self.kind(op);
        let ns = started.elapsed().as_nanos() as u64;
        match outcome {
            Outcome::Ok => {
                k.ops.fetch_add(1, Ordering::Relaxed);
                k.bytes.fetch_add(bytes, Ordering::Relaxed);
                k.ns.fetch_add(ns, Ordering::Relaxed);
                let b = LATENCY_BUCKETS_NS.partition_point(|&up| up < ns);
                k.latency[b].fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed => {
                k.failed.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Invalid => {
                k.invalid.fetch_add(1, Ordering::Relaxed);
            }
        }
        let at = self.epoch.elapsed().as_nanos() as u64 + 1;
        self.last_done.fetch_max(at, Ordering::Relaxed);
    }

    /// The latency histogram of `op` (`read`, `write`, `flush`, `unmap`): the count in each
    /// bucket of [`LATENCY_BUCKETS_NS`], then the count above the last bound.
    pub fn latency(&self, op: &str) -> Vec<u64> {
        let k = match op {
            "read" => &self.rd,
            "write" => &self.wr,
            "flush" => &self.flush,
            _ => &self.unmap,
        };
        k.latency
            .iter()
            .map(|a| a.load(Ordering::Relaxed))
            .collect()
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let last = g(&self.last_done);
        Snapshot {
            rd_bytes: g(&self.rd.bytes),
            wr_bytes: g(&self.wr.bytes),
            unmap_bytes: g(&self.unmap.bytes),
            rd_operations: g(&self.rd.ops),
            wr_operations: g(&self.wr.ops),
            flush_operations: g(&self.flush.ops),
            unmap_operations: g(&self.unmap.ops),
            rd_total_time_ns: g(&self.rd.ns),
            wr_total_time_ns: g(&self.wr.ns),
            flush_total_time_ns: g(&self.flush.ns),
            unmap_total_time_ns: g(&self.unmap.ns),
            failed_rd_operations: g(&self.rd.failed),
            failed_wr_operations: g(&self.wr.failed),
            failed_flush_operations: g(&self.flush.failed),
            failed_unmap_operations: g(&self.unmap.failed),
            invalid_rd_operations: g(&self.rd.invalid),
            invalid_wr_operations: g(&self.wr.invalid),
            invalid_flush_operations: g(&self.flush.invalid),
            invalid_unmap_operations: g(&self.unmap.invalid),
            wr_highest_offset: g(&self.wr_highest),
            idle_time_ns: (last > 0)
                .then(|| (self.epoch.elapsed().as_nanos() as u64 + 1).saturating_sub(last)),
        }
    }
}

impl Snapshot {
    /// QEMU's `BlockDeviceStats` object.
    pub fn to_qmp(&self) -> Value {
        let mut v = json!({
            "rd_bytes": self.rd_bytes,
            "wr_bytes": self.wr_bytes,
            "zone_append_bytes": 0,
            "unmap_bytes": self.unmap_bytes,
            "rd_operations": self.rd_operations,
            "wr_operations": self.wr_operations,
            "zone_append_operations": 0,
            "flush_operations": self.flush_operations,
            "unmap_operations": self.unmap_operations,
            "rd_total_time_ns": self.rd_total_time_ns,
            "wr_total_time_ns": self.wr_total_time_ns,
            "zone_append_total_time_ns": 0,
            "flush_total_time_ns": self.flush_total_time_ns,
            "unmap_total_time_ns": self.unmap_total_time_ns,
            "wr_highest_offset": self.wr_highest_offset,
            "rd_merged": 0,
            "wr_merged": 0,
            "zone_append_merged": 0,
            "unmap_merged": 0,
            "failed_rd_operations": self.failed_rd_operations,
            "failed_wr_operations": self.failed_wr_operations,
            "failed_zone_append_operations": 0,
            "failed_flush_operations": self.failed_flush_operations,
            "failed_unmap_operations": self.failed_unmap_operations,
            "invalid_rd_operations": self.invalid_rd_operations,
            "invalid_wr_operations": self.invalid_wr_operations,
            "invalid_zone_append_operations": 0,
            "invalid_flush_operations": self.invalid_flush_operations,
            "invalid_unmap_operations": self.invalid_unmap_operations,
            "account_invalid": true,
            "account_failed": true,
            "timed_stats": [],
        });
        if let (Some(idle), Value::Object(m)) = (self.idle_time_ns, &mut v) {
            m.insert("idle_time_ns".into(), json!(idle));
        }
        v
    }
}

#[derive(Debug, Clone, Copy)]
enum Outcome {
    Ok,
    Failed,
    Invalid,
}

/// A node's device with its requests counted in `stats`.
#[derive(Debug)]
pub struct Counted {
    inner: Device,
    stats: Arc<IoStats>,
}

impl Counted {
    /// Wraps `inner`; returns the wrapped device and its counters.
    pub fn wrap(inner: Device) -> (Device, Arc<IoStats>) {
        let stats = Arc::new(IoStats::default());
        let dev: Device = Arc::new(Counted {
            inner,
            stats: stats.clone(),
        });
        (dev, stats)
    }

    /// Counts a write or write-zeroes of `len` bytes at `offset` that started at `t` (both are
    /// QEMU's writes) and moves `wr_highest_offset` on success.
    fn wrote(&self, t: Instant, offset: u64, len: u64, r: Result<()>) -> Result<()> {
        let o = self.outcome(&r, Some((offset, len, Access::Write)));
        if r.is_ok() {
            self.stats
                .wr_highest
                .fetch_max(offset + len, Ordering::Relaxed);
        }
        self.stats.done(Op::Write, t, len, o);
        r
    }

    /// Failed or invalid: a request that fails the range check the device applies.
    fn outcome<T>(&self, r: &Result<T>, range: Option<(u64, u64, Access)>) -> Outcome {
        match r {
            Ok(_) => Outcome::Ok,
            Err(e) => {
                let invalid = match range {
                    Some((off, len, access)) => match self.inner.length() {
                        Ok(l) => check_request(l, self.inner.request_alignment(), off, len, access)
                            .is_err(),
                        Err(_) => false,
                    },
                    None => e.kind() == ErrorKind::Inval,
                };
                if invalid {
                    Outcome::Invalid
                } else {
                    Outcome::Failed
                }
            }
        }
    }
}

#[async_trait]
impl BlockDevice for Counted {
    fn driver(&self) -> &'static str {
        self.inner.driver()
    }
    fn length(&self) -> Result<u64> {
        self.inner.length()
    }
    fn request_alignment(&self) -> u32 {
        self.inner.request_alignment()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        let t = Instant::now();
        let r = self.inner.read(offset, len).await;
        let o = self.outcome(&r, Some((offset, len as u64, Access::Read)));
        self.stats.done(Op::Read, t, len as u64, o);
        r
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        let t = Instant::now();
        let len = data.len() as u64;
        let r = self.inner.write(offset, data, flags).await;
        self.wrote(t, offset, len, r)
    }
    async fn flush(&self) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.flush().await;
        let o = self.outcome(&r, None);
        self.stats.done(Op::Flush, t, 0, o);
        r
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.write_zeroes(offset, len, flags).await;
        self.wrote(t, offset, len, r)
    }
    fn can_fast_zero(&self) -> bool {
        self.inner.can_fast_zero()
    }
    fn completes_inline(&self) -> bool {
        self.inner.completes_inline()
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let t = Instant::now();
        let r = self.inner.discard(offset, len).await;
        let o = self.outcome(&r, Some((offset, len, Access::Read)));
        self.stats.done(Op::Unmap, t, len, o);
        r
    }
    fn discard_zeroes(&self) -> bool {
        self.inner.discard_zeroes()
    }
    fn cache_epoch(&self) -> u64 {
        self.inner.cache_epoch()
    }
    fn reachable(&self) -> bool {
        self.inner.reachable()
    }
    async fn grow(&self, length: u64) -> Result<()> {
        self.inner.grow(length).await
    }
    fn grows_with_zeroes(&self) -> bool {
        self.inner.grows_with_zeroes()
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.inner.block_status(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::memory::MemoryDevice;
    use crate::error::Error;

    /// A device whose every request fails with EIO.
    #[derive(Debug)]
    struct Broken;

    #[async_trait]
    impl BlockDevice for Broken {
        fn driver(&self) -> &'static str {
            "broken"
        }
        fn length(&self) -> Result<u64> {
            Ok(1 << 20)
        }
        async fn read(&self, _: u64, _: usize) -> Result<Bytes> {
            Err(Error::new(ErrorKind::Io, "broken"))
        }
        async fn write(&self, _: u64, _: Bytes, _: WriteFlags) -> Result<()> {
            Err(Error::new(ErrorKind::Io, "broken"))
        }
        async fn flush(&self) -> Result<()> {
            Err(Error::new(ErrorKind::Io, "broken"))
        }
    }

    #[tokio::test]
    async fn requests_are_counted_by_kind_and_outcome_as_qemu_counts_them() {
        let (dev, st) = Counted::wrap(Arc::new(MemoryDevice::new(1 << 20)));
        dev.write(4096, Bytes::from(vec![1u8; 8192]), WriteFlags::NONE)
            .await
            .unwrap();
        dev.write_zeroes(0, 512, ZeroFlags::default())
            .await
            .unwrap();
        assert_eq!(dev.read(0, 4096).await.unwrap().len(), 4096);
        dev.flush().await.unwrap();
        dev.discard(0, 4096).await.unwrap();
        // Past the end: refused by the range check, counted as invalid, not as operations.
        assert!(dev.read(1 << 20, 512).await.is_err());
        assert!(dev
            .write(
                (1 << 20) - 512,
                Bytes::from(vec![0u8; 1024]),
                WriteFlags::NONE
            )
            .await
            .is_err());
        let s = st.snapshot();
        assert_eq!(
            (s.wr_operations, s.wr_bytes, s.wr_highest_offset),
            (2, 8192 + 512, 12288)
        );
        assert_eq!((s.rd_operations, s.rd_bytes), (1, 4096));
        assert_eq!(
            (s.flush_operations, s.unmap_operations, s.unmap_bytes),
            (1, 1, 4096)
        );
        assert_eq!((s.invalid_rd_operations, s.invalid_wr_operations), (1, 1));
        assert_eq!((s.failed_rd_operations, s.failed_wr_operations), (0, 0));
        assert!(s.idle_time_ns.is_some());
        assert_eq!(st.latency("write").iter().sum::<u64>(), 2);
        // A device that fails: failed, not invalid.
        let (dev, st) = Counted::wrap(Arc::new(Broken));
        assert!(dev.read(0, 512).await.is_err());
        assert!(dev
            .write(0, Bytes::from(vec![0u8; 512]), WriteFlags::NONE)
            .await
            .is_err());
        assert!(dev.flush().await.is_err());
        let s = st.snapshot();
        assert_eq!(
            (
                s.failed_rd_operations,
                s.failed_wr_operations,
                s.failed_flush_operations
            ),
            (1, 1, 1)
        );
        assert_eq!((s.rd_operations, s.invalid_rd_operations), (0, 0));
        assert_eq!(s.wr_highest_offset, 0);
        // Nothing yet: no idle time.
        assert_eq!(
            Counted::wrap(Arc::new(Broken)).1.snapshot().idle_time_ns,
            None
        );
    }
}
