//! stratus-benches: criterion micro benchmarks (`benches/`) and the fleet load benchmark
//! (`fleet-bench`, driven by `benches/fleet.sh`), which runs the same scenarios against
//! stratus and nginx in one invocation. Benchmarks measure; tests assert behaviour.

pub mod fleet;
pub mod load;
pub mod origin;
pub mod report;
pub mod sys;
pub mod systems;
