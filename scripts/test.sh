#!/usr/bin/env bash
# Every check CI runs: formatting, clippy with warnings as errors, and all tests (unit,
# property, integration tests that start real nodes on loopback, and the chaos suite), then
# the chaos summary table, and a check that no `stratus` process started by the run is left.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
# faketime: the integrity tests skew one member's clock with libfaketime; nginx: the fleet
# benchmark's smoke round compares against it.
scripts/setup.sh faketime nginx
# Proptest case counts are sized in code for CI; bound shrinking so a failure ends promptly.
export PROPTEST_MAX_SHRINK_ITERS=${PROPTEST_MAX_SHRINK_ITERS:-2048}
# Nodes, and the nginx processes of the benchmark's smoke round (run in temporary directories).
leftovers() { pgrep -f "^$root/target/[^ ]*/stratus (run|demo)|nginx.* -p /tmp/\.tmp" || true; }
rm -f target/tmp/chaos-summary.txt
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
cargo test --workspace --doc
echo
echo "chaos suite summary:"
cat target/tmp/chaos-summary.txt
# Nodes exit within ~200 ms of the test process that started them (--exit-with-parent).
for _ in 1 2 3 4 5 6 7 8 9 10; do
  [ -z "$(leftovers)" ] && break
  sleep 0.5
done
left=$(leftovers)
if [ -n "$left" ]; then
  echo "test.sh: processes left behind by the tests:" >&2
  ps -o pid=,args= -p $left >&2 || true
  exit 1
fi
echo "test.sh: no stratus or nginx process left behind"
