//! `raw`: the format layer over a protocol child, with an optional window
//! (`offset`, `size`) into it, as QEMU's raw format driver.

use async_trait::async_trait;
use bytes::Bytes;

use crate::device::{
    check_request, Access, BlockDevice, BlockStatus, Device, WriteFlags, ZeroFlags,
};
use crate::error::{ConfigError, Error, ErrorKind, Result};

/// A raw node.
#[derive(Debug)]
pub struct RawDevice {
    child: Device,
    offset: u64,
    size: u64,
    read_only: bool,
    discard_unmap: bool,
}

impl RawDevice {
    /// Opens a raw window over `child`, validating `offset` and `size` with QEMU's messages.
    ///
    /// # Errors
    /// The child's length error, or QEMU's `Specified size is not multiple of 512`,
    /// `Offset (<o>) cannot be greater than size of the containing file (<n>)`,
    /// `The sum of offset (<o>) and size (<s>) has to be smaller or equal to the  actual size
    /// of the containing file (<n>)` (QEMU's double space kept).
    pub fn open(
        child: Device,
        offset: u64,
        size: Option<u64>,
        read_only: bool,
        discard_unmap: bool,
    ) -> Result<RawDevice, ConfigError> {
        let child_len = child.length().map_err(|e| {
            ConfigError::new(format!(
                "Could not get the size of the containing file: {e}"
            ))
        })?;
        if let Some(size) = size {
            if size % 512 != 0 {
                return Err(ConfigError::new("Specified size is not multiple of 512"));
            }
        }
        if offset > child_len {
            return Err(ConfigError::new(format!(
                "Offset ({offset}) cannot be greater than size of the containing file ({child_len})"
            )));
        }
        let size = match size {
            Some(size) => {
                if offset.checked_add(size).is_none_or(|end| end > child_len) {
                    return Err(ConfigError::new(format!(
                        "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the  actual size of the containing file ({child_len})"
                    )));
                }
                size
            }
            None => child_len - offset,
        };
        Ok(RawDevice {
            child,
            offset,
            size,
            read_only,
            discard_unmap,
        })
    }

    fn check_writable(&self, op: &str) -> Result<()> {
        if self.read_only {
            return Err(Error::new(
                ErrorKind::Perm,
                format!("{op} on read-only raw node"),
            ));
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for RawDevice {
    fn driver(&self) -> &'static str {
        "raw"
    }

    fn length(&self) -> Result<u64> {
        Ok(self.size)
    }

    fn request_alignment(&self) -> u32 {
        self.child.request_alignment()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_request(self.size, 1, offset, len as u64, Access::Read)?;
        self.child.read(self.offset + offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.check_writable("write")?;
        check_request(self.size, 1, offset, data.len() as u64, Access::Write)?;
        self.child.write(self.offset + offset, data, flags).await
    }

    async fn flush(&self) -> Result<()> {
        self.child.flush().await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check_writable("write-zeroes")?;
        check_request(self.size, 1, offset, len, Access::Write)?;
        let flags = ZeroFlags {
            may_unmap: flags.may_unmap && self.discard_unmap,
            ..flags
        };
        self.child
            .write_zeroes(self.offset + offset, len, flags)
            .await
    }

    fn can_fast_zero(&self) -> bool {
        self.child.can_fast_zero()
    }

    fn completes_inline(&self) -> bool {
        self.child.completes_inline()
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(self.size, 1, offset, len, Access::Read)?;
        if !self.discard_unmap {
            return Ok(());
        }
        self.check_writable("discard")?;
        self.child.discard(self.offset + offset, len).await
    }

    fn discard_zeroes(&self) -> bool {
        self.discard_unmap && self.child.discard_zeroes()
    }

    fn cache_epoch(&self) -> u64 {
        self.child.cache_epoch()
    }

    fn reachable(&self) -> bool {
        self.child.reachable()
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_request(self.size, 1, offset, len, Access::Read)?;
        let mut s = self.child.block_status(self.offset + offset, len).await?;
        s.length = s.length.min(len);
        Ok(s)
    }
}
