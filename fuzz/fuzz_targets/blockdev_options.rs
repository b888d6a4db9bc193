#![no_main]
//! See ballot_check::blockdev.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::blockdev::fuzz(data));
