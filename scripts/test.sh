#!/usr/bin/env bash
# Every check CI runs: formatting, clippy with warnings as errors, and all tests
# (unit, property, and integration tests that start real nodes on loopback).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
cargo test --workspace --doc
