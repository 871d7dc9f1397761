//! `cargo +nightly fuzz run sasl`: `pgpilot::fuzzing::sasl` under libFuzzer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pgpilot::fuzzing::sasl(data));
