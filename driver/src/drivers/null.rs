//! `null-co`: a device that stores nothing (QEMU's null-co). Writes succeed and are dropped;
//! reads return zeroes. Options: `size` (default 1 GiB), `read-zeroes` (default on, as in
//! QEMU 10), `latency-ns` (default 0).

use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::device::{check_request, Access, BlockDevice, BlockStatus, WriteFlags, ZeroFlags};
use crate::error::Result;

/// The null device.
#[derive(Debug)]
pub struct NullDevice {
    length: u64,
    read_zeroes: bool,
    latency: Duration,
}

/// QEMU's default null-co size: 1 GiB.
pub const NULL_SIZE_DEFAULT_BYTES: u64 = 1 << 30;

impl NullDevice {
    /// A null device of `length` bytes.
    pub fn new(length: u64, read_zeroes: bool, latency: Duration) -> NullDevice {
        NullDevice {
            length,
            read_zeroes,
            latency,
        }
    }

    async fn delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }
}

#[async_trait]
impl BlockDevice for NullDevice {
    fn driver(&self) -> &'static str {
        "null-co"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.length)
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_request(self.length, 1, offset, len as u64, Access::Read)?;
        self.delay().await;
        // Rust buffers are always initialised; without read-zeroes the contents are merely
        // unspecified (block status says DATA), as in QEMU.
        Ok(BytesMut::zeroed(len).freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        check_request(self.length, 1, offset, data.len() as u64, Access::Write)?;
        self.delay().await;
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        self.delay().await;
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        check_request(self.length, 1, offset, len, Access::Write)?;
        self.delay().await;
        Ok(())
    }

    fn can_fast_zero(&self) -> bool {
        true
    }

    fn completes_inline(&self) -> bool {
        true
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.length, 1, offset, len, Access::Read)?;
        self.delay().await;
        Ok(())
    }

    fn discard_zeroes(&self) -> bool {
        self.read_zeroes
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_request(self.length, 1, offset, len, Access::Read)?;
        Ok(if self.read_zeroes {
            BlockStatus::zero(len)
        } else {
            BlockStatus::data(len)
        })
    }
}
