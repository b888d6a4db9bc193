//! `memory`: an in-memory block device. Used by tests and benchmarks as a child with real
//! copy-in/copy-out costs; not selectable with `--blockdev` (use `null-co` or a file).

use std::sync::RwLock;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::device::{check_request, Access, BlockDevice, BlockStatus, WriteFlags, ZeroFlags};
use crate::error::Result;

/// A fixed-size device whose contents live in one allocation.
#[derive(Debug)]
pub struct MemoryDevice {
    data: RwLock<Vec<u8>>,
    /// [`BlockDevice::grow`] works (an image file's stand-in under a format driver).
    growable: bool,
}

impl MemoryDevice {
    /// A zero-filled device of `length` bytes.
    pub fn new(length: usize) -> MemoryDevice {
        MemoryDevice {
            data: RwLock::new(vec![0; length]),
            growable: false,
        }
    }

    /// A zero-filled device of `length` bytes that grows on demand, like a sparse file.
    pub fn growable(length: usize) -> MemoryDevice {
        MemoryDevice {
            data: RwLock::new(vec![0; length]),
            growable: true,
        }
    }

    fn len(&self) -> u64 {
        self.data.read().unwrap_or_else(|p| p.into_inner()).len() as u64
    }

    /// A device holding `contents`.
    pub fn with_contents(contents: Vec<u8>) -> MemoryDevice {
        MemoryDevice {
            data: RwLock::new(contents),
            growable: false,
        }
    }

    /// A copy of the whole contents (tests).
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[async_trait]
impl BlockDevice for MemoryDevice {
    fn driver(&self) -> &'static str {
        "memory"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.len())
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_request(self.len(), 1, offset, len as u64, Access::Read)?;
        let data = self.data.read().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        let mut buf = BytesMut::with_capacity(len);
        buf.extend_from_slice(&data[start..start + len]);
        Ok(buf.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        check_request(self.len(), 1, offset, data.len() as u64, Access::Write)?;
        let mut mem = self.data.write().unwrap_or_else(|p| p.into_inner());
        let start = offset as usize;
        mem[start..start + data.len()].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        check_request(self.len(), 1, offset, len, Access::Write)?;
        let mut mem = self.data.write().unwrap_or_else(|p| p.into_inner());
        mem[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn completes_inline(&self) -> bool {
        true
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        // Past the end is EINVAL for a discard (NBD.md N20), not write-zeroes' ENOSPC.
        check_request(self.len(), 1, offset, len, Access::Read)?;
        self.write_zeroes(offset, len, ZeroFlags::default()).await
    }

    fn discard_zeroes(&self) -> bool {
        true
    }

    async fn grow(&self, length: u64) -> Result<()> {
        if !self.growable {
            return Err(crate::error::Error::new(
                crate::error::ErrorKind::NoSpc,
                format!("a fixed memory device cannot grow to {length} bytes"),
            ));
        }
        let mut mem = self.data.write().unwrap_or_else(|p| p.into_inner());
        if (mem.len() as u64) < length {
            mem.resize(length as usize, 0);
        }
        Ok(())
    }

    fn grows_with_zeroes(&self) -> bool {
        self.growable
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_request(self.len(), 1, offset, len, Access::Read)?;
        let mem = self.data.read().unwrap_or_else(|p| p.into_inner());
        let range = &mem[offset as usize..(offset + len) as usize];
        // Report the leading run that is all-zero or not, in 512-byte steps.
        let first_zero = range.iter().take(512).all(|&b| b == 0);
        let mut run = 0u64;
        for chunk in range.chunks(512) {
            if chunk.iter().all(|&b| b == 0) != first_zero {
                break;
            }
            run += chunk.len() as u64;
        }
        Ok(if first_zero {
            BlockStatus::zero(run)
        } else {
            BlockStatus::data(run)
        })
    }
}
