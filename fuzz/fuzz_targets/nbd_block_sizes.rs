#![no_main]
//! See ballot_check::nbd_block_sizes.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::nbd_block_sizes::fuzz(data));
