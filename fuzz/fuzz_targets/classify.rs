//! `cargo +nightly fuzz run classify`: `pgpilot::fuzzing::classify` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgpilot::fuzzing::classify(data));
