//! ballot-check: the reference models and harnesses behind ballot's fuzz targets
//! (`fuzz/`, cargo-fuzz), the corpus replay tests (`tests/corpus.rs`, plain `cargo test`) and
//! the proptest state machines (`tests/quorum_machine.rs`, `tests/overlay_machine.rs`).
//!
//! Each target is a function of the fuzzer's bytes that returns normally when the code under
//! test behaved and panics, naming the broken rule, when it did not. The same function runs
//! under libFuzzer (the `fuzz/` wrappers are one line each) and under `cargo test`, which replays
//! every committed corpus and regression input (ISSUE 6, STYLE.md habit 4).

pub mod blockdev;
pub mod child;
pub mod libvirt;
pub mod metadata_header;
pub mod nbd_block_sizes;
pub mod nbd_client;
pub mod nbd_server;
pub mod overlay;
pub mod qcow2_image;
pub mod qmp;
pub mod quorum_model;
pub mod rt;
pub mod scenario;
pub mod vote;

/// A fuzz target's function: returns on success, panics naming the broken rule.
pub type Target = fn(&[u8]);

/// Every fuzz target: its name (the `fuzz/fuzz_targets/<name>.rs` file, the corpus folder
/// `fuzz/corpus/<name>/`) and its function.
pub const TARGETS: &[(&str, Target)] = &[
    ("quorum_vote", vote::fuzz),
    ("blockdev_options", blockdev::fuzz),
    ("nbd_server", nbd_server::fuzz),
    ("nbd_client_replies", nbd_client::fuzz),
    ("overlay_map", overlay::fuzz),
    ("scenario_file", scenario::fuzz),
    ("libvirt_xml", libvirt::fuzz),
    ("qmp_monitor", qmp::fuzz),
    ("nbd_block_sizes", nbd_block_sizes::fuzz),
    ("metadata_header", metadata_header::fuzz),
    ("qcow2_image", qcow2_image::fuzz),
];
