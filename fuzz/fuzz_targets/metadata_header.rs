#![no_main]
//! See ballot_check::metadata_header.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::metadata_header::fuzz(data));
