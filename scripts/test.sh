#!/usr/bin/env bash
# The whole test suite, as CI runs it: setup (packages, model, release build), formatting,
# lints, then every test against the release build (the same llama.cpp build the binary uses).
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/rbee/target}"
./scripts/setup.sh
export RBEE_TEST_MODEL="${RBEE_MODEL_DIR:-$HOME/.cache/rbee/models}/SmolLM2-135M-Instruct.Q4_1.gguf"

echo "test: cargo fmt --check" >&2
cargo fmt --check
echo "test: cargo clippy" >&2
cargo clippy --release --locked --all-targets --quiet -- -D warnings
echo "test: cargo test" >&2
cargo test --release --locked -- --test-threads "${RBEE_TEST_THREADS:-4}"
