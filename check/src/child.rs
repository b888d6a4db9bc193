//! A memory child whose faults a harness sets between operations: read, write and flush
//! errors, lost writes (acknowledged, not stored) and silent corruption (the harness flips
//! bytes in its memory directly). The models in [`crate::vote`] and the quorum state machine
//! predict what a quorum over such children must do.

use std::sync::Mutex;

use async_trait::async_trait;
use ballot::device::{check_request, Access};
use ballot::{BlockDevice, Error, ErrorKind, Result, WriteFlags};
use bytes::Bytes;

/// Faults in force on a child.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Reads fail with this kind (only those overlapping `read_range`, when set).
    pub read: Option<ErrorKind>,
    /// `[start, end)`: limits `read` to reads overlapping it.
    pub read_range: Option<(u64, u64)>,
    /// Writes (and write-zeroes) fail with this kind, storing nothing.
    pub write: Option<ErrorKind>,
    /// Flushes fail with this kind.
    pub flush: Option<ErrorKind>,
    /// Writes succeed without storing anything.
    pub lose_writes: bool,
}

/// See the module documentation.
#[derive(Debug)]
pub struct FaultyChild {
    mem: Mutex<Vec<u8>>,
    align: u32,
    faults: Mutex<Faults>,
    writes: Mutex<Vec<(u64, usize)>>,
}

impl FaultyChild {
    /// A child holding `contents`.
    pub fn new(contents: Vec<u8>) -> FaultyChild {
        FaultyChild::aligned(contents, 1)
    }

    /// A child holding `contents` whose request alignment is `align` bytes.
    pub fn aligned(contents: Vec<u8>, align: u32) -> FaultyChild {
        FaultyChild {
            mem: Mutex::new(contents),
            align,
            faults: Mutex::default(),
            writes: Mutex::default(),
        }
    }

    /// Sets the faults in force.
    pub fn set_faults(&self, f: Faults) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = f;
    }

    fn faults(&self) -> Faults {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The child's memory.
    pub fn contents(&self) -> Vec<u8> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Silent corruption: XORs `mask` into the byte at `at`.
    pub fn flip(&self, at: usize, mask: u8) {
        let mut m = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = m.get_mut(at) {
            *b ^= mask;
        }
    }

    /// `(offset, length)` of every write the child received, in order; then forgets them.
    pub fn take_writes(&self) -> Vec<(u64, usize)> {
        std::mem::take(&mut *self.writes.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn len(&self) -> u64 {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).len() as u64
    }
}

#[async_trait]
impl BlockDevice for FaultyChild {
    fn driver(&self) -> &'static str {
        "faulty-child"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.len())
    }

    fn request_alignment(&self) -> u32 {
        self.align
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_request(self.len(), self.align, offset, len as u64, Access::Read)?;
        let f = self.faults();
        if let Some(k) = f.read {
            let hit = f
                .read_range
                .is_none_or(|(a, b)| offset < b && a < offset + len as u64);
            if hit {
                return Err(Error::new(k, "injected read error"));
            }
        }
        let m = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Bytes::copy_from_slice(
            &m[offset as usize..offset as usize + len],
        ))
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        check_request(
            self.len(),
            self.align,
            offset,
            data.len() as u64,
            Access::Write,
        )?;
        self.writes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((offset, data.len()));
        let f = self.faults();
        if let Some(k) = f.write {
            return Err(Error::new(k, "injected write error"));
        }
        if !f.lose_writes {
            let mut m = self.mem.lock().unwrap_or_else(|p| p.into_inner());
            m[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
        }
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        match self.faults().flush {
            Some(k) => Err(Error::new(k, "injected flush error")),
            None => Ok(()),
        }
    }
}
