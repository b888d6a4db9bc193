#![no_main]
//! See ballot_check::vote.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::vote::fuzz(data));
