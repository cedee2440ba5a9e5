#!/usr/bin/env bash
# The fleet load benchmark: stratus and nginx, the same scenarios, one invocation.
#
#   benches/fleet.sh [--smoke] [--secs S] [--rounds N] [--objects N]
#
# Installs nginx from Debian when missing (it is never started as a service), builds stratus
# and the benchmark in release mode, runs every scenario (see benches/src/fleet.rs) and writes
# benches/results/README.md with throughput.svg, cpu.svg and latency.svg next to it.
# All traffic stays on 127.0.0.1; every process it starts dies with it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh nginx
cargo build --release -q -p stratus-node -p stratus-benches --bin stratus --bin fleet-bench
out=${BENCH_OUT:-benches/results}
target/release/fleet-bench --stratus target/release/stratus --out "$out" \
  --command "benches/fleet.sh${*:+ $*}" "$@"
