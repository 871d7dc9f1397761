//! `cargo +nightly fuzz run hba`: `pgpilot::fuzzing::hba` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgpilot::fuzzing::hba(data));
