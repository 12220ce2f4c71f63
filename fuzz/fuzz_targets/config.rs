//! Arbitrary bytes → config loader → validator → compiler (sidecar and gateway) → lookups.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    veer_fuzz::harness::config(data);
});
