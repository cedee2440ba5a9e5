#!/usr/bin/env bash
# Fleet load benchmark, one-node slice: hot-hit throughput and latency of one release node.
#
#   benches/load.sh [seconds] [connections]
#
# Starts the demo origin and one node on loopback (ports BENCH_BASE_PORT..+2, default 17800),
# warms one object, then drives it with wrk (2 threads) and prints wrk's report, including
# the latency distribution. Load goes to 127.0.0.1 only. Numbers depend on the machine: on a
# 2-core box, wrk and the node share the cores.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}
conns=${2:-64}
base=${BENCH_BASE_PORT:-17800}
scripts/setup.sh wrk curl
cargo build --release -q -p stratus-node
bin=target/release/stratus
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT

cat > "$dir/bench.toml" <<TOML
[node]
name = "bench-1"
role = "lower"
listen = "127.0.0.1:$((base + 1))"
admin_listen = "127.0.0.1:$((base + 2))"
threads = ${BENCH_THREADS:-1}
grace_period = "1s"

[[origin]]
host = "demo.test"
address = "127.0.0.1:$base"
TOML

"$bin" demo-origin --listen "127.0.0.1:$base" &
"$bin" run --config "$dir/bench.toml" --upgrade-sock "$dir/up.sock" 2>"$dir/node.log" &
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$((base + 2))/healthz" >/dev/null 2>&1 && break
  sleep 0.05
done
curl -sf -H 'Host: demo.test' "http://127.0.0.1:$((base + 1))/hello" >/dev/null
status=$(curl -si -H 'Host: demo.test' "http://127.0.0.1:$((base + 1))/hello" | grep -i '^cache-status' | tr -d '\r')
echo "warm: $status"
echo "node threads: ${BENCH_THREADS:-1}, wrk: 2 threads, $conns connections, ${secs}s, hot hit on /hello (22-byte body)"
wrk -t2 -c"$conns" -d"${secs}s" --latency -H 'Host: demo.test' "http://127.0.0.1:$((base + 1))/hello"
echo "origin requests during the run (should be 1):"
curl -s "http://127.0.0.1:$((base + 2))/metrics" | grep '^stratus_origin_requests_total'
