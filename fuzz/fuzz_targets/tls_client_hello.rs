//! Arbitrary bytes → `veer::proxy::tls::parse_client_hello`, with its invariants checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    veer_fuzz::harness::tls_client_hello(data);
});
