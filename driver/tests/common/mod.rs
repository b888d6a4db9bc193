//! Shared test devices: a scriptable child for the quorum tables and a volatile-cache leaf
//! for durability checks.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use ballot::device::{check_request, Access};
use ballot::{BlockDevice, BlockStatus, Device, Error, ErrorKind, Result, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};

/// What a test child saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Read(u64, usize),
    /// offset, length, fua, first data byte, buffer address
    Write(u64, usize, bool, u8, usize),
    Zero(u64, u64, ZeroFlags),
    Discard(u64, u64),
    Flush,
    Status(u64, u64),
}

/// A child whose answers a test scripts.
#[derive(Debug)]
pub struct TestChild {
    pub name: String,
    mem: Mutex<Bytes>,
    pub read_err: Mutex<Option<ErrorKind>>,
    pub write_err: Mutex<Option<ErrorKind>>,
    pub flush_err: Mutex<Option<ErrorKind>>,
    pub status: Mutex<Option<std::result::Result<BlockStatus, ErrorKind>>>,
    pub delay: Mutex<Duration>,
    pub log: Mutex<Vec<Op>>,
    pub discard_zeroes: bool,
    /// When set, `length()` fails with this kind.
    pub length_err: Mutex<Option<ErrorKind>>,
}

pub const LEN: u64 = 1 << 20;

impl TestChild {
    pub fn new(name: &str, fill: u8) -> Arc<TestChild> {
        TestChild::sized(name, fill, LEN)
    }

    pub fn sized(name: &str, fill: u8, len: u64) -> Arc<TestChild> {
        Arc::new(TestChild {
            name: name.into(),
            mem: Mutex::new(Bytes::from(vec![fill; len as usize])),
            read_err: Mutex::new(None),
            write_err: Mutex::new(None),
            flush_err: Mutex::new(None),
            status: Mutex::new(None),
            delay: Mutex::new(Duration::ZERO),
            log: Mutex::new(Vec::new()),
            discard_zeroes: false,
            length_err: Mutex::new(None),
        })
    }

    pub fn with_discard_zeroes(name: &str, fill: u8) -> Arc<TestChild> {
        let mut c = Arc::try_unwrap(TestChild::new(name, fill)).unwrap();
        c.discard_zeroes = true;
        Arc::new(c)
    }

    pub fn fail_reads(&self, k: ErrorKind) {
        *self.read_err.lock().unwrap() = Some(k);
    }
    pub fn fail_writes(&self, k: ErrorKind) {
        *self.write_err.lock().unwrap() = Some(k);
    }
    pub fn fail_flushes(&self, k: ErrorKind) {
        *self.flush_err.lock().unwrap() = Some(k);
    }
    pub fn set_delay(&self, d: Duration) {
        *self.delay.lock().unwrap() = d;
    }
    pub fn set_status(&self, s: std::result::Result<BlockStatus, ErrorKind>) {
        *self.status.lock().unwrap() = Some(s);
    }
    pub fn log(&self) -> Vec<Op> {
        self.log.lock().unwrap().clone()
    }
    pub fn clear_log(&self) {
        self.log.lock().unwrap().clear()
    }
    pub fn contents(&self, off: u64, len: usize) -> Vec<u8> {
        self.mem.lock().unwrap()[off as usize..off as usize + len].to_vec()
    }
    /// Address of byte `off` of the current contents (for the no-copy checks, Q4).
    pub fn addr(&self, off: u64) -> usize {
        self.mem.lock().unwrap().as_ptr() as usize + off as usize
    }
    pub fn fill(&self, off: u64, len: usize, byte: u8) {
        let mut m = self.mem.lock().unwrap();
        let mut v = match std::mem::take(&mut *m).try_into_mut() {
            Ok(v) => v,
            Err(b) => BytesMut::from(&b[..]),
        };
        v[off as usize..off as usize + len].fill(byte);
        *m = v.freeze();
    }

    async fn pause(&self) {
        let d = *self.delay.lock().unwrap();
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    fn err(&self, k: ErrorKind, op: &str) -> Error {
        Error::new(k, format!("{} {op}", self.name))
    }
}

#[async_trait]
impl BlockDevice for TestChild {
    fn driver(&self) -> &'static str {
        "test"
    }
    fn length(&self) -> Result<u64> {
        if let Some(k) = *self.length_err.lock().unwrap() {
            return Err(self.err(k, "length"));
        }
        Ok(self.mem.lock().unwrap().len() as u64)
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.log.lock().unwrap().push(Op::Read(offset, len));
        self.pause().await;
        if let Some(k) = *self.read_err.lock().unwrap() {
            return Err(self.err(k, "read"));
        }
        let m = self.mem.lock().unwrap();
        // Zero-copy slice, so tests can check which child's buffer a quorum returned.
        Ok(m.slice(offset as usize..offset as usize + len))
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.log.lock().unwrap().push(Op::Write(
            offset,
            data.len(),
            flags.fua,
            data.first().copied().unwrap_or(0),
            data.as_ptr() as usize,
        ));
        self.pause().await;
        if let Some(k) = *self.write_err.lock().unwrap() {
            return Err(self.err(k, "write"));
        }
        let mut m = self.mem.lock().unwrap();
        // In place when no reader holds a slice; otherwise copy-on-write.
        let mut v = match std::mem::take(&mut *m).try_into_mut() {
            Ok(v) => v,
            Err(b) => BytesMut::from(&b[..]),
        };
        v[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        *m = v.freeze();
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.log.lock().unwrap().push(Op::Flush);
        self.pause().await;
        match *self.flush_err.lock().unwrap() {
            Some(k) => Err(self.err(k, "flush")),
            None => Ok(()),
        }
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.log.lock().unwrap().push(Op::Zero(offset, len, flags));
        self.pause().await;
        if let Some(k) = *self.write_err.lock().unwrap() {
            return Err(self.err(k, "write-zeroes"));
        }
        self.fill(offset, len as usize, 0);
        Ok(())
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.log.lock().unwrap().push(Op::Discard(offset, len));
        self.pause().await;
        if let Some(k) = *self.write_err.lock().unwrap() {
            return Err(self.err(k, "discard"));
        }
        if self.discard_zeroes {
            self.fill(offset, len as usize, 0);
        }
        Ok(())
    }
    fn discard_zeroes(&self) -> bool {
        self.discard_zeroes
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.log.lock().unwrap().push(Op::Status(offset, len));
        match *self.status.lock().unwrap() {
            Some(Ok(s)) => Ok(s),
            Some(Err(k)) => Err(self.err(k, "block status")),
            None => Ok(BlockStatus::data(len)),
        }
    }
}

/// A leaf with a volatile write cache: writes land in a pending layer that [`Volatile::crash`]
/// drops; flush and FUA writes make them durable. Used to prove flush and FUA durability.
#[derive(Debug)]
pub struct Volatile {
    durable: Mutex<Vec<u8>>,
    pending: Mutex<Vec<(u64, Bytes)>>,
}

impl Volatile {
    pub fn new(len: usize) -> Arc<Volatile> {
        Arc::new(Volatile {
            durable: Mutex::new(vec![0; len]),
            pending: Mutex::new(Vec::new()),
        })
    }
    /// Loses every unflushed write.
    pub fn crash(&self) {
        self.pending.lock().unwrap().clear();
    }
    fn persist(&self) {
        let mut d = self.durable.lock().unwrap();
        for (off, data) in self.pending.lock().unwrap().drain(..) {
            d[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
    }
}

#[async_trait]
impl BlockDevice for Volatile {
    fn driver(&self) -> &'static str {
        "volatile"
    }
    fn length(&self) -> Result<u64> {
        Ok(self.durable.lock().unwrap().len() as u64)
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_request(self.length()?, 1, offset, len as u64, Access::Read)?;
        let mut out = self.durable.lock().unwrap()[offset as usize..offset as usize + len].to_vec();
        for (off, data) in self.pending.lock().unwrap().iter() {
            let (s, e) = (
                *off.max(&offset),
                (off + data.len() as u64).min(offset + len as u64),
            );
            if s < e {
                out[(s - offset) as usize..(e - offset) as usize]
                    .copy_from_slice(&data[(s - off) as usize..(e - off) as usize]);
            }
        }
        Ok(Bytes::from(out))
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        check_request(self.length()?, 1, offset, data.len() as u64, Access::Write)?;
        self.pending.lock().unwrap().push((offset, data));
        if flags.fua {
            self.persist();
        }
        Ok(())
    }
    async fn flush(&self) -> Result<()> {
        self.persist();
        Ok(())
    }
}

pub fn dev<T: BlockDevice + 'static>(c: &Arc<T>) -> Device {
    c.clone()
}

/// A scratch directory under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "ballot-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// Creates a sparse image file of `len` bytes and returns its path.
    pub fn image(&self, name: &str, len: u64) -> String {
        let p = self.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p.display().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A QMP monitor over `graph` with no NBD exports, for driving commands in-process.
pub fn monitor(graph: ballot::graph::Graph, bus: ballot::events::EventBus) -> ballot::qmp::Monitor {
    ballot::qmp::Monitor::new(graph, ballot::nbd::server::Server::new(), bus)
}
