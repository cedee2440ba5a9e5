#!/usr/bin/env bash
# Fleet load benchmark, one-node slice: hot-hit throughput and latency of one release node.
#
#   benches/load.sh [seconds] [connections]
#
# Starts the demo origin and one node on loopback (ports BENCH_BASE_PORT..+3, default 17800),
# warms one object, then drives it with wrk (2 threads) and prints wrk's report, including
# the latency distribution. Load goes to 127.0.0.1 only. Numbers depend on the machine: on a
# 2-core box, wrk and the node share the cores.
#
# BENCH_TRACING=1 turns tracing on (sample_ratio 1.0) and exports every span over OTLP/HTTP
# to a local sink (`stratus otlp-sink`), to measure what tracing costs on the hot-hit path.
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
if [ "${BENCH_TRACING:-0}" = 1 ]; then
  printf '\n[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = %s\n' $((base + 3)) "${BENCH_SAMPLE:-1.0}" >> "$dir/bench.toml"
  $pin_rest "$bin" otlp-sink --listen "127.0.0.1:$((base + 3))" &
fi

# Pin the node (and its export thread) to CPU 1 and everything else to CPU 0, so the node's
# costs are measured on a core of its own rather than against wrk's scheduling noise.
pin_node="taskset -c 1"
pin_rest="taskset -c 0"
if ! command -v taskset >/dev/null 2>&1 || [ "$(nproc)" -lt 2 ]; then pin_node=""; pin_rest=""; fi
$pin_rest "$bin" demo-origin --listen "127.0.0.1:$base" &
$pin_node "$bin" run --config "$dir/bench.toml" --upgrade-sock "$dir/up.sock" 2>"$dir/node.log" &
node_pid=$!
for _ in $(seq 1 200); do
  curl -sf "http://127.0.0.1:$((base + 2))/healthz" >/dev/null 2>&1 && break
  sleep 0.05
done
curl -sf -H 'Host: demo.test' "http://127.0.0.1:$((base + 1))/hello" >/dev/null
status=$(curl -si -H 'Host: demo.test' "http://127.0.0.1:$((base + 1))/hello" | grep -i '^cache-status' | tr -d '\r')
echo "warm: $status"
echo "tracing: $([ "${BENCH_TRACING:-0}" = 1 ] && echo on, sampled 1.0, exporting || echo off)"
echo "node threads: ${BENCH_THREADS:-1}, wrk: 2 threads, $conns connections, ${secs}s, hot hit on /hello (22-byte body)"
# CPU time of the node process (all its threads, export included), in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
before=$(cpu_ticks "$node_pid")
$pin_rest wrk -t2 -c"$conns" -d"${secs}s" --latency -H 'Host: demo.test' "http://127.0.0.1:$((base + 1))/hello" | tee "$dir/wrk.out"
after=$(cpu_ticks "$node_pid")
requests=$(awk '/requests in/ {print $1}' "$dir/wrk.out")
hz=$(getconf CLK_TCK)
awk -v t=$((after - before)) -v hz="$hz" -v n="$requests" 'BEGIN { if (n > 0) printf "node CPU per request: %.2f us (%d requests, %.2f s CPU)\n", t / hz * 1e6 / n, n, t / hz }'
echo "origin requests during the run (should be 1):"
curl -s "http://127.0.0.1:$((base + 2))/metrics" | grep -E '^stratus_(origin_requests|spans_dropped)_total'
