#![no_main]
//! See ballot_check::qcow2_image.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::qcow2_image::fuzz(data));
