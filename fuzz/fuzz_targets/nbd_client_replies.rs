#![no_main]
//! See ballot_check::nbd_client.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::nbd_client::fuzz(data));
