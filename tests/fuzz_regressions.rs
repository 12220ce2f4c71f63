//! Replays every saved fuzz input through the fuzz targets' own code (`fuzz/src/harness.rs`),
//! on stable `cargo test`: no panic, and each input done in well under the fuzzers' 5 s timeout.
//!
//! `tests/fuzz_inputs/config/` holds inputs for the `config` target (loader → validator →
//! compiler), `tests/fuzz_inputs/tls_client_hello/` those for `tls_client_hello`. Add a file
//! there for every crash, timeout or out-of-memory `cargo fuzz` finds (minimized with
//! `cargo fuzz tmin`); see fuzz/README.md.
//!
//! The fuzzers' one finding so far, deeply nested flow collections that libyaml scanned in
//! quadratic time (`hand_deep_flow_*`, `*_nesting_in_metadata_name`), is fixed by the loader's
//! depth pre-pass and kept here as a regression test.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[path = "../fuzz/src/harness.rs"]
mod harness;

/// Per input; the fuzzers run with `-timeout=5`. Debug builds are several times slower than
/// the fuzzers' optimized ones, so a pass here leaves a wide margin there.
const LIMIT: Duration = Duration::from_secs(5);

fn inputs(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz_inputs")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: no inputs", dir.display());
    files
}

/// Runs `run` on every input of `target`, each on its own thread so one panic or hang names
/// its file instead of stopping the rest; fails listing every bad input.
fn replay(target: &str, run: fn(&[u8])) {
    let mut failures = Vec::new();
    for path in inputs(target) {
        let data = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let start = Instant::now();
        let worker = std::thread::Builder::new()
            .name(name.clone())
            // serde_yaml stops at 128 levels of nesting, but the debug build's frames are big.
            .stack_size(64 << 20)
            .spawn(move || run(&data))
            .unwrap();
        // Polled rather than joined, so a hang is reported (its thread is left behind).
        while !worker.is_finished() && start.elapsed() < LIMIT {
            std::thread::sleep(Duration::from_millis(2));
        }
        let elapsed = start.elapsed();
        if !worker.is_finished() {
            failures.push(format!("{name}: still running after {LIMIT:?}"));
            continue;
        }
        if let Err(panic) = worker.join() {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            failures.push(format!("{name}: panicked: {msg}"));
        } else if elapsed >= LIMIT {
            failures.push(format!("{name}: took {elapsed:?}"));
        } else if elapsed >= LIMIT / 10 {
            eprintln!("{target}/{name}: {elapsed:?}");
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn config_inputs_load_validate_and_compile_without_panicking() {
    replay("config", harness::config);
}

#[test]
fn tls_client_hello_inputs_parse_without_panicking() {
    replay("tls_client_hello", harness::tls_client_hello);
}
