//! stratus-benches: criterion micro benchmarks (`benches/`) and the load-benchmark script
//! (`load.sh`) that drives a real node with `wrk`. Benchmarks measure; tests assert behaviour.
