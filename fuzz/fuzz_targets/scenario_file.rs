#![no_main]
//! See ballot_check::scenario.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::scenario::fuzz(data));
