#!/usr/bin/env bash
# The test command: formatting, lints, build, then every test in the workspace (unit, golden
# and the end-to-end tests in network-namespace pods, which need root).
#
#   sudo bash scripts/test.sh            # everything
#   sudo bash scripts/test.sh --test e2e_core   # extra arguments are passed to `cargo test`
#
# Honours CARGO_TARGET_DIR. Exits non-zero on the first failing step.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "dependencies"
bash scripts/install-deps.sh

# rustfmt and clippy are rustup components; a minimal toolchain may lack them.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  if command -v rustup >/dev/null 2>&1; then
    rustup component add rustfmt clippy
  fi
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo doc (broken intra-doc links are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet

step "cargo build"
cargo build --workspace --all-targets

step "cargo test"
cargo test --workspace "$@"
