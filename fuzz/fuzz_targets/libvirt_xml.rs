#![no_main]
//! See ballot_check::libvirt.

libfuzzer_sys::fuzz_target!(|data: &[u8]| ballot_check::libvirt::fuzz(data));
