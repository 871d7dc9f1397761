//! `cargo +nightly fuzz run frame`: `pgpilot::fuzzing::frame` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgpilot::fuzzing::frame(data));
