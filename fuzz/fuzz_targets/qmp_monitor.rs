#![no_main]
//! See ballot_check::qmp.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::qmp::fuzz(data));
