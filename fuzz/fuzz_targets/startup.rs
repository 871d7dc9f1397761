//! `cargo +nightly fuzz run startup`: `pgpilot::fuzzing::startup` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgpilot::fuzzing::startup(data));
