#!/usr/bin/env bash
# Deterministic cost of tracing on the hot-hit path: user-space instructions per request,
# counted by callgrind (repeatable whatever else the machine does; kernel time not included).
#
#   benches/instructions.sh            # prints per-request instructions, tracing off and on
#   STRATUS_BIN=/path/to/stratus benches/instructions.sh   # another build (a before/after pair)
#
# For each mode it runs a release node under valgrind twice (N1 and N2 keep-alive requests for
# one cached object) and divides the difference by N2 - N1, so start-up cost cancels out.
# "on" = sample_ratio 1.0, exporting over OTLP/HTTP to a local `stratus otlp-sink`;
# "unsampled" = the same exporter configured with sample_ratio 0.0. MODES="off on" picks some.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh valgrind curl
if [ -z "${STRATUS_BIN:-}" ]; then
  cargo build --release -q -p stratus-node
fi
bin=${STRATUS_BIN:-$PWD/target/release/stratus}
base=${BENCH_BASE_PORT:-17950}
n1=${N1:-500}
n2=${N2:-2500}
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT

"$bin" demo-origin --listen "127.0.0.1:$base" &
"$bin" otlp-sink --listen "127.0.0.1:$((base + 3))" &

count() { # mode, requests -> total instructions of the node process
  local mode=$1 n=$2
  cat > "$dir/n.toml" <<TOML
[node]
name = "cg-1"
role = "lower"
listen = "127.0.0.1:$((base + 1))"
admin_listen = "127.0.0.1:$((base + 2))"
threads = 1
grace_period = "1s"
[[origin]]
host = "demo.test"
address = "127.0.0.1:$base"
TOML
  case "$mode" in
    on) ratio=1.0 ;;
    unsampled) ratio=0.0 ;;
    *) ratio= ;;
  esac
  if [ -n "$ratio" ]; then
    printf '[tracing]\notlp_endpoint = "http://127.0.0.1:%s"\nsample_ratio = %s\n' $((base + 3)) "$ratio" >> "$dir/n.toml"
  fi
  rm -f "$dir"/cg.out.*
  valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out.%p" \
    "$bin" run --config "$dir/n.toml" --upgrade-sock "$dir/up.sock" 2>/dev/null &
  local vg=$!
  for _ in $(seq 1 300); do
    curl -sf "http://127.0.0.1:$((base + 2))/healthz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  : > "$dir/urls"
  for _ in $(seq 1 "$n"); do
    printf 'url = "http://127.0.0.1:%s/hello"\noutput = /dev/null\n' $((base + 1)) >> "$dir/urls"
  done
  curl -s -H 'Host: demo.test' -K "$dir/urls"
  sleep 2 # let the export thread send what is queued
  kill -INT "$vg"; wait "$vg" 2>/dev/null || true
  callgrind_annotate "$dir"/cg.out.* 2>/dev/null | awk '/PROGRAM TOTALS/ && !done {gsub(",", "", $1); print $1; done = 1}'
}

for mode in ${MODES:-off unsampled on}; do
  a=$(count "$mode" "$n1")
  b=$(count "$mode" "$n2")
  echo "tracing $mode: $(( (b - a) / (n2 - n1) )) instructions per hot-hit request"
done
