//! The block drivers, one file each, named after the `driver=` value.

pub mod cow;
pub mod file;
pub mod memory;
pub mod null;
pub mod overlay;
pub mod qcow2;
pub mod quorum;
pub mod raw;
pub mod replication;
pub mod writeback;
