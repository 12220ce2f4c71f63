//! The code the fuzz targets run, kept in one file ([`harness`]) that
//! `tests/fuzz_regressions.rs` includes too, so the saved inputs replay through exactly the
//! same path on stable `cargo test`.

#[path = "harness.rs"]
pub mod harness;
