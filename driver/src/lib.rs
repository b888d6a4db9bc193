//! ballot: quorum and COLO block-replication drivers, with an NBD front end.
//!
//! The driver graph is built from [`device::BlockDevice`] nodes ([`drivers`]), configured from
//! qemu-storage-daemon's `--blockdev` syntax ([`config`], [`graph`]), and reports through
//! QMP-shaped [`events`]. See `../shared/docs/ARCHITECTURE.md` and `QUORUM.md`.

pub mod config;
pub mod device;
pub mod drivers;
pub mod error;
pub mod events;
pub mod graph;
pub mod host;
pub mod jobs;
pub mod join;
pub mod libvirt;
pub mod log;
pub mod metrics;
pub mod nbd;
pub mod port;
pub mod qmp;
pub mod rangelock;
pub mod serve;
pub mod stats;
pub mod tls;
pub mod waiter;

pub use device::{BlockDevice, BlockStatus, Device, WriteFlags, ZeroFlags};
pub use error::{ConfigError, Error, ErrorKind, Result};
