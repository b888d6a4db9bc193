//! The op log's entries: each child request a guest op caused, with its outcome, as the
//! virtual disks log them and the oracle's vote model reads them. Depends on nothing else in
//! the simulator.

use ballot::{ErrorKind, Result};

/// The outcome of one child request, as the oracle sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChildResult {
    /// Succeeded; for reads, the digest of the returned bytes.
    Ok(u64),
    /// Failed with this kind.
    Err(ErrorKind),
}

impl ChildResult {
    /// The log entry of a request without data to report.
    pub fn of(r: &Result<()>) -> ChildResult {
        match r {
            Ok(()) => ChildResult::Ok(0),
            Err(e) => ChildResult::Err(e.kind()),
        }
    }
}

/// Kind of a child request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildKind {
    /// Read.
    Read,
    /// Write (data digest in `data`).
    Write,
    /// Write-zeroes.
    Zero,
    /// Discard.
    Discard,
    /// Flush.
    Flush,
    /// Block status (`Ok` carries `zero << 63 | length`).
    Status,
}

/// One child request logged against a guest op.
#[derive(Debug, Clone)]
pub struct ChildOp {
    /// Child index.
    pub disk: usize,
    /// What it was.
    pub kind: ChildKind,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub len: u64,
    /// Digest of the written data (writes only).
    pub data: u64,
    /// What the child answered.
    pub result: ChildResult,
}
