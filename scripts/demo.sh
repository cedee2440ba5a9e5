#!/usr/bin/env bash
# The main job: build stratus and run the whole system locally (`stratus demo`).
# Extra arguments go to `stratus demo`, e.g. --base-port 9000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p stratus-node
exec target/release/stratus demo "$@"
