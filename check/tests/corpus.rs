//! Replays every committed fuzz input — `fuzz/corpus/<target>/` (what libFuzzer kept) and
//! `fuzz/regressions/<target>/` (inputs that once failed) — through the same target function
//! cargo-fuzz runs, so CI covers the corpora without cargo-fuzz (ISSUE 6 item 2).

use std::path::{Path, PathBuf};

fn inputs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn replay(target: &str) -> (usize, usize) {
    let f = ballot_check::TARGETS
        .iter()
        .find(|(n, _)| *n == target)
        .map(|(_, f)| *f)
        .expect("target is listed");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let corpus = inputs(&root.join("corpus").join(target));
    let regressions = inputs(&root.join("regressions").join(target));
    for p in corpus.iter().chain(&regressions) {
        let data = std::fs::read(p).expect("readable input");
        let r = std::panic::catch_unwind(|| f(&data));
        assert!(r.is_ok(), "{target}: {} fails", p.display());
    }
    (corpus.len(), regressions.len())
}

/// Each target has a committed corpus (seeds at least) and every input in it passes.
macro_rules! corpus_test {
    ($name:ident, $target:literal, $min:expr) => {
        #[test]
        fn $name() {
            let (corpus, _) = replay($target);
            assert!(
                corpus >= $min,
                "{}: {corpus} corpus inputs, expected at least {}",
                $target,
                $min
            );
        }
    };
}

corpus_test!(quorum_vote, "quorum_vote", 8);
corpus_test!(blockdev_options, "blockdev_options", 8);
corpus_test!(nbd_server, "nbd_server", 8);
corpus_test!(nbd_client_replies, "nbd_client_replies", 8);
corpus_test!(overlay_map, "overlay_map", 8);
corpus_test!(scenario_file, "scenario_file", 8);
corpus_test!(libvirt_xml, "libvirt_xml", 8);
corpus_test!(qmp_monitor, "qmp_monitor", 8);
corpus_test!(nbd_block_sizes, "nbd_block_sizes", 8);
corpus_test!(metadata_header, "metadata_header", 8);
corpus_test!(qcow2_image, "qcow2_image", 8);

#[test]
fn every_target_has_a_corpus_test_and_a_wrapper() {
    let names: Vec<&str> = ballot_check::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        names,
        [
            "quorum_vote",
            "blockdev_options",
            "nbd_server",
            "nbd_client_replies",
            "overlay_map",
            "scenario_file",
            "libvirt_xml",
            "qmp_monitor",
            "nbd_block_sizes",
            "metadata_header",
            "qcow2_image"
        ]
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/fuzz_targets");
    for n in names {
        assert!(
            root.join(format!("{n}.rs")).is_file(),
            "no fuzz/fuzz_targets/{n}.rs"
        );
    }
}
