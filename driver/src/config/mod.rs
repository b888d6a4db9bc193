//! Configuration: qemu-storage-daemon's dotted `--blockdev` syntax ([`keyval`]) and the
//! type-level option checks that turn a definition into a [`spec::NodeSpec`] (QUORUM.md Q6).

pub mod keyval;
pub mod spec;
