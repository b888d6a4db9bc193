//! The one seam of the driver graph: the [`BlockDevice`] trait (ARCHITECTURE.md, "The one seam").
//!
//! Every node — file, raw, null-co, quorum, and later nbd, overlay, replication and the
//! simulator's virtual disk — implements it. The trait is dyn-compatible (children are
//! `Arc<dyn BlockDevice>`) and async. Buffers are owned and reference-counted ([`Bytes`]): a
//! quorum write hands one buffer to every child and a quorum read returns the winning child's
//! buffer without copying (QUORUM.md Q4).
//!
//! Optional capabilities (write-zeroes, discard, block status) have default methods that do
//! the safe thing (STYLE.md habit 2).

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use crate::error::{Error, ErrorKind, Result};

/// Flags of a write request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Force unit access: the data is durable when the request completes.
    pub fua: bool,
}

impl WriteFlags {
    /// No flags.
    pub const NONE: WriteFlags = WriteFlags { fua: false };
    /// FUA only.
    pub const FUA: WriteFlags = WriteFlags { fua: true };
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Force unit access.
    pub fua: bool,
    /// The device may deallocate the range instead of writing zeroes (NBD: no NO_HOLE).
    pub may_unmap: bool,
}

/// The answer of a block-status query: the status of the first `length` bytes at the queried
/// offset (`0 < length <= queried count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// Bytes covered by this answer.
    pub length: u64,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The range holds data in storage (false: a hole, NBD's HOLE flag).
    pub data: bool,
    /// The answer was determined by this node itself rather than a backing node beneath it
    /// (meaningful for overlays, REPLICATION.md R48; other drivers say `true`).
    pub allocated: bool,
}

impl BlockStatus {
    /// "Holds data, may be anything": the always-correct answer (NBD.md N24).
    pub fn data(length: u64) -> BlockStatus {
        BlockStatus {
            length,
            zero: false,
            data: true,
            allocated: true,
        }
    }

    /// A range that reads as zeroes and holds no data.
    pub fn zero(length: u64) -> BlockStatus {
        BlockStatus {
            length,
            zero: true,
            data: false,
            allocated: true,
        }
    }
}

/// A block device: one node of the driver graph.
///
/// Offsets and lengths are in bytes. Every request must lie inside `[0, length)` and be a
/// multiple of [`BlockDevice::request_alignment`]; violations fail with `EINVAL` (reads,
/// discards, block status) or `ENOSPC` (writes past the end), checked by [`check_request`].
#[async_trait]
pub trait BlockDevice: Send + Sync + fmt::Debug {
    /// The driver's name as used in `driver=` (`file`, `quorum`, ...).
    fn driver(&self) -> &'static str;

    /// The device length in bytes. An error means the length cannot be determined now.
    fn length(&self) -> Result<u64>;

    /// The alignment, in bytes, that every request's offset and length must have.
    fn request_alignment(&self) -> u32 {
        1
    }

    /// Reads `len` bytes at `offset` into a new buffer of exactly `len` bytes.
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes>;

    /// Writes `data` at `offset`. With `flags.fua` the data is durable on return.
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()>;

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Makes `[offset, offset + len)` read as zeroes. The default writes zero buffers.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        write_zeroes_by_writing(self, offset, len, flags).await
    }

    /// Whether this device can zero without writing data (NBD's FAST_ZERO).
    fn can_fast_zero(&self) -> bool {
        false
    }

    /// Whether requests usually complete without waiting (null, memory, a file whose data is
    /// in the page cache). The NBD server then starts each request on the connection's reader
    /// and gives it a task of its own only if it has to wait. A hint: the default, `false`,
    /// gives every request its own task at once, which is better for a device that fans out
    /// (a quorum sends to every child before it waits).
    fn completes_inline(&self) -> bool {
        false
    }

    /// A discard hint. The default ignores it and succeeds.
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_request(
            self.length()?,
            self.request_alignment(),
            offset,
            len,
            Access::Read,
        )?;
        Ok(())
    }

    /// Whether a successful discard guarantees that the range then reads back as zeroes
    /// (QUORUM.md Q45). The default discard does nothing, so the default is `false`.
    fn discard_zeroes(&self) -> bool {
        false
    }

    /// A counter that changes whenever the device may have lost writes it acknowledged but
    /// that no completed flush covers (an `nbd` device on a new connection: the server may have
    /// restarted with its volatile cache gone). A write or flush that starts and ends under the
    /// same value ran on one incarnation of the device. HEALING.md H7. Default: never changes.
    fn cache_epoch(&self) -> u64 {
        0
    }

    /// Whether requests can reach the device now (an `nbd` device: connected). A hint for
    /// background work such as the quorum's resync (HEALING.md H14); requests still decide.
    fn reachable(&self) -> bool {
        true
    }

    /// Grows the device to `length` bytes (a format driver allocating past the end of its
    /// file, as QEMU's file driver allows). The default cannot: `ENOSPC`.
    async fn grow(&self, length: u64) -> Result<()> {
        Err(Error::new(
            ErrorKind::NoSpc,
            format!("a {} node cannot grow to {length} bytes", self.driver()),
        ))
    }

    /// Whether bytes [`BlockDevice::grow`] adds read as zeroes until written (a sparse file).
    fn grows_with_zeroes(&self) -> bool {
        false
    }

    /// The status of the bytes starting at `offset`, at most `len` of them. The default says
    /// "data" over the whole range, which is always correct.
    async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        check_request(
            self.length()?,
            self.request_alignment(),
            offset,
            len,
            Access::Read,
        )?;
        Ok(BlockStatus::data(len))
    }
}

/// Shared handle to a node of the graph.
pub type Device = Arc<dyn BlockDevice>;

/// What a request does, for the range check's choice of error (NBD.md N20 step 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Reads, discards, block status: past the end is EINVAL.
    Read,
    /// Writes and write-zeroes: past the end is ENOSPC.
    Write,
}

/// Checks that `[offset, offset + len)` lies inside a device of `length` bytes and is aligned
/// to `align` bytes.
///
/// # Errors
/// `EINVAL` for an overflowing range, a misaligned one, or a read-side range past the end;
/// `ENOSPC` for a write-side range past the end.
pub fn check_request(length: u64, align: u32, offset: u64, len: u64, access: Access) -> Result<()> {
    let end = offset.checked_add(len).ok_or_else(|| {
        Error::new(
            ErrorKind::Inval,
            format!("request at offset {offset} length {len} overflows"),
        )
    })?;
    if end > length {
        let kind = match access {
            Access::Read => ErrorKind::Inval,
            Access::Write => ErrorKind::NoSpc,
        };
        return Err(Error::new(
            kind,
            format!("request at offset {offset} length {len} ends past the device length {length}"),
        ));
    }
    let align = u64::from(align.max(1));
    if offset % align != 0 || len % align != 0 {
        return Err(Error::new(
            ErrorKind::Inval,
            format!("request at offset {offset} length {len} is not aligned to {align} bytes"),
        ));
    }
    Ok(())
}

/// Largest zero buffer the default write-zeroes writes at once.
const ZERO_CHUNK_BYTES_MAX: u64 = 1 << 20;

/// Implements write-zeroes by writing shared zero buffers of at most 1 MiB.
///
/// # Errors
/// The first write's error.
pub async fn write_zeroes_by_writing<D: BlockDevice + ?Sized>(
    dev: &D,
    offset: u64,
    len: u64,
    flags: ZeroFlags,
) -> Result<()> {
    check_request(
        dev.length()?,
        dev.request_alignment(),
        offset,
        len,
        Access::Write,
    )?;
    if len == 0 {
        return Ok(());
    }
    let chunk = len.min(ZERO_CHUNK_BYTES_MAX);
    // One zero buffer shared by every chunk write; `chunk` is at most 1 MiB.
    let zeroes = BytesMut::zeroed(chunk as usize).freeze();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk);
        let last = done + n == len;
        let wflags = WriteFlags {
            fua: flags.fua && last,
        };
        dev.write(offset + done, zeroes.slice(..n as usize), wflags)
            .await?;
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_check_errors_follow_nbd_n20() {
        let e = check_request(4096, 1, 4096, 1, Access::Read).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Inval);
        let e = check_request(4096, 1, 4096, 1, Access::Write).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NoSpc);
        let e = check_request(4096, 1, u64::MAX, 2, Access::Write).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Inval);
        let e = check_request(8192, 512, 100, 512, Access::Read).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Inval);
        assert_eq!(check_request(8192, 512, 512, 1024, Access::Write), Ok(()));
        assert_eq!(check_request(8192, 512, 8192, 0, Access::Read), Ok(()));
    }
}
