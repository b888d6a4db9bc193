#![no_main]
//! See ballot_check::nbd_server.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::nbd_server::fuzz(data));
