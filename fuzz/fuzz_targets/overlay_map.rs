#![no_main]
//! See ballot_check::overlay.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::overlay::fuzz(data));
